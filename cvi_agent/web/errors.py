"""Every error we answer, in the OpenAI shape `{"error": {message, type, code, param}}`.

`ApiError` is raised anywhere below a route; the handlers installed by `install_error_handlers`
turn it, FastAPI's own errors and anything unexpected into that shape (never a stack trace).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cvi_agent.protocol.chat import error_payload
from cvi_agent.web.access import facts_of
from cvi_agent.web.request_id import REQUEST_ID_SCOPE_KEY

log = logging.getLogger(__name__)

# OpenAI's `type` per status: a request the caller can fix is an `invalid_request_error`
# (404 `model_not_found` and 409 included), and OpenAI answers its own failures with
# `server_error`. Clients branch on the status (the SDKs pick their exception class by it);
# the type is for people and logs, so it must read the same as OpenAI's.
_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}
_SERVER_TYPE = "server_error"


class ApiError(Exception):
    """An error answered in the OpenAI shape `{"error": {message, type, code, param}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        type_: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type_ or error_type(status)
        self.headers = headers

    def payload(self) -> dict[str, Any]:
        """The body: `{"error": {message, type, code, param}}`."""
        return error_payload(self.message, self.type, self.code, self.param)

    def response(self) -> JSONResponse:
        return JSONResponse(self.payload(), status_code=self.status, headers=self.headers)


def error_type(status: int) -> str:
    """OpenAI's error `type` for an HTTP status."""
    if status >= 500:
        return _SERVER_TYPE
    return _STATUS_TYPES.get(status, "invalid_request_error")


def error_response(
    status: int, message: str, code: str | None = None, param: str | None = None
) -> JSONResponse:
    return ApiError(status, message, code, param).response()


def validation_message(errors: list[Any]) -> tuple[str, str | None]:
    """A short human message and the offending parameter from pydantic errors."""
    if not errors:
        return "Invalid request.", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _union_tag(p)]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return (f"{param}: {msg}{more}" if param else f"{msg}{more}"), param


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict", "list"})


def _union_tag(part: Any) -> bool:
    """Pydantic names the member of a union that failed (`literal['none','auto']`, `str`,
    `dict[str,any]`) in the error's location; the caller's parameter is the field."""
    return isinstance(part, str) and ("[" in part or part in _TYPE_TAGS)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        facts = facts_of(request.scope)
        if facts is not None:
            facts.reason = exc.code  # the request log says why (web/access.py)
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "HTTP error"
        if exc.status_code == 404 and message == "Not Found":
            message = f"No route for {request.method} {request.url.path}."
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        facts = facts_of(request.scope)
        if facts is not None:
            facts.reason = code
        return ApiError(
            exc.status_code, message, code, headers=getattr(exc, "headers", None)
        ).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(exc.errors()))
        return ApiError(400, message, "invalid_request", param).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The route's template, never the concrete path: a path can carry a secret (the
        # Argil callback token sits in `/callbacks/argil/{token}`).
        route = request.scope.get("route")
        where = getattr(route, "path", None) or "an unmatched route"
        log.exception("unhandled error on %s %s", request.method, where)
        # Outside every middleware (Starlette's ServerErrorMiddleware): say the request id here.
        request_id = request.scope.get(REQUEST_ID_SCOPE_KEY)
        return ApiError(
            500,
            "Internal server error.",
            "internal_error",
            headers={"x-request-id": request_id} if request_id else None,
        ).response()
