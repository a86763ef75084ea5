"""Send workload requests to an OpenAI-compatible server and time them.

HTTP only, through the real ``openai`` client (streaming, with
``stream_options.include_usage``), so segcache and any peer server are measured
the same way. What each timing means is in ``segcache.bench.metrics``.

Two prompt modes, same text:

- ``segments``: ``segments[]`` (``id``, ``hash`` = segment digest, ``content``,
  and ``reuse: "anywhere"`` for the request's ``anywhere`` segments) in
  ``extra_body``, and the workload's messages;
- ``flat``: the segments joined with a blank line into one system message, what
  a server without the extension receives.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import openai

from segcache.bench.metrics import RequestRecord
from segcache.bench.workloads import BenchRequest
from segcache.kv.hashing import segment_digest

MODES = ("segments", "flat")
COLD_STRATEGIES = ("auto", "purge", "nonce")


def request_body(req: BenchRequest, mode: str, nonce: str | None = None) -> tuple[list[dict], dict]:
    """(messages, extra_body) of ``req`` in ``mode``. A ``nonce`` makes the prompt
    new to any cache: it is put in front of every segment in ``segments`` mode (a
    non-prefix cache could reuse any one of them where it stands), in front of
    the system message in ``flat`` mode."""
    segments = list(req.segments)
    if nonce is not None:
        marked = range(len(segments)) if mode == "segments" else range(min(1, len(segments)))
        for n in marked:
            seg_id, content = segments[n]
            segments[n] = (seg_id, f"[{nonce}]\n{content}")
    if mode == "segments":
        extra = {"segments": [_segment(i, c, i in req.anywhere) for i, c in segments]}
        return list(req.messages), extra
    if mode == "flat":
        system = "\n\n".join(c for _, c in segments)
        return [{"role": "system", "content": system}, *req.messages], {}
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _segment(seg_id: str, content: str, anywhere: bool) -> dict:
    seg = {"id": seg_id, "hash": segment_digest(content), "content": content}
    if anywhere:
        seg["reuse"] = "anywhere"
    return seg


def new_nonce() -> str:
    return f"run {uuid.uuid4().hex[:16]}"


@dataclass(frozen=True)
class Target:
    """Where and how to send requests."""

    url: str = "http://127.0.0.1:8000/v1"
    api_key: str | None = None
    model: str | None = None  # None: the first id of GET /models
    mode: str = "segments"
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")


class Runner:
    """Sends requests to one ``Target``; thread-safe (the clients are)."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.base = target.url.rstrip("/")
        headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
        self.http = httpx.Client(headers=headers, timeout=target.timeout_s)
        self.client = openai.OpenAI(base_url=self.base, api_key=target.api_key or "none",
                                    max_retries=0, timeout=target.timeout_s)
        self.model = target.model or self._first_model()

    def close(self) -> None:
        self.http.close()
        self.client.close()

    def _first_model(self) -> str:
        models = self.client.models.list().data
        if not models:
            raise RuntimeError(f"{self.base}/models lists no model; pass --model")
        return models[0].id

    def purge(self) -> bool:
        """``DELETE /cache`` (segcache's purge of this tenant's KV). False where the
        server has no such route."""
        response = self.http.delete(f"{self.base}/cache")
        return response.is_success

    def send(self, req: BenchRequest, index: int, phase: str = "run", origin: float | None = None,
             nonce: str | None = None) -> RequestRecord:
        """Stream one request and measure it; errors are recorded, never raised."""
        messages, extra = request_body(req, self.target.mode, nonce)
        rec = RequestRecord(index=index, label=req.label, agent=req.agent, turn=req.turn,
                            mode=self.target.mode, phase=phase)
        t0 = time.perf_counter()
        rec.started_s = t0 - origin if origin is not None else 0.0
        first = last = None
        pieces: list[str] = []
        usage = None
        try:
            stream = self.client.chat.completions.create(
                model=self.model, messages=messages, max_tokens=req.max_tokens, temperature=0,
                stream=True, stream_options={"include_usage": True}, extra_body=extra or None)
            for chunk in stream:
                now = time.perf_counter()
                usage = chunk.usage or usage
                text = "".join(c.delta.content or "" for c in chunk.choices if c.delta)
                if text:
                    first = first if first is not None else now
                    last = now
                    pieces.append(text)
        except (openai.OpenAIError, httpx.HTTPError) as exc:
            rec.error = f"{type(exc).__name__}: {exc}"
        rec.e2e_s = time.perf_counter() - t0
        rec.text = "".join(pieces)
        if first is not None:
            rec.ttft_s = first - t0
        _read_usage(rec, usage)
        if rec.error is None and first is None and usage is None:
            # Neither text nor usage: the server dropped the request (llama-cpp-python
            # does so when a newer request interrupts it).
            rec.error = "empty stream: no text and no usage"
        if first is not None and rec.completion_tokens and rec.completion_tokens > 1:
            rec.itl_s = (last - first) / (rec.completion_tokens - 1)
        return rec


def _read_usage(rec: RequestRecord, usage) -> None:
    if usage is None:
        return
    extra = usage.model_extra or {}
    rec.prompt_tokens = usage.prompt_tokens
    rec.completion_tokens = usage.completion_tokens
    details = usage.prompt_tokens_details
    rec.cached_prefix_tokens = extra.get("cached_prefix_tokens")
    if details is not None and details.cached_tokens is not None:
        rec.cached_tokens = details.cached_tokens
    else:
        rec.cached_tokens = rec.cached_prefix_tokens if rec.cached_prefix_tokens is not None else 0
    segcache = extra.get("segcache")
    if not isinstance(segcache, dict):
        return
    if isinstance(segcache.get("segments"), list):
        rec.segments = segcache["segments"]
    # Non-prefix reuse (blend): absent on servers without it.
    rec.blended_tokens = _int_or_none(segcache.get("blended_tokens"))
    rec.recomputed_tokens = _int_or_none(segcache.get("recomputed_tokens"))


def _int_or_none(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


OnDone = Callable[[RequestRecord], None]


COLD_EACH = (None, "purge", "nonce")


def run_requests(runner: Runner, requests: list[BenchRequest], concurrency: int = 1,
                 on_done: OnDone | None = None, cold_each: str | None = None) -> tuple[list[RequestRecord], float]:
    """Send every request (in order when ``concurrency`` is 1); (records in request
    order, wall seconds). ``cold_each`` makes every request cold, i.e. the
    server's cache disabled in effect: ``purge`` before each request (sequential
    only), or a fresh ``nonce`` in front of each (any server, any concurrency)."""
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    if cold_each not in COLD_EACH:
        raise ValueError(f"cold_each must be one of {COLD_EACH}, got {cold_each!r}")
    if cold_each == "purge" and concurrency != 1:
        raise ValueError("purging before each request needs concurrency 1")
    origin = time.perf_counter()

    def one(i: int) -> RequestRecord:
        if cold_each == "purge" and not runner.purge():
            raise RuntimeError(f"{runner.base}/cache does not accept DELETE: cannot purge")
        nonce = new_nonce() if cold_each == "nonce" else None
        rec = runner.send(requests[i], i, "cold" if cold_each else "run", origin, nonce)
        if on_done:
            on_done(rec)
        return rec

    if concurrency == 1:
        records = [one(i) for i in range(len(requests))]
    else:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            records = list(pool.map(one, range(len(requests))))
    return records, time.perf_counter() - origin


def run_cold_vs_warm(runner: Runner, requests: list[BenchRequest], cold: str = "auto",
                     on_done: OnDone | None = None) -> tuple[list[RequestRecord], float]:
    """Each request twice, back to back: cold, then warm (the same request again).

    Cold means nothing of the prompt is cached: ``purge`` empties the server's
    cache first (``DELETE /cache``, segcache); ``nonce`` puts a fresh marker in
    front of the prompt instead (any server; cold and warm share the nonce);
    ``auto`` purges where the server allows it, else uses a nonce.
    """
    if cold not in COLD_STRATEGIES:
        raise ValueError(f"cold must be one of {COLD_STRATEGIES}, got {cold!r}")
    origin = time.perf_counter()
    use_purge = cold in ("auto", "purge") and runner.purge()
    if cold == "purge" and not use_purge:
        raise RuntimeError(f"{runner.base}/cache does not accept DELETE: use --cold nonce")
    records = []
    for i, req in enumerate(requests):
        nonce = None
        if use_purge:
            runner.purge()
        else:
            nonce = new_nonce()
        for phase in ("cold", "warm"):
            rec = runner.send(req, i, phase, origin, nonce)
            records.append(rec)
            if on_done:
                on_done(rec)
    return records, time.perf_counter() - origin
