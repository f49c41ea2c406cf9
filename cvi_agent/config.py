"""One Settings object, read from the environment (CVI_*, TAVUS_*, HOST, PORT).

Every field has a default that works on a fresh machine, so `make run` needs no configuration.
"""

from __future__ import annotations

import secrets
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _env(*names: str) -> AliasChoices:
    return AliasChoices(*names)


class Settings(BaseSettings):
    """Runtime configuration. Field names are Python names; the environment names are aliases."""

    model_config = SettingsConfigDict(populate_by_name=True, extra="ignore")

    api_keys_raw: str = Field(default="", validation_alias=_env("CVI_API_KEYS", "api_keys_raw"))
    # Unset: the SQLite database `cvi-agent.db` under `var_dir` (see `_database_in_var_dir`).
    database_url: str = Field(default="", validation_alias=_env("CVI_DATABASE_URL", "database_url"))
    redis_url: str | None = Field(default=None, validation_alias=_env("CVI_REDIS_URL", "redis_url"))
    personas_dir: Path = Field(
        default=Path("personas"), validation_alias=_env("CVI_PERSONAS_DIR", "personas_dir")
    )
    public_url: str = Field(
        default="http://127.0.0.1:8000", validation_alias=_env("CVI_PUBLIC_URL", "public_url")
    )
    callback_token: str = Field(
        default="", validation_alias=_env("CVI_CALLBACK_TOKEN", "callback_token")
    )
    upstream_base_url: str = Field(
        default="https://api.openai.com/v1",
        validation_alias=_env("CVI_UPSTREAM_BASE_URL", "upstream_base_url"),
    )
    upstream_api_key: str = Field(
        default="", validation_alias=_env("CVI_UPSTREAM_API_KEY", "upstream_api_key")
    )
    upstream_connect_timeout: float = Field(
        default=2.0,
        validation_alias=_env("CVI_UPSTREAM_CONNECT_TIMEOUT", "upstream_connect_timeout"),
    )
    upstream_first_token_timeout: float = Field(
        default=4.0,
        validation_alias=_env("CVI_UPSTREAM_FIRST_TOKEN_TIMEOUT", "upstream_first_token_timeout"),
    )
    upstream_read_timeout: float = Field(
        default=10.0, validation_alias=_env("CVI_UPSTREAM_READ_TIMEOUT", "upstream_read_timeout")
    )
    upstream_reply_timeout: float = Field(
        default=30.0,
        validation_alias=_env("CVI_UPSTREAM_REPLY_TIMEOUT", "upstream_reply_timeout"),
    )
    # The HTTP client that carries upstream requests (cvi_agent/llm/upstream/): the hand-written
    # httptools one, or aiohttp's. ARCHITECTURE.md "Upstream transport" has the measurements.
    upstream_transport: Literal["httptools", "aiohttp"] = Field(
        default="httptools",
        validation_alias=_env("CVI_UPSTREAM_TRANSPORT", "upstream_transport"),
    )
    breaker_failures: int = Field(
        default=3, ge=1, validation_alias=_env("CVI_BREAKER_FAILURES", "breaker_failures")
    )
    breaker_reset: float = Field(
        default=10.0, gt=0, validation_alias=_env("CVI_BREAKER_RESET", "breaker_reset")
    )
    tavus_api_key: str = Field(default="", validation_alias=_env("TAVUS_API_KEY", "tavus_api_key"))
    tavus_api_url: str = Field(
        default="https://tavusapi.com", validation_alias=_env("TAVUS_API_URL", "tavus_api_url")
    )
    # Avatar-video providers (cvi_agent/videos). Unsigned provider callbacks (Tavus videos,
    # Argil, JoggAI per-request webhook_url) authenticate with CVI_CALLBACK_TOKEN in the URL.
    argil_api_key: str = Field(default="", validation_alias=_env("ARGIL_API_KEY", "argil_api_key"))
    argil_api_url: str = Field(
        default="https://api.argil.ai/v1", validation_alias=_env("ARGIL_API_URL", "argil_api_url")
    )
    jogg_api_key: str = Field(default="", validation_alias=_env("JOGG_API_KEY", "jogg_api_key"))
    jogg_api_url: str = Field(
        default="https://api.jogg.ai/v2", validation_alias=_env("JOGG_API_URL", "jogg_api_url")
    )
    jogg_webhook_secret: str = Field(
        default="", validation_alias=_env("JOGG_WEBHOOK_SECRET", "jogg_webhook_secret")
    )
    video_poll_interval: float = Field(
        default=15.0, validation_alias=_env("CVI_VIDEO_POLL_INTERVAL", "video_poll_interval")
    )
    video_poll_max_age: float = Field(
        default=6 * 3600.0, validation_alias=_env("CVI_VIDEO_POLL_MAX_AGE", "video_poll_max_age")
    )
    host: str = Field(default="127.0.0.1", validation_alias=_env("HOST", "host"))
    port: int = Field(default=8000, validation_alias=_env("PORT", "port"))
    max_body_bytes: int = Field(
        default=2 * 1024 * 1024, validation_alias=_env("CVI_MAX_BODY_BYTES", "max_body_bytes")
    )
    tool_timeout: float = Field(
        default=5.0, validation_alias=_env("CVI_TOOL_TIMEOUT", "tool_timeout")
    )
    max_tool_rounds: int = Field(
        default=4, validation_alias=_env("CVI_MAX_TOOL_ROUNDS", "max_tool_rounds")
    )
    # Speculative turns (llm/turns.py): how long a finished answer stays replayable, how long an
    # answer nobody listens to keeps running for a replay, and how long a conversation must be
    # quiet before a side-effecting server tool may run.
    replay_window: float = Field(
        default=5.0, ge=0, le=300, validation_alias=_env("CVI_REPLAY_WINDOW", "replay_window")
    )
    replay_grace: float = Field(
        default=0.03, ge=0, le=5, validation_alias=_env("CVI_REPLAY_GRACE", "replay_grace")
    )
    side_effect_settle: float = Field(
        default=0.5,
        ge=0,
        le=30,
        validation_alias=_env("CVI_SIDE_EFFECT_SETTLE", "side_effect_settle"),
    )
    # With CVI_REDIS_URL, the listener other processes forward a conversation's turns to
    # (llm/shared_turns.py): an address they can reach; port 0 picks a free one.
    turns_host: str = Field(
        default="127.0.0.1", validation_alias=_env("CVI_TURNS_HOST", "turns_host")
    )
    turns_port: int = Field(
        default=0, ge=0, le=65535, validation_alias=_env("CVI_TURNS_PORT", "turns_port")
    )
    log_level: str = Field(default="info", validation_alias=_env("CVI_LOG_LEVEL", "log_level"))
    # Log lines on stderr: human-readable text, or JSON objects for log shippers (web/logs.py).
    log_format: Literal["text", "json"] = Field(
        default="text", validation_alias=_env("CVI_LOG_FORMAT", "log_format")
    )
    var_dir: Path = Field(default=Path("var"), validation_alias=_env("CVI_VAR_DIR", "var_dir"))
    # Conversation record, live feed and scale-out (callbacks.py, api.py, bus.py, bot/worker.py).
    callback_max_bytes: int = Field(
        default=8 * 1024 * 1024,
        validation_alias=_env("CVI_CALLBACK_MAX_BYTES", "callback_max_bytes"),
    )
    run_worker: bool = Field(default=True, validation_alias=_env("CVI_RUN_WORKER", "run_worker"))
    worker_capacity: int = Field(
        default=20, ge=1, validation_alias=_env("CVI_WORKER_CAPACITY", "worker_capacity")
    )
    lease_seconds: float = Field(
        default=15.0, gt=0, validation_alias=_env("CVI_LEASE_SECONDS", "lease_seconds")
    )
    worker_poll_interval: float = Field(
        default=1.0, gt=0, validation_alias=_env("CVI_WORKER_POLL_INTERVAL", "worker_poll_interval")
    )
    bot_name: str = Field(default="cvi-agent", validation_alias=_env("CVI_BOT_NAME", "bot_name"))
    bot_factory: str = Field(
        default="", validation_alias=_env("CVI_BOT_FACTORY", "bot_factory")
    )  # "package.module:function" building a bot (default: ConversationBot)
    # Which rooms a bot may join (rooms/policy.py): hosts (`*.x` = any subdomain), and whether
    # `ws://` local rooms on loopback are allowed. None: not set; `cvi-agent serve` in
    # development mode and `cvi-agent simulate`'s own server turn it on, otherwise it is off.
    room_hosts_raw: str = Field(
        default="*.daily.co", validation_alias=_env("CVI_ROOM_HOSTS", "room_hosts_raw")
    )
    local_rooms: bool | None = Field(
        default=None, validation_alias=_env("CVI_LOCAL_ROOMS", "local_rooms")
    )
    interaction_timeout: float = Field(
        default=5.0, gt=0, validation_alias=_env("CVI_INTERACTION_TIMEOUT", "interaction_timeout")
    )
    # Interactions (conversations/delivery.py): through Tavus's send-app-message, the bot, or
    # whichever fits the conversation; how long one may wait its turn, for a rate-limit slot, a
    # Retry-After or a retry; and the client-side limit on requests to Tavus per API key.
    interactions_via: Literal["auto", "rest", "bot"] = Field(
        default="auto", validation_alias=_env("CVI_INTERACTIONS_VIA", "interactions_via")
    )
    interaction_budget: float = Field(
        default=10.0,
        gt=0,
        le=120,
        validation_alias=_env("CVI_INTERACTION_BUDGET", "interaction_budget"),
    )
    tavus_rate_limit_rps: float = Field(
        default=10.0,
        ge=0,
        validation_alias=_env("CVI_TAVUS_RATE_LIMIT_RPS", "tavus_rate_limit_rps"),
    )
    tavus_rate_limit_burst: int = Field(
        default=10,
        ge=1,
        validation_alias=_env("CVI_TAVUS_RATE_LIMIT_BURST", "tavus_rate_limit_burst"),
    )
    # Access control (security.py): per-key token bucket (per process; 0 = off) and CORS.
    rate_limit_rps: float = Field(
        default=100.0, ge=0, validation_alias=_env("CVI_RATE_LIMIT_RPS", "rate_limit_rps")
    )
    rate_limit_burst: int = Field(
        default=200, ge=1, validation_alias=_env("CVI_RATE_LIMIT_BURST", "rate_limit_burst")
    )
    cors_origins_raw: str = Field(
        default="", validation_alias=_env("CVI_CORS_ORIGINS", "cors_origins_raw")
    )
    # Per key and process besides the request count (security.py): request bytes per second
    # (a token bucket; its burst is at least one largest body) and requests in flight, a
    # streaming reply or live feed holding its slot until it ends. 0 = off.
    rate_limit_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=0,
        validation_alias=_env("CVI_RATE_LIMIT_BYTES", "rate_limit_bytes"),
    )
    rate_limit_bytes_burst: int = Field(
        default=8 * 1024 * 1024,
        ge=0,
        validation_alias=_env("CVI_RATE_LIMIT_BYTES_BURST", "rate_limit_bytes_burst"),
    )
    rate_limit_concurrent: int = Field(
        default=500,
        ge=0,
        validation_alias=_env("CVI_RATE_LIMIT_CONCURRENT", "rate_limit_concurrent"),
    )
    # Connections (web/connections.py, web/server.py): deadlines for a request's headers and
    # declared body, and the cap on open connections per process (0 = off).
    header_timeout: float = Field(
        default=10.0, ge=0, validation_alias=_env("CVI_HEADER_TIMEOUT", "header_timeout")
    )
    body_timeout: float = Field(
        default=30.0, ge=0, validation_alias=_env("CVI_BODY_TIMEOUT", "body_timeout")
    )
    max_connections: int = Field(
        default=1000, ge=0, validation_alias=_env("CVI_MAX_CONNECTIONS", "max_connections")
    )

    @model_validator(mode="after")
    def _database_in_var_dir(self) -> Settings:
        """Without CVI_DATABASE_URL, the database is `cvi-agent.db` in CVI_VAR_DIR (local state
        lives in one place); an explicit URL always wins."""
        if not self.database_url:
            path = self.var_dir / "cvi-agent.db"
            shown = str(path) if path.is_absolute() else f"./{path}"
            self.database_url = f"sqlite+aiosqlite:///{shown}"
        return self

    @cached_property
    def api_keys(self) -> tuple[str, ...]:
        return tuple(k.strip() for k in self.api_keys_raw.split(",") if k.strip())

    @cached_property
    def room_hosts(self) -> tuple[str, ...]:
        """Host names (lower case; `*.example.com` for any subdomain) a bot may join."""
        return tuple(h.strip().lower() for h in self.room_hosts_raw.split(",") if h.strip())

    @cached_property
    def cors_origins(self) -> tuple[str, ...]:
        """Browser origins allowed to call the API cross-origin (none: CORS stays closed)."""
        return tuple(o.strip().rstrip("/") for o in self.cors_origins_raw.split(",") if o.strip())

    @cached_property
    def callback_tokens(self) -> tuple[str, ...]:
        """Accepted callback tokens (comma list, so a token can be rotated); the first is used
        in the callback URLs we hand to Tavus."""
        return tuple(t.strip() for t in self.callback_token.split(",") if t.strip())


def mask_key(key: str) -> str:
    """A key as it may appear in logs: never more than its first few characters."""
    if len(key) <= 8:
        return "***"
    return key[:6] + "…" + f"({len(key)} chars)"


def ensure_dev_key(settings: Settings) -> str | None:
    """With no CVI_API_KEYS, use (and persist under var/) one generated development key.

    Returns the generated key so the caller can print it once, or None when keys were configured.
    """
    if settings.api_keys:
        return None
    path = settings.var_dir / "dev-api-key"
    key = ""
    if path.exists():
        key = path.read_text().strip()
    if not key:
        key = "cvi-dev-" + secrets.token_urlsafe(24)
        settings.var_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(key + "\n")
        path.chmod(0o600)
    settings.api_keys_raw = key
    settings.__dict__.pop("api_keys", None)
    return key


def ensure_dev_callback_token(settings: Settings) -> str | None:
    """Development mode (the caller generated the dev API key): without CVI_CALLBACK_TOKEN, use
    one generated callback token persisted under var/, like the dev key. Outside development
    mode the token must be configured: until it is, the callback endpoint answers 503.
    """
    if settings.callback_tokens:
        return None
    path = settings.var_dir / "callback-token"
    token = path.read_text().strip() if path.exists() else ""
    if not token:
        token = "cvi-cb-" + secrets.token_urlsafe(24)
        settings.var_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(token + "\n")
        path.chmod(0o600)
    settings.callback_token = token
    settings.__dict__.pop("callback_tokens", None)
    return token
