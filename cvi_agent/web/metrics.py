"""`GET /metrics`: the process's Prometheus metrics in the text format (same API keys as
every other route)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST

from cvi_agent.metrics import render
from cvi_agent.web.auth import require_key

router = APIRouter(dependencies=[Depends(require_key)])


@router.get("/metrics", summary="Prometheus metrics (text format)", tags=["ops"])
async def metrics() -> Response:
    return Response(render(), media_type=CONTENT_TYPE_LATEST)
