"""Pure pydantic models of every wire format we speak. No I/O, no globals."""
