"""Operational routes: health, Prometheus metrics, the dashboard placeholder.
Open without an API key; they show cache-wide numbers only."""

from __future__ import annotations

import html

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from segcache.server.state import server_state

router = APIRouter(tags=["ops"])


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    # Rendering asks the engine for cache gauges, which may wait for its lock.
    text = await run_in_threadpool(server_state(request).metrics.render)
    return Response(text, media_type=CONTENT_TYPE_LATEST)


@router.get("/dashboard", response_class=HTMLResponse)
async def dashboard(request: Request) -> str:
    """Placeholder until the live cache-tree page lands: cache-wide numbers."""
    state = server_state(request)
    stats = await run_in_threadpool(state.engine.metrics)
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
        for k, v in stats.items()
    )
    title = f"segcache: {html.escape(state.model_name)}"
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head>"
        f"<body><h1>{title}</h1><table>{rows}</table>"
        "<p>Per-tenant stats: <code>GET /v1/cache</code>. Metrics: "
        "<a href='/metrics'>/metrics</a>.</p></body></html>"
    )
