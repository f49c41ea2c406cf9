"""Direct routes: a few hot `(method, path)` pairs served by plain ASGI endpoints, beside
FastAPI's routing.

FastAPI's per-request machinery (the router's scan of every route, dependency resolution,
the request object of each layer, two exception-handling wrappers around every `send`) cost
more CPU per chat request than parsing, validating and starting the answer together
(ARCHITECTURE.md, "Hot path"). `DirectRoutes` is the innermost user middleware: an exact
`(method, path)` match goes straight to its endpoint, everything else (other methods, a
trailing slash, a `root_path`) to the router as before. The FastAPI route stays registered
for the same path (the OpenAPI description, and the fallback for what is not matched here).

Whatever sits outside it is unchanged: `x-request-id`, access control and rate limits, CORS,
Starlette's `ServerErrorMiddleware` (a 500 in the OpenAI error shape), and any pure-ASGI
middleware added with `app.add_middleware` after it (a request log) sees these requests as it
sees every other. The scope carries what routing would have set: `route` (the `APIRoute`,
whose `path` is the template), `endpoint` and empty `path_params`.
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

#: `(method, path)` → the plain ASGI app that serves it and the route it stands for (what
#: routing would have put in the scope's `route`: its `path` is the template).
Endpoints = Mapping[tuple[str, str], tuple[ASGIApp, BaseRoute]]


class DirectRoutes:
    """ASGI middleware: requests for the exact `(method, path)` pairs of `endpoints` go to
    their endpoint, with their route in the scope; the rest to `app`.

    Args:
        app: the app behind it (FastAPI's exception middleware and router).
        endpoints: the direct endpoints and their routes.
    """

    def __init__(self, app: ASGIApp, endpoints: Endpoints) -> None:
        self.app = app
        self.direct = dict(endpoints)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope.get("root_path"):
            hit = self.direct.get((scope["method"], scope["path"]))
            if hit is not None:
                endpoint, route = hit
                scope["route"] = route
                scope["endpoint"] = endpoint
                scope["path_params"] = {}
                await endpoint(scope, receive, send)
                return
        await self.app(scope, receive, send)
