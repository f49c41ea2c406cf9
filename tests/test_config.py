"""Settings read from the environment: where local state (the SQLite database) goes."""

from __future__ import annotations

from pathlib import Path

import pytest

from cvi_agent.config import Settings
from cvi_agent.store import open_store


def test_default_database_is_under_the_default_var_dir() -> None:
    assert Settings().database_url == "sqlite+aiosqlite:///./var/cvi-agent.db"


async def test_cvi_var_dir_holds_the_default_sqlite_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    var = tmp_path / "state"
    monkeypatch.setenv("CVI_VAR_DIR", str(var))
    monkeypatch.chdir(tmp_path)
    settings = Settings()
    assert settings.database_url == f"sqlite+aiosqlite:///{var}/cvi-agent.db"
    store = await open_store(settings.database_url)
    await store.aclose()
    assert (var / "cvi-agent.db").is_file()
    assert not (tmp_path / "var").exists()  # nothing left in the old place


def test_a_relative_var_dir_stays_relative(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CVI_VAR_DIR", "run/state")
    assert Settings().database_url == "sqlite+aiosqlite:///./run/state/cvi-agent.db"


def test_an_explicit_database_url_wins_over_the_var_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CVI_VAR_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("CVI_DATABASE_URL", "postgresql+asyncpg://cvi@db/cvi")
    assert Settings().database_url == "postgresql+asyncpg://cvi@db/cvi"
    explicit = f"sqlite+aiosqlite:///{tmp_path / 'mine.db'}"
    assert Settings(database_url=explicit, var_dir=tmp_path / "x").database_url == explicit


def test_var_dir_given_by_name_moves_the_database(tmp_path: Path) -> None:
    settings = Settings(var_dir=tmp_path / "v")
    assert settings.database_url == f"sqlite+aiosqlite:///{tmp_path}/v/cvi-agent.db"
