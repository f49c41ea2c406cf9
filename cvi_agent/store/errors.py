"""Which database errors are worth retrying, and how to log any of them in one line.

The store retries a write while the database is briefly away (restarting, locked, out of
connections) and gives up at once on an error the statement or the data caused; the turn
recorder waits out the same errors. Every one of them logs the error in one line, no traceback,
since a database restart is expected and should not flood the log.
"""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError

# PostgreSQL SQLSTATEs after which a new transaction may succeed: class 08 (connection
# exception), 57P01 admin_shutdown (a fast shutdown or restart ended the session), 57P02
# crash_shutdown, 57P03 cannot_connect_now ("the database system is starting up" / "shutting
# down"), 53300 too_many_connections, 40001 serialization_failure, 40P01 deadlock_detected.
_TRANSIENT_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "53300", "40001", "40P01"})


def _sqlstate(exc: BaseException) -> str | None:
    """The PostgreSQL error code, wherever the driver and SQLAlchemy's adapter put it."""
    orig = getattr(exc, "orig", None)
    for candidate in (exc, orig, getattr(orig, "__cause__", None)):
        code = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
        if isinstance(code, str) and code:
            return code
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether retrying `exc` in a new transaction may succeed (the database is busy, starting,
    stopping or was restarted), as opposed to an error the statement or the data caused."""
    if isinstance(exc, OSError):  # connection refused, reset, connect timeout
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    code = _sqlstate(exc)
    if code is not None:
        return code.startswith("08") or code in _TRANSIENT_SQLSTATES
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).lower()
    markers = (
        "locked",
        "busy",
        "connection",
        "terminat",
        "shutdown",
        "shutting down",
        "starting up",
        "recovery mode",
        "closed",
        "timeout",
        "refused",
        "reset",
    )
    return any(m in text for m in markers)


def describe_error(exc: BaseException) -> str:
    """One line for the log: the error's type and the first line of its message."""
    orig = getattr(exc, "orig", None) or exc
    first = (str(orig).strip().splitlines() or [""])[0][:160]
    return f"{type(orig).__name__}: {first}" if first else type(orig).__name__
