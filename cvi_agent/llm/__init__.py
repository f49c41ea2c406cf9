"""The custom LLM endpoint: routes, SSE encoding, brains and tools."""
