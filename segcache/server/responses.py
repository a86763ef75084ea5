"""OpenAI response objects and Server-Sent Events, for chat and text completions.

A stream is ``data: <chunk json>\\n\\n`` events ending with ``data: [DONE]\\n\\n``:
for chat, a role delta first; one chunk per text piece; a final chunk with
``finish_reason``; then, when ``stream_options.include_usage`` is set, a chunk
with ``choices: []`` and ``usage`` (OpenAI's shape). An error after the stream
has started is sent as one ``data: {"error": {...}}`` event, and the stream
closes without ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Send

from segcache.engine.types import EngineError, GenerationResult, TokenLogprob
from segcache.server.errors import APIError, api_error_body, engine_error_body, error_body
from segcache.server.generation import EngineRun

log = logging.getLogger(__name__)


class ChatShaper:
    """Builds ``chat.completion`` and ``chat.completion.chunk`` objects of one request:
    one choice per generated reply (``n``), with ``logprobs`` when they were asked for."""

    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, model: str, system_fingerprint: str | None = None,
                 include_usage: bool = False, n: int = 1, logprobs: bool = False) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.system_fingerprint = system_fingerprint
        self.include_usage = include_usage
        self.n = n
        self.logprobs = logprobs

    def response(self, result: GenerationResult) -> dict[str, Any]:
        choices = []
        for c in result.choices():
            message: dict[str, Any] = {"role": "assistant", "content": c.text}
            if c.tool_calls:
                message["content"] = c.text or None
                message["tool_calls"] = c.tool_calls
            choices.append({"index": c.index, "message": message,
                            "logprobs": self._logprobs(c.logprobs or []),
                            "finish_reason": c.finish_reason})
        return self._envelope(self.object, choices, usage=result.usage())

    def start_chunks(self) -> list[dict[str, Any]]:
        return [self._chunk({"role": "assistant", "content": ""}, None, i) for i in range(self.n)]

    def text_chunk(self, delta: str) -> dict[str, Any]:
        entries = getattr(delta, "logprobs", ())
        return self._chunk({"content": str(delta)}, None, getattr(delta, "choice", 0),
                           self._logprobs(entries))

    def finish_chunks(self, result: GenerationResult) -> list[dict[str, Any]]:
        chunks = []
        for c in result.choices():
            delta: dict[str, Any] = {}
            if c.tool_calls:
                delta["tool_calls"] = [dict(call, index=i) for i, call in enumerate(c.tool_calls)]
            chunks.append(self._chunk(delta, c.finish_reason, c.index))
        return chunks

    def usage_chunk(self, result: GenerationResult) -> dict[str, Any]:
        return self._envelope(self.chunk_object, [], usage=result.usage())

    def _logprobs(self, entries: Any) -> dict[str, Any] | None:
        """OpenAI's chat shape: {"content": [{token, logprob, bytes, top_logprobs}]}."""
        if not self.logprobs:
            return None
        return {"content": [dict(_token(e), top_logprobs=[_token(t) for t in e.top])
                            for e in entries], "refusal": None}

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None, index: int = 0,
               logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "logprobs": logprobs,
                  "finish_reason": finish_reason}
        return self._stream_envelope(choice)

    def _stream_envelope(self, choice: dict[str, Any]) -> dict[str, Any]:
        extra = {"usage": None} if self.include_usage else {}
        return self._envelope(self.chunk_object, [choice], **extra)

    def _envelope(self, obj: str, choices: list[Any], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.system_fingerprint,
            "choices": choices,
            **extra,
        }


def _token(e: TokenLogprob) -> dict[str, Any]:
    return {"token": e.token, "logprob": e.logprob, "bytes": list(e.bytes)}


class CompletionShaper(ChatShaper):
    """``text_completion`` objects; chunks have the same object name, no role delta.
    Logprobs in the legacy shape: {tokens, token_logprobs, top_logprobs, text_offset},
    offsets counted in characters from the start of the choice's text."""

    object = "text_completion"
    chunk_object = "text_completion"

    def __init__(self, model: str, system_fingerprint: str | None = None,
                 include_usage: bool = False, n: int = 1, logprobs: bool = False) -> None:
        super().__init__(model, system_fingerprint, include_usage, n, logprobs)
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self._offsets = [0] * n  # streamed: characters of each choice's text so far

    def response(self, result: GenerationResult) -> dict[str, Any]:
        choices = [{"index": c.index, "text": c.text,
                    "logprobs": self._text_logprobs(c.logprobs or [], c.index),
                    "finish_reason": c.finish_reason} for c in result.choices()]
        return self._envelope(self.object, choices, usage=result.usage())

    def start_chunks(self) -> list[dict[str, Any]]:
        return []

    def text_chunk(self, delta: str) -> dict[str, Any]:
        index = getattr(delta, "choice", 0)
        logprobs = self._text_logprobs(getattr(delta, "logprobs", ()), index)
        return self._text_choice(str(delta), None, index, logprobs)

    def finish_chunks(self, result: GenerationResult) -> list[dict[str, Any]]:
        return [self._text_choice("", c.finish_reason, c.index) for c in result.choices()]

    def _text_logprobs(self, entries: Any, index: int) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                               "text_offset": []}
        for e in entries:
            out["tokens"].append(e.token)
            out["token_logprobs"].append(e.logprob)
            out["top_logprobs"].append({t.token: t.logprob for t in e.top})
            out["text_offset"].append(self._offsets[index])
            self._offsets[index] += len(e.token)
        return out

    def _text_choice(self, text: str, finish_reason: str | None, index: int = 0,
                     logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        choice = {"index": index, "text": text, "logprobs": logprobs,
                  "finish_reason": finish_reason}
        return self._stream_envelope(choice)


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


async def sse_stream(
    run: EngineRun,
    first: tuple[str, Any],
    rest: AsyncIterator[tuple[str, Any]],
    shaper: ChatShaper,
    on_done: Any,
) -> AsyncIterator[str]:
    """The SSE body of one streamed generation. ``first`` is the event already
    taken from ``rest`` (it was awaited before the response started so that an
    early refusal gets a real status code). Leaving early (the client is gone)
    cancels the run, and its result (finish_reason "cancelled") still goes to
    ``on_done`` once the engine has stopped: every generation is logged and counted."""
    finished = ended = False
    try:
        for start in shaper.start_chunks():
            yield sse(start)
        event: tuple[str, Any] | None = first
        while event is not None:
            kind, value = event
            ended = ended or kind != "text"
            if kind == "text":
                yield sse(shaper.text_chunk(value))
            elif kind == "done":
                on_done(value)
                for chunk in shaper.finish_chunks(value):
                    yield sse(chunk)
                if shaper.include_usage:
                    yield sse(shaper.usage_chunk(value))
                yield sse("[DONE]")
            else:
                yield sse(stream_error_body(value))
            event = await anext(rest, None)
        finished = True
    finally:
        if not finished:
            run.cancel()
            if not ended:
                _pending.add(task := asyncio.ensure_future(_account_cancelled(run, on_done)))
                task.add_done_callback(_pending.discard)


_pending: set[asyncio.Future] = set()  # cancelled runs being waited for (kept referenced)


async def _account_cancelled(run: EngineRun, on_done: Any) -> None:
    """Wait for a cancelled run to stop and account for its result."""
    try:
        result = await run.final()
        if result is not None:
            on_done(result)
    except Exception:  # accounting must never raise into the loop
        log.exception("could not account for a cancelled stream")


def stream_error_body(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, EngineError):
        return engine_error_body(exc)
    if isinstance(exc, APIError):
        return api_error_body(exc)
    log.error("error during a streamed generation", exc_info=exc)
    return error_body("The server had an error while generating; it has been logged.", 500)


class SSEResponse(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            # When a send fails (client gone) the iterator is left suspended;
            # closing it now runs its cleanup, which cancels the generation.
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
