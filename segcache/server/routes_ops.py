"""Operational routes: health, Prometheus metrics, the live dashboard.
Health and the dashboard are open without an API key; they show cache-wide numbers
only (the dashboard page asks ``/v1/cache`` for the caller's own tenant tree, with
the caller's key). ``/metrics`` counts every tenant's traffic: once API keys are
configured it needs an admin key (``auth.require_admin``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from segcache.server.auth import require_admin
from segcache.server.dashboard import dashboard_numbers, dashboard_page
from segcache.server.state import server_state

router = APIRouter(tags=["ops"])


@router.get("/health")
async def health(request: Request) -> dict[str, str]:
    """Liveness, and the execution plan: which code computes tokens (a failed kernel build
    shows here as a dense plan with the reason)."""
    return {"status": "ok", "plan": server_state(request).engine.execution_plan}


@router.get("/metrics", dependencies=[Depends(require_admin)])
async def metrics(request: Request) -> Response:
    # Rendering asks the engine for cache gauges, which may wait for its lock.
    text = await run_in_threadpool(server_state(request).metrics.render)
    return Response(text, media_type=CONTENT_TYPE_LATEST)


@router.get("/dashboard", response_class=HTMLResponse)
async def dashboard(request: Request) -> str:
    """The live cache-tree page (self-contained HTML; it polls the JSON below)."""
    return dashboard_page(server_state(request).model_name)


@router.get("/dashboard/data")
async def dashboard_data(request: Request) -> dict[str, Any]:
    """Cache-wide numbers for the dashboard; nothing per tenant."""
    return await run_in_threadpool(dashboard_numbers, server_state(request))
