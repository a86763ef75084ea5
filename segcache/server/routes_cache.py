"""segcache's cache controls: warm, the named segment registry, stats and purge.
Every call is scoped to the caller's tenant."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from segcache.server.auth import require_tenant
from segcache.server.protocol import PutSegmentRequest, WarmRequest
from segcache.server.state import server_state

router = APIRouter(prefix="/v1", tags=["cache"])


@router.post("/cache/warm")
async def warm(
    body: WarmRequest, request: Request, tenant: str = Depends(require_tenant)
) -> dict[str, Any]:
    state = server_state(request)
    segments = body.to_engine(state.cache_cfg.max_segments)
    result = await run_in_threadpool(state.engine.warm, tenant, segments)
    return {
        "cached_segments": result.cached_segments,
        "root_hash": result.root_hash,
        "segments": [s.as_dict() for s in result.segments],
    }


@router.get("/cache")
async def cache_stats(request: Request, tenant: str = Depends(require_tenant)) -> dict[str, Any]:
    return await run_in_threadpool(server_state(request).engine.cache_stats, tenant)


@router.delete("/cache")
async def purge(request: Request, tenant: str = Depends(require_tenant)) -> dict[str, Any]:
    removed = await run_in_threadpool(server_state(request).engine.purge, tenant)
    return {"purged_nodes": removed}


@router.put("/segments/{name}")
async def put_segment(
    name: str, body: PutSegmentRequest, request: Request, tenant: str = Depends(require_tenant)
) -> dict[str, Any]:
    engine = server_state(request).engine
    return await run_in_threadpool(engine.put_segment, tenant, name, body.content, body.ttl)


@router.get("/segments/{name}")
async def get_segment(
    name: str, request: Request, tenant: str = Depends(require_tenant)
) -> dict[str, Any]:
    return await run_in_threadpool(server_state(request).engine.get_segment, tenant, name)


@router.delete("/segments/{name}")
async def delete_segment(
    name: str, request: Request, tenant: str = Depends(require_tenant)
) -> dict[str, Any]:
    await run_in_threadpool(server_state(request).engine.delete_segment, tenant, name)
    return {"name": name, "deleted": True}
