"""OpenAI's error `type` per status (web/errors.py), on the wire."""

from __future__ import annotations

import httpx
import pytest

from cvi_agent.devtools.fakes.server import LoopbackServer
from cvi_agent.web.errors import error_type
from tests.support import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "invalid_request_error"),
        (409, "invalid_request_error"),
        (413, "invalid_request_error"),
        (415, "invalid_request_error"),
        (422, "invalid_request_error"),
        (429, "rate_limit_error"),
        (500, "server_error"),
        (502, "server_error"),
        (503, "server_error"),
        (504, "server_error"),
    ],
)
def test_type_per_status(status: int, kind: str) -> None:
    """Fails before: 404 `not_found_error`, 409 `conflict_error`, 502 `upstream_error`, 503
    `service_unavailable`, 504 and 500 `api_error`."""
    assert error_type(status) == kind


async def test_types_on_the_wire(server: LoopbackServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        missing = await http.get("/v1/models/ghost", headers=AUTH)
        no_route = await http.get("/nothing", headers=AUTH)
        no_key = await http.get("/v1/models")
        unknown = await http.get("/api/conversations/nope", headers=AUTH)
    for resp, status, kind in [
        (missing, 404, "invalid_request_error"),
        (no_route, 404, "invalid_request_error"),
        (no_key, 401, "authentication_error"),
        (unknown, 404, "invalid_request_error"),
    ]:
        assert resp.status_code == status
        assert resp.json()["error"]["type"] == kind
