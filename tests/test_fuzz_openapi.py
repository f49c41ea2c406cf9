"""Schemathesis against the app's own OpenAPI document: no 5xx on any route, ever.

Beside the hand-written hypothesis strategies of `test_fuzz.py` (which know our bodies), this
lets schemathesis derive requests from `/openapi.json` as a stranger would: every documented
operation, its path, query and header parameters and documented bodies, sent to the real app
on a loopback uvicorn with a valid API key (and, for the Tavus callback route, the valid token
every other time, so the route is exercised past its token check), on SQLite and PostgreSQL.
The only check is schemathesis's `not_a_server_error`. Every upstream the app reaches is a
loopback fake, so a 502/503 would be ours too.

Bounded: `MAX_EXAMPLES` per operation, derandomized, no example database; the case count is
printed at the end of the run.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from pydantic import TypeAdapter
from schemathesis import APIOperation, Case, GenerationMode
from schemathesis.checks import not_a_server_error

from cvi_agent.app import create_app
from cvi_agent.conversations.api import CreateConversation
from cvi_agent.devtools.fakes.server import LoopbackServer
from cvi_agent.devtools.fakes.tavus import FakeTavus
from cvi_agent.devtools.fakes.upstream import FakeUpstream
from cvi_agent.llm.routes import inline_defs
from cvi_agent.protocol.interactions import Interaction
from tests.support import (
    API_KEY,
    DATABASES,
    TAVUS_KEY,
    create_pg_database,
    drop_pg_database,
    make_settings,
)

pytestmark = pytest.mark.slow

TOKEN = "cb-token-openapi-0123456789"
MAX_EXAMPLES = 100
CASES: collections.Counter[tuple[str, str]] = collections.Counter()  # (database, operation)


@dataclass
class Target:
    url: str
    database: str


def _start(tmp: Path, database_url: str, stack: list[LoopbackServer]) -> str:
    upstream = FakeUpstream()
    up = LoopbackServer(upstream).start()
    stack.append(up)
    tavus = FakeTavus(api_key=TAVUS_KEY)
    tv = LoopbackServer(tavus.app).start()
    stack.append(tv)
    tavus.url = tv.url
    settings_ = make_settings(
        tmp,
        up.url,
        database_url=database_url,
        callback_token=TOKEN,
        run_worker=False,
        tavus_api_key=TAVUS_KEY,
        tavus_api_url=tv.url,
        rate_limit_rps=0,
        jogg_webhook_secret="jogg-secret-openapi-0123456789",
    )
    server = LoopbackServer(create_app(settings_)).start()
    stack.append(server)
    return server.url


@pytest.fixture(scope="module", params=DATABASES)
def target(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Target]:
    """The app on loopback with fake upstream and Tavus, on SQLite or PostgreSQL."""
    tmp = tmp_path_factory.mktemp("openapi")
    pg_name = None
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp / 'cvi.db'}"
    else:
        pg_name, url = asyncio.run(create_pg_database())
    stack: list[LoopbackServer] = []
    try:
        yield Target(_start(tmp, url, stack), request.param)
    finally:
        for server in reversed(stack):
            server.stop()
        if pg_name is not None:
            asyncio.run(drop_pg_database(pg_name))
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        total = sum(n for (db, _), n in CASES.items() if db == request.param)
        if reporter is not None:
            reporter.write_line(f"schemathesis on {request.param}: {total} cases")
            for (db, op), n in sorted(CASES.items()):
                if db == request.param:
                    reporter.write_line(f"  {n:5d}  {op}")


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": inline_defs(schema)}}}


def with_hand_read_bodies(document: dict[str, Any]) -> dict[str, Any]:
    """The document plus the request bodies of the routes that read theirs by hand (so that a
    bad body is our 400, not FastAPI's 422) and so do not declare them: the same pydantic
    models the routes validate with, and any JSON object for the Tavus callback."""
    bodies = {
        ("/api/conversations", "post"): CreateConversation.model_json_schema(),
        ("/api/conversations/{conversation_id}/interactions", "post"): TypeAdapter(
            Interaction
        ).json_schema(),
        ("/callbacks/tavus", "post"): {
            "type": "object",
            "properties": {
                "event_type": {"type": "string"},
                "conversation_id": {"type": "string"},
                "timestamp": {},
                "properties": {"type": "object"},
            },
        },
    }
    for (path, method), body in bodies.items():
        operation = document["paths"][path][method]
        assert "requestBody" not in operation, f"{method} {path} documents its body now"
        operation["requestBody"] = _json_body(body)
    return document


def test_no_server_error_on_any_route(target: Target) -> None:
    """Every operation of `/openapi.json`, positive and negative cases (schemathesis's modes:
    values the schema allows, and values it does not)."""
    document = httpx.get(target.url + "/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(with_hand_read_bodies(document))
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    assert len(operations) >= 10, [op.label for op in operations]
    for operation in operations:
        for mode in GenerationMode:
            _fuzz(target, operation, mode)
    assert sum(n for (db, _), n in CASES.items() if db == target.database) > 200


def _fuzz(
    target: Target, operation: APIOperation[Any, Any, Any, Any], mode: GenerationMode
) -> None:
    label = f"{operation.label} ({mode.value})"

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Case[Any]) -> None:
        key = (target.database, label)
        CASES[key] += 1
        if case.path == "/callbacks/tavus" and CASES[key] % 2:
            case.query = {**(case.query or {}), "token": TOKEN}
        case.call_and_validate(
            base_url=target.url,
            headers={"x-api-key": API_KEY},
            checks=[not_a_server_error],
            timeout=30,
        )

    try:
        run()
    except Unsatisfiable:
        # An operation with nothing to get wrong (no parameter, no body schema) has no
        # negative case.
        if mode is not GenerationMode.NEGATIVE:
            raise
