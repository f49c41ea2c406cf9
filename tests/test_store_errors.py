"""Database error classification (`store.errors`): what the store retries, and the one log line
for any error."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import DBAPIError

from cvi_agent.store.errors import describe_error, is_transient


class _DriverError(Exception):
    def __init__(self, message: str, sqlstate: str | None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("message", "sqlstate", "transient"),
    [
        ("terminating connection due to administrator command", "57P01", True),
        ("the database system is shutting down", "57P03", True),
        ("the database system is starting up", "57P03", True),
        ("connection was closed in the middle of operation", "08003", True),
        ("sorry, too many clients already", "53300", True),
        ("duplicate key value violates unique constraint", "23505", False),
        ("invalid byte sequence for encoding", "22021", False),
        ("the database system is starting up", None, True),  # no code: read the text
        ("database is locked", None, True),  # SQLite
        ("no such table: events", None, False),
    ],
)
def test_transient_errors_are_recognised(
    message: str, sqlstate: str | None, transient: bool
) -> None:
    error = DBAPIError("INSERT …", None, _DriverError(message, sqlstate))
    assert is_transient(error) is transient
    assert is_transient(ConnectionRefusedError(111, "Connect call failed"))


def test_describe_error_is_one_line_naming_the_driver_error() -> None:
    error = DBAPIError("INSERT …", None, _DriverError("database is locked\nmore detail", None))
    assert describe_error(error) == "_DriverError: database is locked"
    assert describe_error(ConnectionRefusedError()) == "ConnectionRefusedError"
