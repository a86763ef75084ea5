"""The engine: the one place where a request meets the cache.

Request path (``chat``):

    resolve + tokenize segments      (errors raised here, before any compute)
    walk the tenant's tree            matched = units[0:h]           -> pinned
    copy matched KV into a buffer     slots [0, p_h)
    prefill missing units one by one  slots [p_h, p_n), a node inserted (pinned) after each
    prefill the tail                  slots [p_n, P)  (always >= 1 token: fresh logits)
    decode                            slots [P, P + completion)
    unpin everything                  on success, error and cancellation alike

Node payloads are torch tensors ``[n_layers, 2, n_kv_heads, n_tokens, head_dim]``
in the runtime's KV dtype; the tree only sees them as opaque handles.
Thread-safe: one request runs at a time (``_lock``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from segcache.config import CacheConfig, Config
from segcache.engine.detok import TextStream
from segcache.engine.prompt import Prompt, TokenMemo, Unit, group_units, resolve_segments
from segcache.engine.sampling import Sampler
from segcache.engine.types import (
    ChatRequest,
    ContextOverflowError,
    EngineError,
    GenerationResult,
    NotFoundError,
    SamplingParams,
    SegmentInput,
    SegmentUsage,
    WarmResult,
)
from segcache.kv.hashing import namespace_digest, segment_digest
from segcache.kv.registry import SegmentRegistry
from segcache.kv.segment_tree import SegmentNode, SegmentTree
from segcache.model.runtime import ModelRuntime
from segcache.model.tokenizer import ChatTokenizer, TemplateError
from segcache.model.weights import resolve_model

Callback = Callable[[str], None]
CancelCheck = Callable[[], bool]


@dataclass
class _Run:
    """One request's state between prefill and decode."""

    kv: torch.Tensor  # [n_layers, 2, n_kv_heads, capacity, head_dim]
    pos: int
    pinned: list[SegmentNode]
    usage: list[SegmentUsage]
    cached: int
    chain: str


class Engine:
    def __init__(self, runtime: ModelRuntime, tokenizer: ChatTokenizer, cache: CacheConfig,
                 model_name: str, prefill_chunk: int = 512,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.cache_cfg = cache
        self.model_name = model_name
        self.fingerprint = runtime.fingerprint
        self.context_window = runtime.arch.max_position
        self.prefill_chunk = prefill_chunk
        self.tree = SegmentTree(cache.cache_bytes, clock=clock,
                                tenant_quota_bytes=cache.tenant_quota_bytes)
        self.registry = SegmentRegistry(clock)
        self.memo = TokenMemo(tokenizer)
        self._lock = threading.RLock()

    @classmethod
    def load(cls, cfg: Config, progress: bool = True) -> Engine:
        """Find (and on first use convert) the model, then build the engine."""
        resolved = resolve_model(cfg.model.path, cfg.model.cache_dir, progress=progress)
        from segcache.model.weights import load_arch

        arch = load_arch(resolved.directory)
        tokenizer = ChatTokenizer.load(resolved.directory, arch.eos_token_ids)
        runtime = ModelRuntime.load(resolved, cfg.model, tokenizer_digest=tokenizer.digest)
        name = cfg.server.model_name or resolved.name
        return cls(runtime, tokenizer, cfg.cache, name)

    def namespace(self, tenant: str) -> str:
        return namespace_digest(tenant, self.fingerprint)

    # ------------------------------------------------------------------ requests
    def chat(self, req: ChatRequest, on_text: Callback | None = None,
             is_cancelled: CancelCheck | None = None) -> GenerationResult:
        """Generate a reply for ``req``; raises EngineError subclasses for bad input
        (before any compute)."""
        t0 = time.perf_counter()
        ns = self.namespace(req.tenant)
        with self._lock:
            prompt = self._build_prompt(req.tenant, ns, req.messages, req.segments, True)
            self._check_context(prompt.n_tokens, req.sampling.max_tokens)
            try:
                run = self._prefill_units(ns, prompt, prompt.n_tokens + req.sampling.max_tokens,
                                          is_cancelled)
            except _Cancelled:
                return GenerationResult("", "cancelled", prompt.n_tokens, 0, 0, self.namespace(req.tenant),
                                        [], 0.0, time.perf_counter() - t0)
            try:
                return self._finish(run, prompt.tail, req.sampling, t0, on_text, is_cancelled)
            finally:
                self._release(run.pinned)

    def complete(self, tenant: str, prompt: str, sampling: SamplingParams,
                 on_text: Callback | None = None,
                 is_cancelled: CancelCheck | None = None) -> GenerationResult:
        """Plain-text completion (no chat template, no segment reuse yet)."""
        t0 = time.perf_counter()
        ids = tuple(self.tokenizer.encode(prompt))
        if not ids:
            raise EngineError("prompt must not be empty", "prompt")
        self._check_context(len(ids), sampling.max_tokens)
        with self._lock:
            run = _Run(self.runtime.new_kv(len(ids) + sampling.max_tokens), 0, [], [], 0,
                       self.namespace(tenant))
            return self._finish(run, ids, sampling, t0, on_text, is_cancelled)

    def warm(self, tenant: str, segments: list[SegmentInput]) -> WarmResult:
        """Compute and cache ``segments`` (as the start of a chat prompt) without generating."""
        if not segments:
            raise EngineError("segments must not be empty", "segments")
        ns = self.namespace(tenant)
        with self._lock:
            prompt = self._build_prompt(tenant, ns, [], segments, False)
            units = Prompt(prompt.units, ())
            self._check_context(units.n_tokens, 0)
            run = self._prefill_units(ns, units, max(units.n_tokens, 1), None)
            self._release(run.pinned)
        return WarmResult(len(run.usage), run.chain, run.usage)

    # ------------------------------------------------------------------ prompt
    def _build_prompt(self, tenant: str, ns: str, messages: list[dict], segments: list[SegmentInput],
                      generation_prompt: bool) -> Prompt:
        if len(segments) > self.cache_cfg.max_segments:
            raise EngineError(f"too many segments: {len(segments)} (the limit is "
                              f"{self.cache_cfg.max_segments})", "segments")
        resolved = resolve_segments(segments, tenant, ns, self.memo, self.registry)
        try:
            parts = self.tokenizer.prompt_parts(messages, [list(s.ids) for s in resolved],
                                                generation_prompt)
        except TemplateError as exc:
            raise EngineError(str(exc), "messages") from exc
        return group_units(parts, resolved)

    def _check_context(self, prompt_tokens: int, max_tokens: int) -> None:
        if prompt_tokens + max_tokens > self.context_window:
            raise ContextOverflowError(
                f"the prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}: together "
                f"{prompt_tokens + max_tokens}, over the model's context window of "
                f"{self.context_window} tokens; shorten the prompt or lower max_tokens", "max_tokens")

    # ------------------------------------------------------------------ cache path
    def _prefill_units(self, ns: str, prompt: Prompt, capacity: int,
                       is_cancelled: CancelCheck | None) -> _Run:
        """Reuse every matched unit, compute and insert the others. Returns a run
        whose ``pinned`` nodes the caller must release."""
        self.tree.expire()
        matched = self.tree.match(ns, [u.segment.digest for u in prompt.units])
        self.tree.pin(matched)
        run = _Run(self.runtime.new_kv(capacity), 0, list(matched), [], 0, self.tree.root(ns).chain)
        try:
            for node, unit in zip(matched, prompt.units, strict=False):
                run.kv[:, :, :, run.pos:run.pos + node.n_tokens] = node.handle
                self._advance(run, node, unit, "hit")
            parent = matched[-1] if matched else self.tree.root(ns)
            for unit in prompt.units[len(matched):]:
                self._prefill(unit.ids, run.kv, run.pos, is_cancelled)
                # handle: [n_layers, 2, n_kv_heads, n_tokens, head_dim], this unit's tokens only
                handle = run.kv[:, :, :, run.pos:run.pos + len(unit.ids)].clone()
                ttl = unit.segment.ttl_s or self.cache_cfg.default_ttl_s
                parent = self.tree.insert(parent, unit.segment.digest, unit.ids, handle,
                                          handle.numel() * handle.element_size(), ttl_s=ttl)
                self.tree.pin([parent])
                run.pinned.append(parent)
                self._advance(run, parent, unit, "miss")
                self._enforce_budget(ns)
        except BaseException:
            self._release(run.pinned)
            raise
        return run

    def _advance(self, run: _Run, node: SegmentNode, unit: Unit, status: str) -> None:
        n = len(unit.ids)
        run.usage.append(SegmentUsage(unit.segment.id, unit.segment.digest, status, n))  # type: ignore[arg-type]
        if status == "hit":
            run.cached += n
        run.pos += n
        run.chain = node.chain

    def _enforce_budget(self, ns: str) -> None:
        if self.cache_cfg.tenant_quota_bytes is not None:
            self.tree.enforce_quota(ns)
        self.tree.evict_until()

    def _release(self, nodes: list[SegmentNode]) -> None:
        self.tree.unpin(nodes)
        nodes.clear()
        self.tree.evict_until()

    # ------------------------------------------------------------------ compute
    def _prefill(self, ids: tuple[int, ...], kv: torch.Tensor, start: int,
                 is_cancelled: CancelCheck | None) -> torch.Tensor:
        """Run ``ids`` at slots ``start..`` in chunks; returns the last logits [vocab]."""
        logits = None
        with torch.inference_mode():
            for c in range(0, len(ids), self.prefill_chunk):
                if is_cancelled is not None and is_cancelled():
                    raise _Cancelled()
                chunk = torch.tensor(ids[c:c + self.prefill_chunk], dtype=torch.long)
                positions = torch.arange(start + c, start + c + len(chunk))
                logits = self.runtime.prefill(chunk, positions, kv, start + c)
        assert logits is not None
        return logits[-1]

    def _finish(self, run: _Run, tail: tuple[int, ...], sampling: SamplingParams, t0: float,
                on_text: Callback | None, is_cancelled: CancelCheck | None) -> GenerationResult:
        """Prefill the tail and decode."""
        prompt_tokens = run.pos + len(tail)
        sampler = Sampler(sampling)
        stream = TextStream(self.tokenizer.decode, sampling.stop)
        finish = "length"
        ttft = 0.0
        try:
            logits = self._prefill(tail, run.kv, run.pos, is_cancelled)
            pos = prompt_tokens
            with torch.inference_mode():
                for step in range(sampling.max_tokens):
                    token = sampler.sample(logits)
                    if step == 0:
                        ttft = time.perf_counter() - t0
                    if token in self.tokenizer.eos_ids:
                        finish = "stop"
                        break
                    delta = stream.push(token)
                    if delta and on_text is not None:
                        on_text(delta)
                    if stream.stopped:
                        finish = "stop"
                        break
                    if step + 1 == sampling.max_tokens:
                        break
                    if is_cancelled is not None and is_cancelled():
                        finish = "cancelled"
                        break
                    logits = self.runtime.decode(torch.tensor([token]), torch.tensor([pos]), run.kv,
                                                 pos)[-1]
                    pos += 1
        except _Cancelled:
            finish = "cancelled"
        rest = stream.flush()
        if rest and on_text is not None:
            on_text(rest)
        return GenerationResult(
            text=stream.text, finish_reason=finish, prompt_tokens=prompt_tokens,  # type: ignore[arg-type]
            completion_tokens=len(stream.ids), cached_tokens=run.cached, chain=run.chain,
            segments=run.usage, ttft_s=ttft, total_s=time.perf_counter() - t0,
            token_ids=list(stream.ids),
        )

    # ------------------------------------------------------------------ cache control
    def cache_stats(self, tenant: str) -> dict:
        with self._lock:
            stats = self.tree.stats(self.namespace(tenant))
            stats["budget_bytes"] = self.cache_cfg.cache_bytes
            stats["tenant_quota_bytes"] = self.cache_cfg.tenant_quota_bytes
            stats["registered_segments"] = self.registry.names(tenant)
            stats["model"] = self.model_name
            stats["fingerprint"] = self.fingerprint
            return stats

    def purge(self, tenant: str) -> int:
        ns = self.namespace(tenant)
        with self._lock:
            self.memo.forget(ns)
            return len(self.tree.purge(ns))

    def metrics(self) -> dict:
        with self._lock:
            s = self.tree.stats()
            return {"resident_bytes": self.tree.resident_bytes, "nodes": len(self.tree),
                    "evictions": s.get("evictions", 0), "budget_bytes": self.cache_cfg.cache_bytes}

    def put_segment(self, tenant: str, name: str, content: str, ttl_s: float | None) -> dict:
        digest = segment_digest(content)
        with self._lock:
            try:
                entry = self.registry.put(tenant, name, content, digest, ttl_s)
            except ValueError as exc:
                raise EngineError(str(exc), "name") from exc
            ids = self.memo.ids_for(content, digest)
            self.memo.remember(self.namespace(tenant), digest)
        return self._segment_info(entry, len(ids))

    def get_segment(self, tenant: str, name: str) -> dict:
        with self._lock:
            entry = self.registry.get(tenant, name)
            if entry is None:
                raise NotFoundError(f"no segment is registered under the name {name!r}", "name")
            ids = self.memo.ids_for(entry.content, entry.digest)
        return self._segment_info(entry, len(ids))

    def _segment_info(self, entry, n_tokens: int) -> dict:
        # The registry runs on the monotonic clock; clients get wall-clock Unix time.
        expires_at = None
        if entry.expires_at is not None:
            expires_at = time.time() + (entry.expires_at - self.registry.now())
        return {"name": entry.name, "hash": entry.digest, "tokens": n_tokens,
                "bytes": len(entry.content.encode()), "expires_at": expires_at}

    def delete_segment(self, tenant: str, name: str) -> None:
        with self._lock:
            if not self.registry.delete(tenant, name):
                raise NotFoundError(f"no segment is registered under the name {name!r}", "name")


class _Cancelled(Exception):
    pass
