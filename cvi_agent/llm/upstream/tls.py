"""The TLS context every direct transport verifies HTTPS upstreams with."""

from __future__ import annotations

import ssl

_SSL_CONTEXT: ssl.SSLContext | None = None


def default_ssl_context() -> ssl.SSLContext:
    """The system's trust store plus certifi's (slim images often ship without the former),
    HTTP/1.1 only; built once per process because loading the CA files costs milliseconds."""
    global _SSL_CONTEXT
    if _SSL_CONTEXT is None:
        context = ssl.create_default_context()  # the system's trust store...
        try:
            import certifi  # optional: httpx brings it, but the server runs without it

            context.load_verify_locations(cafile=certifi.where())  # ...and Mozilla's (slim images)
        except (ImportError, OSError):
            pass
        context.set_alpn_protocols(["http/1.1"])
        _SSL_CONTEXT = context
    return _SSL_CONTEXT
