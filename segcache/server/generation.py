"""Running one engine request from the event loop, holding no thread while it
generates.

The engine checks and tokenizes a request in the caller's thread, then queues it
and hands back a future (``EngineClient.submit_chat`` / ``submit_complete``); it
calls ``on_text(delta)`` from its own thread as tokens come. ``EngineRun`` runs
the submission in the thread pool (a few milliseconds of tokenizing), awaits the
future on the event loop, and turns the callbacks into an ordered stream of
events::

    ("text", delta) ... then exactly one of ("done", GenerationResult) / ("error", exc)

Ordering holds because every text event is posted with
``loop.call_soon_threadsafe`` from the engine thread before that thread resolves
the future, whose completion reaches the loop the same way. ``cancel()`` makes
the engine's ``is_cancelled()`` return True; the engine then stops at its next
check and releases its pins. A run whose client is gone is cancelled, never
abandoned while still computing. An open stream costs an asyncio task, no thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future
from typing import Any

import anyio.to_thread
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from segcache.engine.types import Choice, EngineClient, GenerationResult, SamplingParams, TextDelta

log = logging.getLogger(__name__)

OnText = Callable[[str], None]
IsCancelled = Callable[[], bool]
# An engine request: given the callbacks, its result once generated.
EngineCall = Callable[[OnText, IsCancelled], Awaitable[GenerationResult]]
# What an EngineCall starts: checks, tokenizes and queues (blocking, briefly), then a future.
EngineSubmit = Callable[[OnText, IsCancelled], Future]


# Submissions (tokenizing) and the cache routes run in worker threads; generation holds none.
MIN_WORKER_THREADS = 64


async def submitted(submit: EngineSubmit, on_text: OnText, is_cancelled: IsCancelled) -> GenerationResult:
    """Run ``submit`` in a worker thread, then await its future on the loop."""
    future = await run_in_threadpool(submit, on_text, is_cancelled)
    return await asyncio.wrap_future(future)


class EngineRun:
    def __init__(self, call: EngineCall) -> None:
        limiter = anyio.to_thread.current_default_thread_limiter()
        if limiter.total_tokens < MIN_WORKER_THREADS:
            limiter.total_tokens = MIN_WORKER_THREADS
        self.arrived = time.perf_counter()
        self.first_text_at: float | None = None
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._cancelled = threading.Event()
        self._task = asyncio.ensure_future(self._work(call))

    def cancel(self) -> None:
        self._cancelled.set()

    def is_cancelled(self) -> bool:
        return self._cancelled.is_set()

    async def events(self) -> AsyncIterator[tuple[str, Any]]:
        """Yields events until the terminal one (included)."""
        while True:
            kind, value = await self._events.get()
            if kind == "text" and self.first_text_at is None:
                self.first_text_at = time.perf_counter()
            yield kind, value
            if kind != "text":
                return

    async def result(self) -> GenerationResult:
        """Waits for the end, ignoring text; raises what the engine raised."""
        async for kind, value in self.events():
            if kind == "error":
                raise value
            if kind == "done":
                return value
        raise AssertionError("unreachable: events() ends with done or error")

    async def final(self) -> GenerationResult | None:
        """The result once the run has stopped, after ``events()`` was abandoned
        midway (its unread events are still queued); None if it failed."""
        while True:
            kind, value = await self._events.get()
            if kind == "done":
                return value
            if kind == "error":
                return None

    def timings(self, result: GenerationResult) -> tuple[float, float]:
        """(ttft, total) seconds from arrival; ttft falls back to the engine's own
        figure when no text was produced."""
        total = time.perf_counter() - self.arrived
        if self.first_text_at is None:
            return min(result.ttft_s, total), total
        return self.first_text_at - self.arrived, total

    async def _work(self, call: EngineCall) -> None:
        try:
            result = await call(self._on_text, self.is_cancelled)
        except BaseException as exc:  # delivered to the reader, raised there
            self._events.put_nowait(("error", exc))
        else:
            self._events.put_nowait(("done", result))

    def _on_text(self, delta: str) -> None:
        if delta or getattr(delta, "logprobs", None):  # a TextDelta may carry only logprobs
            self._post(("text", delta))

    def _post(self, event: tuple[str, Any]) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # loop closed at shutdown: nobody is listening
            self.cancel()


@contextlib.asynccontextmanager
async def cancel_on_disconnect(request: Request, run: EngineRun) -> AsyncIterator[None]:
    """While the body runs, a client disconnect cancels ``run``. Only used before
    a response starts: once streaming, the response itself notices."""

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                log.info("client disconnected; cancelling generation")
                run.cancel()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        yield
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


def chat_call(engine: EngineClient, req: Any) -> EngineCall:
    """The EngineCall of one chat request."""
    return lambda on_text, is_cancelled: submitted(
        lambda t, c: engine.submit_chat(req, on_text=t, is_cancelled=c), on_text, is_cancelled)


def complete_prompts(engine: EngineClient, tenant: str, prompts: list[str | list[int]],
                     sampling: SamplingParams) -> EngineCall:
    """One call completing ``prompts`` one after another, as one response: prompt
    ``i``'s choices get indexes ``i * n ..``, usage adds up (OpenAI's list prompts)."""

    async def call(on_text: OnText, is_cancelled: IsCancelled) -> GenerationResult:
        results: list[GenerationResult] = []
        for i, prompt in enumerate(prompts):
            base = i * sampling.n

            def shifted(delta: str, base: int = base) -> None:
                on_text(TextDelta(delta, base + getattr(delta, "choice", 0),
                                  getattr(delta, "logprobs", ())))

            results.append(await submitted(
                lambda t, c, prompt=prompt: engine.submit_complete(tenant, prompt, sampling,
                                                                   on_text=t, is_cancelled=c),
                shifted, is_cancelled))
            if results[-1].finish_reason == "cancelled":
                break
        return merge_results(results, sampling.n)

    return call


def merge_results(results: list[GenerationResult], n: int) -> GenerationResult:
    """The results of several prompts as one: the first's fields, every other
    choice re-indexed, token counts summed."""
    first = results[0]
    if len(results) == 1:
        return first
    more = list(first.more_choices)
    for i, r in enumerate(results[1:], start=1):
        more += [Choice(i * n + c.index, c.text, c.finish_reason, c.token_ids, c.tool_calls,
                        c.logprobs) for c in r.choices()]
    merged = GenerationResult(
        text=first.text, finish_reason=first.finish_reason,
        prompt_tokens=sum(r.prompt_tokens for r in results),
        completion_tokens=sum(r.completion_tokens for r in results),
        cached_tokens=sum(r.cached_tokens for r in results), chain=first.chain,
        segments=first.segments, ttft_s=first.ttft_s, total_s=sum(r.total_s for r in results),
        token_ids=first.token_ids, prefix_chain=first.prefix_chain, logprobs=first.logprobs,
        more_choices=more)
    if any(r.finish_reason == "cancelled" for r in results):
        merged.finish_reason = "cancelled"
    return merged
