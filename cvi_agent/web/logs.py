"""Logging for every command: one format, and one filter that masks credentials in whatever any
logger prints — ours, uvicorn's access and error logs, httpx, httpcore, websockets.

The filter sits on handlers, not loggers: a logger's own filters never see the records its
children propagate (`httpx`, `websockets.server`, `uvicorn.error` all end at some handler), while
every printed line passes through a handler. `install_log_filters` puts it on every handler that
exists (and on `logging.lastResort`, which prints warnings when nothing is configured); the
dictConfig of `log_config` declares it, so uvicorn, which (re)configures logging from that dict in
every worker process, keeps it. The app installs it again when it is created (`create_app`), which
covers `uvicorn cvi_agent.app:create_app --factory` with uvicorn's own logging config.

What is masked: every value `protocol/redact.py` recognises by its shape (query parameters such as
`key`, `token`, `t`, `signature`; `Authorization`, `x-api-key`, signature and websocket-protocol
headers; `Bearer …`; URL passwords; JWTs), and every configured secret wherever it appears
(`configured_secrets`: API keys, callback tokens, the upstream, Tavus, Argil and JoggAI keys and
the JoggAI webhook secret) — the second catches what no shape gives away, such as an upstream
error message quoting our key back. The message is checked after `%` formatting, argument by
argument first (so formatters that read `record.args`, like uvicorn's access formatter, keep
working) and whole afterwards; tracebacks and stack traces too. Cost: a few regular-expression
scans per printed line, none for lines below the level (they are never built).
"""

from __future__ import annotations

import json
import logging
import logging.config
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from cvi_agent.config import Settings
from cvi_agent.personas import Persona
from cvi_agent.protocol.redact import MASK, redact_text
from cvi_agent.web.access import REDACTED_MARK
from cvi_agent.web.request_id import RequestIdFormatter, current_request_id

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Shorter configured values are left to the shape rules (masking every "abc" would ruin logs).
MIN_SECRET_LENGTH = 6
#: uvicorn's line for a websocket handshake refused with an HTTP response (every implementation).
DENIAL_FORMAT = '%s - "WebSocket %s" %d'
#: The websockets library's line for the same refusal (uvicorn hands it the `uvicorn.error` logger).
REJECTED_FORMAT = "connection rejected (%d %s)"
_WITHHELD = "(a log line was withheld: it could not be checked for secrets)"
_DONE = REDACTED_MARK


class RedactingFilter(logging.Filter):
    """Masks credentials in a record, in place, and lets it through.

    Args:
        secrets: literal values to mask wherever they appear (more can be `add`ed later).
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets: tuple[str, ...] = ()
        self.add(*secrets)

    def add(self, *secrets: str) -> None:
        """Mask these values too (the longest first, so one that contains another goes whole)."""
        known = set(self._secrets)
        known.update(s for s in secrets if len(s) >= MIN_SECRET_LENGTH)
        self._secrets = tuple(sorted(known, key=len, reverse=True))

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return redact_text(text)

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, _DONE, False):  # the same record reaches several handlers
            return True
        try:
            self._redact_record(record)
        except Exception:  # never let a log call fail, never print what could not be checked
            record.msg, record.args = _WITHHELD, ()
            record.exc_info = record.exc_text = record.stack_info = None
        setattr(record, _DONE, True)
        return True

    def _redact_record(self, record: logging.LogRecord) -> None:
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        args = record.args
        if isinstance(args, Mapping):
            record.args = {k: self._arg(v) for k, v in args.items()}
        elif args:
            record.args = tuple(self._arg(a) for a in args)
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: logging reports it, with what we give it
            record.msg = self.redact(str(record.msg))
            return
        clean = self.redact(message)
        if clean != message:
            record.msg, record.args = clean, ()

    def _arg(self, value: Any) -> Any:
        """An argument as it may be printed; unchanged (same type) when it holds no secret."""
        if value is None or isinstance(value, int | float):
            return value
        text = value if isinstance(value, str) else str(value)
        clean = self.redact(text)
        return value if clean == text else clean


class DenialLines(logging.Filter):
    """Drops the status-only lines of a websocket handshake refused with a 4xx response —
    uvicorn's `"WebSocket /path" 401` and the websockets library's `connection rejected (401
    Unauthorized)`, both on `uvicorn.error`: the app logs each refusal itself, once, with its
    reason (`web/security.deny_websocket`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == DENIAL_FORMAT:
            return False
        if record.msg == REJECTED_FORMAT and isinstance(record.args, tuple) and record.args:
            status = record.args[0]
            return not (isinstance(status, int) and 400 <= status < 500)
        return True


_REDACTION = RedactingFilter()
_DENIALS = DenialLines()


def redaction_filter() -> RedactingFilter:
    """The process's one redaction filter (the factory `log_config` names for dictConfig)."""
    return _REDACTION


def denial_filter() -> DenialLines:
    return _DENIALS


def configured_secrets(
    settings: Settings, personas: Mapping[str, Persona] | None = None
) -> tuple[str, ...]:
    """Every credential the settings (and the personas' `api_key_env` variables) configure."""
    values = [
        *settings.api_keys,
        *settings.callback_tokens,
        settings.upstream_api_key,
        settings.tavus_api_key,
        settings.argil_api_key,
        settings.jogg_api_key,
        settings.jogg_webhook_secret,
    ]
    for persona in (personas or {}).values():
        brain = persona.brain
        for env in (brain.api_key_env, *(f.api_key_env for f in brain.fallbacks)):
            if env:
                values.append(os.environ.get(env, ""))
    return tuple(dict.fromkeys(v.strip() for v in values if v and v.strip()))


def _handlers() -> Iterator[logging.Handler]:
    loggers: list[logging.Logger] = [logging.getLogger()]
    loggers += [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for logger in loggers:
        yield from logger.handlers
    if logging.lastResort is not None:
        yield logging.lastResort


def install_log_filters(*secrets: str) -> RedactingFilter:
    """Mask `secrets` (and every credential-shaped value) on every handler that exists now, and
    keep one line per refused websocket handshake. Idempotent; call it again after adding
    handlers."""
    _REDACTION.add(*secrets)
    for handler in _handlers():
        handler.addFilter(_REDACTION)  # addFilter ignores a filter it already has
    logging.getLogger("uvicorn.error").addFilter(_DENIALS)
    return _REDACTION


class JsonFormatter(logging.Formatter):
    """`CVI_LOG_FORMAT=json`: one JSON object per line, for log shippers: `ts`, `level`,
    `logger`, `message`, `request_id` (during a request), the request log's fields
    (`web/access.py`) and `exc` (a traceback). It formats the record after the redaction
    filter ran, so it prints what the text format would, and the request log's fields are
    checked here (they are not part of the message)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or current_request_id()
        if request_id:
            out["request_id"] = request_id
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            clean = getattr(record, "fields_clean", False)
            for name, value in fields.items():
                if isinstance(value, str) and not clean:
                    value = _REDACTION.redact(value)
                out[name] = value
        if record.exc_text or record.exc_info:
            out["exc"] = record.exc_text or self.formatException(record.exc_info)  # type: ignore[arg-type]
        return json.dumps(out, ensure_ascii=False, default=str)


def _level(name: str) -> str:
    upper = name.upper()
    return upper if isinstance(logging.getLevelName(upper), int) else "INFO"


def log_config(level: str, fmt: str = "text") -> dict[str, Any]:
    """The dictConfig for a whole server process: one stderr handler with the redaction filter on
    the root logger; uvicorn's loggers print through it (`uvicorn.run(log_config=…)`, so worker
    processes get the same). `fmt`: `text` (`FORMAT`, then ` request_id=…`) or `json` (one
    object per line, `JsonFormatter`)."""
    lvl = _level(level)
    formatter = JsonFormatter if fmt == "json" else RequestIdFormatter
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {
            "redact": {"()": f"{__name__}.redaction_filter"},
            "denials": {"()": f"{__name__}.denial_filter"},
        },
        # A line written while a request is handled ends with its x-request-id.
        "formatters": {
            "default": {
                "class": f"{formatter.__module__}.{formatter.__name__}",
                "format": FORMAT,
            }
        },
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "default",
                "filters": ["redact"],
            }
        },
        "loggers": {
            "uvicorn": {"level": lvl, "handlers": [], "propagate": True},
            "uvicorn.error": {"level": lvl, "filters": ["denials"]},
            "uvicorn.access": {"level": lvl, "handlers": [], "propagate": True},
        },
        "root": {"level": lvl, "handlers": ["default"]},
    }


def configure_logging(level: str, *secrets: str, fmt: str = "text") -> None:
    """Root logging for a command (on stderr at `level`, `fmt` as in `log_config`), with the
    filters installed."""
    logging.config.dictConfig(log_config(level, fmt))
    install_log_filters(*secrets)
