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

log = logging.getLogger(__name__)

_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable",
}


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
        self.type = type_ or _STATUS_TYPES.get(status, "api_error")
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(
            error_payload(self.message, self.type, self.code, self.param),
            status_code=self.status,
            headers=self.headers,
        )


def error_response(
    status: int, message: str, code: str | None = None, param: str | None = None
) -> JSONResponse:
    return ApiError(status, message, code, param).response()


def validation_message(errors: list[Any]) -> tuple[str, str | None]:
    """A short human message and the offending parameter from pydantic errors."""
    if not errors:
        return "Invalid request.", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return (f"{param}: {msg}{more}" if param else f"{msg}{more}"), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "HTTP error"
        if exc.status_code == 404 and message == "Not Found":
            message = f"No route for {request.method} {request.url.path}."
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
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
        return ApiError(
            500, "Internal server error.", "internal_error", type_="api_error"
        ).response()
