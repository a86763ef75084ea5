"""OpenAI-compatible generation routes: chat and text completions, models."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from segcache.engine.types import GenerationResult
from segcache.server.auth import require_tenant
from segcache.server.generation import (
    EngineCall,
    EngineRun,
    cancel_on_disconnect,
    chat_call,
    complete_prompts,
)
from segcache.server.protocol import ChatCompletionRequest, CompletionRequest
from segcache.server.responses import ChatShaper, CompletionShaper, SSEResponse, sse_stream
from segcache.server.state import ServerState, server_state

log = logging.getLogger(__name__)
# One JSON object per request (seed 001's metrics); route it with logging config.
requests_logger = logging.getLogger("segcache.requests")


def request_record(kind: str, tenant: str, result: GenerationResult, ttft: float,
                   total: float) -> dict[str, Any]:
    return {
        "event": kind, "tenant": tenant, "prefix_hash": result.prefix_chain,
        "chain": result.chain, "tools_count": result.tools_count,
        "schema_digest": result.tools_digest, "prompt_tokens": result.prompt_tokens,
        "cached_tokens": result.cached_tokens,
        "computed_tokens": result.computed_tokens,
        "blended_tokens": result.blended_tokens,
        "completion_tokens": result.completion_tokens, "ttft_s": round(ttft, 4),
        "total_s": round(total, 4), "status": result.finish_reason,
    }

router = APIRouter(prefix="/v1", tags=["openai"])


@router.post("/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest, request: Request, tenant: str = Depends(require_tenant)
) -> Any:
    state = server_state(request)
    state.check_model(body.model)
    chat = body.to_engine(tenant, state.cache_cfg.max_segments)

    call = chat_call(state.engine, chat)
    shaper = ChatShaper(state.model_name, state.system_fingerprint, body.include_usage,
                        chat.sampling.n, chat.sampling.logprobs is not None)
    log_body = body.model_dump(exclude_none=True) if state.request_log is not None else None
    return await generate(request, state, call, shaper, bool(body.stream), tenant, log_body)


@router.post("/completions")
async def completions(
    body: CompletionRequest, request: Request, tenant: str = Depends(require_tenant)
) -> Any:
    state = server_state(request)
    state.check_model(body.model)
    prompts = body.prompt_inputs()
    sampling = body.completion_sampling()
    call = complete_prompts(state.engine, tenant, prompts, sampling)
    shaper = CompletionShaper(state.model_name, state.system_fingerprint, body.include_usage,
                              len(prompts) * sampling.n, sampling.logprobs is not None)
    return await generate(request, state, call, shaper, bool(body.stream), tenant)


def model_card(state: ServerState, name: str) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": "segcache",
        "context_window": state.engine.context_window,
        "execution_plan": state.engine.execution_plan,
    }


@router.get("/models", dependencies=[Depends(require_tenant)])
async def models(request: Request) -> dict[str, Any]:
    state = server_state(request)
    return {"object": "list", "data": [model_card(state, n) for n in state.served_names]}


@router.get("/models/{model_id:path}", dependencies=[Depends(require_tenant)])
async def model(model_id: str, request: Request) -> dict[str, Any]:
    state = server_state(request)
    state.check_model(model_id)
    return model_card(state, model_id)


async def generate(
    request: Request,
    state: ServerState,
    call: EngineCall,
    shaper: ChatShaper,
    stream: bool,
    tenant: str,
    log_body: dict[str, Any] | None = None,
) -> Response | dict[str, Any]:
    """Run ``call`` and answer with one object, or with SSE. A stream's headers
    are sent only once the first event is known, so a request the engine refuses
    outright still gets its 4xx status rather than a 200 stream with an error."""
    run = EngineRun(call)

    def finished(result: GenerationResult) -> None:
        ttft, total = run.timings(result)
        state.metrics.observe_generation(result, ttft, total)
        requests_logger.info(json.dumps(request_record(shaper.object, tenant, result, ttft, total)))
        if log_body is not None and result.finish_reason != "cancelled":
            state.request_log.write(tenant, log_body, result)

    if not stream:
        async with cancel_on_disconnect(request, run):
            result = await run.result()
        finished(result)
        return shaper.response(result)
    events = run.events()
    async with cancel_on_disconnect(request, run):
        first = await anext(events)
    if first[0] == "error":
        raise first[1]
    return SSEResponse(sse_stream(run, first, events, shaper, finished))
