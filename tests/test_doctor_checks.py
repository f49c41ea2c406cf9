"""`cvi-agent doctor`'s checks (cvi_agent/doctor/checks.py) against the fakes on loopback and
the real SQLite, PostgreSQL and Redis: each finding says what is wrong and what to set."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from cvi_agent.devtools.fakes.server import free_port
from cvi_agent.devtools.fakes.upstream import FakeUpstream, Plan
from cvi_agent.doctor import run_checks, startup_checks
from cvi_agent.doctor.checks import (
    Check,
    check_callback_token,
    check_database,
    check_public_url,
    check_redis,
    check_tavus_key,
    check_upstream,
    upstream_targets,
)
from cvi_agent.personas import load_personas
from cvi_agent.store import open_store
from tests.support import PERSONAS, REDIS_TEST_URL, TAVUS_KEY, make_settings

UPSTREAM_KEY = "sk-upstream-secret"


def _dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


def _by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


async def test_an_upstream_that_answers_is_ok_and_gets_one_tiny_request(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    settings = make_settings(tmp_path, upstream.url)  # type: ignore[attr-defined]
    [target] = upstream_targets(load_personas(PERSONAS)["storyteller"], settings)
    check = await check_upstream(target, 2.0)
    assert check.status == "OK", check
    [record] = upstream.records
    assert record.body["max_tokens"] == 1 and record.body["model"] == "gpt-4o-mini"
    assert record.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"


async def test_a_refused_key_says_which_variable_to_set(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    upstream.push(Plan(status=401, error_body={"error": {"message": f"bad key {UPSTREAM_KEY}"}}))
    settings = make_settings(tmp_path, upstream.url)  # type: ignore[attr-defined]
    [target] = upstream_targets(load_personas(PERSONAS)["weather"], settings)
    check = await check_upstream(target, 2.0)
    assert check.status == "FAIL" and "HTTP 401" in check.detail
    assert "CVI_UPSTREAM_API_KEY" in check.fix
    assert UPSTREAM_KEY not in check.line()  # the upstream echoed it: masked


async def test_no_key_and_no_upstream_is_a_failure_with_the_cause(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, _dead_url(), upstream_api_key="")
    [target] = upstream_targets(load_personas(PERSONAS)["storyteller"], settings)
    check = await check_upstream(target, 2.0)
    assert check.status == "FAIL"
    assert "did not answer" in check.detail and "ConnectError" in check.detail
    assert "CVI_UPSTREAM_API_KEY is not set" in check.detail
    assert "CVI_UPSTREAM_BASE_URL" in check.fix and "CVI_UPSTREAM_API_KEY" in check.fix


async def test_an_unresolvable_host_is_a_failure(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, "http://no-such-host.invalid")
    [target] = upstream_targets(load_personas(PERSONAS)["storyteller"], settings)
    check = await check_upstream(target, 3.0)
    assert check.status == "FAIL" and "cannot resolve no-such-host.invalid" in check.detail


async def test_the_database_on_sqlite_and_postgresql(tmp_path: Path, database_url: str) -> None:
    settings = make_settings(tmp_path, database_url=database_url)
    fresh = await check_database(settings, 3.0)
    if database_url.startswith("sqlite"):
        assert fresh.status == "OK" and "created at the first start" in fresh.detail
        assert not Path(database_url.split("///", 1)[1]).exists()  # doctor creates nothing
    else:
        assert fresh.status == "WARN" and "schema version 0 of 1" in fresh.detail
        assert "applies the missing migrations" in fresh.fix
    store = await open_store(database_url)  # migrates
    await store.aclose()
    current = await check_database(settings, 3.0)
    assert current.status == "OK" and "(current)" in current.detail


@pytest.mark.postgres
async def test_an_unreachable_database_names_the_url_without_its_password(
    tmp_path: Path,
) -> None:
    url = f"postgresql+asyncpg://cvi:hunter2-secret@127.0.0.1:{free_port()}/cvi"
    check = await check_database(make_settings(tmp_path, database_url=url), 3.0)
    assert check.status == "FAIL" and "cannot connect" in check.detail
    assert "hunter2" not in check.line() and "CVI_DATABASE_URL" in check.fix


@pytest.mark.redis
async def test_redis_when_configured(tmp_path: Path) -> None:
    assert (await check_redis(make_settings(tmp_path), 1.0)).status == "OK"
    up = await check_redis(make_settings(tmp_path, redis_url=REDIS_TEST_URL), 2.0)
    assert up.status == "OK" and "answered" in up.detail
    dead = f"redis://127.0.0.1:{free_port()}/0"
    down = await check_redis(make_settings(tmp_path, redis_url=dead), 2.0)
    assert down.status == "FAIL" and "CVI_REDIS_URL" in down.fix


async def test_the_tavus_key_is_tried_with_one_cheap_request(
    tmp_path: Path, fake_tavus: Any
) -> None:
    unset = await check_tavus_key(make_settings(tmp_path), 2.0)
    assert unset.status == "OK" and "not set" in unset.detail
    good = make_settings(tmp_path, tavus_api_key=TAVUS_KEY, tavus_api_url=fake_tavus.url)
    assert (await check_tavus_key(good, 2.0)).status == "OK"
    assert [s.path for s in fake_tavus.requests("GET")] == ["/v2/personas"]
    wrong = make_settings(tmp_path, tavus_api_key="wrong-0123456789", tavus_api_url=fake_tavus.url)
    refused = await check_tavus_key(wrong, 2.0)
    assert refused.status == "FAIL" and "HTTP 401" in refused.detail
    assert "TAVUS_API_KEY" in refused.fix
    gone = make_settings(tmp_path, tavus_api_key=TAVUS_KEY, tavus_api_url=_dead_url())
    assert (await check_tavus_key(gone, 2.0)).status == "FAIL"


def test_a_loopback_public_url_fails_only_with_a_tavus_key(tmp_path: Path) -> None:
    assert check_public_url(make_settings(tmp_path)).status == "OK"
    local = check_public_url(make_settings(tmp_path, tavus_api_key=TAVUS_KEY))
    assert local.status == "FAIL" and "CVI_PUBLIC_URL" in local.fix
    public = make_settings(tmp_path, tavus_api_key=TAVUS_KEY, public_url="https://agent.example")
    assert check_public_url(public).status == "OK"


def test_the_callback_token(tmp_path: Path) -> None:
    assert check_callback_token(make_settings(tmp_path, callback_token="t" * 32)).status == "OK"
    missing = check_callback_token(make_settings(tmp_path))
    assert missing.status == "WARN" and "answers 503" in missing.detail
    with_tavus = check_callback_token(make_settings(tmp_path, tavus_api_key=TAVUS_KEY))
    assert with_tavus.status == "FAIL" and "CVI_CALLBACK_TOKEN" in with_tavus.fix
    development = check_callback_token(make_settings(tmp_path, api_keys_raw=""))
    assert development.status == "OK" and "development mode" in development.detail


async def test_the_startup_subset_sends_no_request_and_takes_about_a_second(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    settings = make_settings(tmp_path, upstream.url, upstream_api_key="")  # type: ignore[attr-defined]
    started = time.monotonic()
    checks = _by_name(await startup_checks(settings, load_personas(PERSONAS)))
    assert time.monotonic() - started < 1.5
    assert upstream.records == []
    assert checks["upstream storyteller"].status == "WARN"
    assert "CVI_UPSTREAM_API_KEY is not set" in checks["upstream storyteller"].detail
    assert checks["database"].status == "OK"
    assert "upstream echo" not in checks  # no upstream, nothing to check


async def test_every_check_runs_concurrently_within_the_timeout(tmp_path: Path) -> None:
    """Nothing answers (closed ports, a Tavus key): the whole run still ends in about one
    timeout, with one line per check."""
    settings = make_settings(
        tmp_path,
        _dead_url(),
        tavus_api_key=TAVUS_KEY,
        tavus_api_url=_dead_url(),
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
    )
    started = time.monotonic()
    checks = await run_checks(settings, load_personas(PERSONAS), 1.0)
    assert time.monotonic() - started < 2.5
    names = [c.name for c in checks]
    assert names[:2] == ["database", "redis"] and "TAVUS_API_KEY" in names
    assert {c.name for c in checks if c.status == "FAIL"} >= {
        "redis",
        "upstream storyteller",
        "upstream weather",
        "TAVUS_API_KEY",
        "CVI_PUBLIC_URL",
    }


@pytest.mark.postgres
async def test_pending_migrations_are_no_warning_at_start_up(tmp_path: Path, pg_url: str) -> None:
    settings = make_settings(tmp_path, _dead_url(), database_url=pg_url)
    checks = _by_name(await startup_checks(settings, {}))
    assert checks["database"].status == "OK" and "(migrating now)" in checks["database"].detail
