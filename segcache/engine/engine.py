"""The engine: the one place where a request meets the cache.

Request path (``chat``), in KV slots of one buffer:

    resolve + tokenize + lay out units   errors raised here, before any compute (and a
                                          response_format / forced tool call compiled)
    walk the tenant's tree                matched = units[0:h]            -> pinned
    copy matched KV into the buffer       slots [0, p_h)
    prefill missing units one by one      slots [p_h, p_n), a node inserted (pinned) after each
    prefill the tail                      slots [p_n, P)  (always >= 1 token: fresh logits)
    decode                                slots [P, P + completion); choices 1..n-1 in
                                          copies of slots [0, P) (``engine.decode``)
    keep the reply                        tail + generated ids -> a node keyed by the reply
                                          message's digest (only for a clean finish), per choice
    unpin everything                      on success, error and cancellation alike

Units are explicit segments, the tools block and each message (see
``segcache.engine.prompt``). Node payloads are torch tensors
``[n_layers, 2, n_kv_heads, n_tokens, head_dim]`` in the runtime's KV dtype; the
tree only sees them as opaque handles.

Every request runs as a generator on the engine thread (``segcache.engine.scheduler``):
it yields the model work it needs (prefill of a unit, one decode step, or a wait
for a unit another request is computing right now) and the scheduler batches and
interleaves that work across requests. The public methods block the calling
thread until their request is done; the tree, radix, registry and memo are only
touched under ``_lock`` (held by the engine thread during each step). Prompts are
built (tokenized) in the request's own thread under no engine-wide lock (the memo
and registry lock themselves briefly), after the scheduler reserved the request a
place in its queue: a full queue or a tenant past its share is refused before any
tokenizing, and so is text too long for the context window by its length alone.
"""

from __future__ import annotations

import math
import re
import threading
import time
import weakref
from collections.abc import Callable, Generator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from segcache.config import CacheConfig, Config, SchedulerConfig
from segcache.engine.blend import Blending
from segcache.engine.cache_control import CacheControl
from segcache.engine.decode import Decoder, Sequence
from segcache.engine.detok import TextStream
from segcache.engine.grammar import Constraint, Grammars, grammar_for
from segcache.engine.prompt import Prompt, TokenMemo, Unit, build_prompt, resolve_segments, sink_ids
from segcache.engine.sampling import Sampler
from segcache.engine.scheduler import (
    BlendWork,
    Cancelled,
    DecodeWork,
    Job,
    PrefillWork,
    Scheduler,
    WaitFor,
)
from segcache.engine.tiering import Tiering
from segcache.engine.toolcalls import ToolCallFilter, parse_tool_calls
from segcache.engine.types import (
    ChatRequest,
    Choice,
    ContextOverflowError,
    EngineError,
    GenerationResult,
    SamplingParams,
    SegmentInput,
    SegmentUsage,
    TextDelta,
    WarmResult,
)
from segcache.kv.autoseg import message_digest
from segcache.kv.hashing import namespace_digest
from segcache.kv.partial import reusable_tokens
from segcache.kv.radix import RadixTree
from segcache.kv.registry import SegmentRegistry
from segcache.kv.segment_tree import SegmentNode, SegmentTree
from segcache.kv.tiers import fingerprint_with
from segcache.model.runtime import KV_LAYOUT_VERSION, ModelRuntime
from segcache.model.tokenizer import ChatTokenizer, TemplateError
from segcache.model.weights import load_arch, resolve_model

Callback = Callable[[str], None]
CancelCheck = Callable[[], bool]


_NO_ROWS = torch.empty(0, dtype=torch.long)  # logits_at for a chunk whose logits nobody reads


class _Runner:
    """Executes the scheduler's model work on the runtime."""

    def __init__(self, runtime: ModelRuntime) -> None:
        self.runtime = runtime
        # Prefill speed (FLOP/s, moving average of measured chunks), to size slices;
        # starts low (more, shorter slices) until the first chunks are measured.
        self.flops_per_s = 30e9

    def prefill(self, work: PrefillWork, n: int, pause_s: float | None = None) -> None:
        """The next chunk of ``n`` tokens of ``work``; with ``pause_s``, only its next
        slice of layers, sized to take about ``pause_s`` at the measured speed."""
        if isinstance(work, BlendWork):
            self._blend(work, pause_s)
            return
        arch = self.runtime.arch
        a = work.done
        if work.slices is None:
            b = min(a + n, len(work.ids))
            per = arch.n_layers
            if pause_s is not None:
                est_s = arch.prefill_flops(b - a, work.start + a) / self.flops_per_s
                per = math.ceil(arch.n_layers / max(1, math.ceil(est_s / pause_s)))
            ids = torch.tensor(work.ids[a:b], dtype=torch.long)
            positions = torch.arange(work.start + a, work.start + b)
            # Only the last row of a prompt whose logits are wanted goes through the LM head.
            rows = None if b == len(work.ids) and work.need_logits else _NO_ROWS
            if per >= arch.n_layers:  # the whole chunk now
                t0 = time.perf_counter()
                with torch.inference_mode():
                    logits = self.runtime.prefill(ids, positions, work.kv, work.start + a, rows)
                self._measure(work, b, arch.n_layers, t0)
                self._chunk_done(work, b, logits)
                return
            work.slices = (b, self.runtime.prefill_steps(ids, positions, work.kv, work.start + a, per,
                                                         rows), 0)
        b, steps, before = work.slices
        t0 = time.perf_counter()
        layer, logits = _step(steps, arch.n_layers)
        self._measure(work, b, layer - before, t0)
        if logits is None:
            work.slices = (b, steps, layer)
        else:
            work.slices = None
            self._chunk_done(work, b, logits)

    def _blend(self, work: BlendWork, pause_s: float | None) -> None:
        """Run ``work`` layer by layer: to the end, or with ``pause_s`` until the next
        layer would take it past ``pause_s`` (at least one layer per call)."""
        if work.slices is None:
            work.slices = (len(work.ids), self.runtime.blend_steps(
                torch.tensor(work.ids, dtype=torch.long),
                torch.arange(work.start, work.start + len(work.ids)), work.kv, work.start,
                work.reused, work.layer, work.ratio), 0)
        steps, n_layers = work.slices[1], self.runtime.arch.n_layers
        t0 = last = time.perf_counter()
        while (done := _step(steps, n_layers))[1] is None:
            now = time.perf_counter()
            if pause_s is not None and (now - t0) + (now - last) > pause_s:
                return
            last = now
        logits, work.recomputed = done[1]
        work.slices = None
        work.done, work.logits = len(work.ids), logits[-1]

    def _measure(self, work: PrefillWork, b: int, layers: int, t0: float) -> None:
        """Update the prefill speed from ``layers`` layers of the chunk ``done..b``."""
        arch, a = self.runtime.arch, work.done
        if b - a >= 64:  # smaller chunks measure overhead, not speed
            flops = arch.prefill_flops(b - a, work.start + a) * layers / arch.n_layers
            rate = flops / max(time.perf_counter() - t0, 1e-6)
            self.flops_per_s += 0.3 * (rate - self.flops_per_s)

    @staticmethod
    def _chunk_done(work: PrefillWork, b: int, logits: torch.Tensor) -> None:
        work.done = b
        if work.remaining == 0 and work.need_logits:
            work.logits = logits[-1]

    def decode(self, works: list[DecodeWork]) -> None:
        with torch.inference_mode():
            batch = getattr(self.runtime, "decode_batch", None)
            if batch is not None and len(works) > 1:
                logits = batch([w.token for w in works], [w.pos for w in works],
                               [w.kv for w in works])
                for w, row in zip(works, logits, strict=True):
                    w.logits = row
                return
            for w in works:
                w.logits = self.runtime.decode(torch.tensor([w.token]), torch.tensor([w.pos]),
                                               w.kv, w.pos)[-1]


def _step(steps: Generator[int, None, Any], n_layers: int) -> tuple[int, Any]:
    """One step of a layer generator (``prefill_steps``, ``blend_steps``):
    (layers done, None), or (n_layers, its result) once it has finished."""
    with torch.inference_mode():
        try:
            return next(steps), None
        except StopIteration as finished:
            return n_layers, finished.value


# What a request buffer holds from slot 0 on: (node, its handle) per cached node, in slot
# order, as weak references: a buffer in the pool keeps no evicted KV alive.
Held = list[tuple[weakref.ref, weakref.ref]]


class _KVPool:
    """Request KV buffers kept when a request ends and handed to a later one. A fresh
    buffer of tens of MB is page-faulted in on first write (~30 ms of a warm turn at
    3.6k tokens on the 2-core host, against ~8 ms to copy the cached KV into a mapped
    one). A kept buffer remembers which cached nodes' KV it holds from slot 0 on, so
    a later request whose matched prefix starts with the same nodes (the same node
    objects with the same handles: not evicted, not replaced) skips copying those.
    Capacities are rounded up to ``ROUND`` tokens so buffers fit later requests; a
    buffer more than twice the need is not used; at most ``max_bytes`` are kept, the
    oldest dropped first. Engine thread only."""

    ROUND = 256

    def __init__(self, new_kv: Callable[[int], torch.Tensor], max_bytes: int) -> None:
        self._new = new_kv
        self._max = max_bytes
        self._free: list[tuple[torch.Tensor, Held]] = []

    @staticmethod
    def _common(held: Held, nodes: list[SegmentNode]) -> int:
        n = 0
        for (node_ref, handle_ref), node in zip(held, nodes, strict=False):
            if node_ref() is not node or handle_ref() is not node.handle:
                break
            n += 1
        return n

    def take(self, capacity: int, nodes: list[SegmentNode] = ()) -> tuple[torch.Tensor, int]:
        """A buffer for ``capacity`` tokens and how many of ``nodes`` (from the first)
        it already holds at their slots: the fitting buffer that holds the most, the
        smallest of those."""
        cap = -(-capacity // self.ROUND) * self.ROUND
        fits = [i for i, (kv, _) in enumerate(self._free) if cap <= kv.shape[3] <= 2 * cap]
        if not fits:
            return self._new(cap), 0
        nodes = list(nodes)
        common = {i: self._common(self._free[i][1], nodes) for i in fits}
        best = min(fits, key=lambda i: (-common[i], self._free[i][0].shape[3]))
        return self._free.pop(best)[0], common[best]

    def give(self, kv: torch.Tensor, held: Held = ()) -> None:
        """``kv`` must not be referenced anywhere else (node handles are clones);
        ``held``: the nodes whose KV it holds from slot 0 on (``_Run.held``)."""
        self._free.append((kv, list(held)))
        while self._free and sum(_kv_bytes(b) for b, _ in self._free) > self._max:
            self._free.pop(0)


KV_POOL_BYTES = 256 << 20  # ~3 buffers of 4k tokens for SmolLM2-135M


def _chat_chars(req: ChatRequest) -> int:
    """Characters of text a chat request brings (contents, tool calls, tools)."""
    n = sum(len(s.content or "") for s in req.segments)
    for m in req.messages:
        content = m.get("content")
        n += len(content) if isinstance(content, str) else 0
        n += sum(len(str(c)) for c in m.get("tool_calls") or ())
    return n + sum(len(str(t)) for t in req.tools)


def _split_kv(handle: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Clones, not views: a view would keep the whole original storage alive.
    return handle[:, :, :, :k].clone(), handle[:, :, :, k:].clone()


def _kv_bytes(handle: torch.Tensor) -> int:
    return handle.numel() * handle.element_size()


@dataclass
class _Run:
    """One request's state: its KV buffer, where it stands, what it pinned."""

    kv: torch.Tensor  # [n_layers, 2, n_kv_heads, capacity, head_dim]
    parent: SegmentNode  # the node after the last unit so far (a root at first)
    pos: int = 0
    pinned: list[SegmentNode] = field(default_factory=list)
    usage: list[SegmentUsage] = field(default_factory=list)
    cached: int = 0
    prefix_chain: str = ""
    blended: bool = False  # KV from the blend point on is approximate: insert nothing
    tail_logits: torch.Tensor | None = None  # the last unit was prefilled with the tail
    held: Held = field(default_factory=list)  # cached nodes whose KV fills slots 0..held_tokens
    held_tokens: int = 0
    loads: Any = None  # lower-tier loads in flight for the units ahead (tiering.Loads)

    def hold(self, node: SegmentNode, n: int) -> None:
        """``node``'s KV (``n`` tokens) is now in slots ``pos..pos+n`` (before ``pos``
        moves); kept track of only while the held slots run on from 0 without a gap."""
        if self.pos == self.held_tokens and node.handle is not None:
            self.held.append((weakref.ref(node), weakref.ref(node.handle)))
            self.held_tokens += n


_QUANT_SUFFIX = re.compile(r"[.-](?:I?Q\d[\w]*|F16|F32|BF16)$", re.I)


def model_id(file_stem: str) -> str:
    """The model's name without a GGUF quantisation suffix: ``SmolLM2-135M-Instruct.Q4_1``
    -> ``SmolLM2-135M-Instruct`` (one name for the default model everywhere)."""
    return _QUANT_SUFFIX.sub("", file_stem) or file_stem


class Engine(CacheControl, Blending, Tiering):
    def __init__(self, runtime: ModelRuntime, tokenizer: ChatTokenizer, cache: CacheConfig,
                 model_name: str, scheduler: SchedulerConfig | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.cache_cfg = cache
        self.model_name = model_name
        sched_cfg = scheduler or SchedulerConfig()
        # KV now outlives the process: the fingerprint also names the prefill chunking,
        # which changes float32 bits on the dense path.
        self.fingerprint = fingerprint_with(runtime.fingerprint, prefill_chunk=sched_cfg.prefill_chunk)
        self.context_window = runtime.arch.max_position
        self.vocab_size = runtime.arch.vocab_size
        self.execution_plan = runtime.describe()  # which code computes tokens (/health, /v1/models)
        self._init_tiers(cache, KV_LAYOUT_VERSION)  # disk, Redis (self.store None: RAM only)
        self.tree = SegmentTree(cache.cache_bytes, clock=clock, on_remove=self._on_tree_remove,
                                tenant_quota_bytes=cache.tenant_quota_bytes)
        self.radix = RadixTree(cache.cache_bytes, split_handle=_split_kv, bytes_of=_kv_bytes,
                               handle_len=lambda h: h.shape[3], clock=clock)
        self.registry = SegmentRegistry(clock, cache.registry_bytes, cache.tenant_registry_bytes,
                                        cache.tenant_registry_entries)
        self.memo = TokenMemo(tokenizer, cache.memo_bytes, cache.tenant_memo_bytes,
                              max_tokens=runtime.arch.max_position)
        self.grammars = Grammars(tokenizer.hf, runtime.arch.vocab_size)
        self._kv_pool = _KVPool(runtime.new_kv, KV_POOL_BYTES)
        self._sink = sink_ids(tokenizer)  # what standalone segments are computed behind
        self._lock = threading.RLock()  # tree, radix, in-flight map: held by each engine step
        # (parent chain, digest) of every unit being computed -> the job computing it
        self._inflight: dict[tuple[str, str], int] = {}
        self._purges: dict[str, int] = {}  # namespace -> purges so far (see _compute_standalone)
        # A purge moves the tenant to a new namespace (its generation); the old ones are
        # retired: unreachable, and swept of whatever jobs still running insert there.
        self._generation: dict[str, int] = {}
        self._retired: set[str] = set()
        self.scheduler = Scheduler(sched_cfg, _Runner(runtime),
                                   lambda key: key in self._inflight, self._lock, self._estimate)

    def close(self, drain: bool = True) -> None:
        """Stop taking requests; with ``drain`` finish the ones already queued; then
        finish the writes queued for the lower tiers."""
        self.scheduler.stop(drain)
        self._close_tiers()

    @classmethod
    def load(cls, cfg: Config, progress: bool = True) -> Engine:
        """Find (and on first use convert) the model, then build the engine."""
        resolved = resolve_model(cfg.model.path, cfg.model.cache_dir, progress=progress)
        arch = load_arch(resolved.directory)
        tokenizer = ChatTokenizer.load(resolved.directory, arch.eos_token_ids)
        runtime = ModelRuntime.load(resolved, cfg.model, tokenizer_digest=tokenizer.digest)
        return cls(runtime, tokenizer, cfg.cache, cfg.server.model_name or model_id(resolved.name),
                   cfg.scheduler)

    def namespace(self, tenant: str) -> str:
        """The root of the tenant's cache: its id, the model fingerprint and how many
        times it was purged (so nothing from before a purge is ever reachable)."""
        generation = self._generation.get(tenant, 0)
        if not generation:
            return namespace_digest(tenant, self.fingerprint)
        ns = namespace_digest(tenant, self.fingerprint + f"#{generation}")
        if self.store is not None:  # tier entries are keyed by generation 0: Tiering._tier_root
            self._tier_roots[ns] = namespace_digest(tenant, self.fingerprint)
        return ns

    # ------------------------------------------------------------------ requests
    def chat(self, req: ChatRequest, on_text: Callback | None = None,
             is_cancelled: CancelCheck | None = None) -> GenerationResult:
        """Generate a reply for ``req``; raises EngineError subclasses for bad input
        (before any compute) and OverloadedError (429) when the queue is full.
        ``on_text`` gets ``TextDelta``s (plain strings for one choice)."""
        t0 = time.perf_counter()
        self._check_sampling(req.sampling)
        constraint = self._constraint(req)
        ns = self.namespace(req.tenant)
        with self.scheduler.reserve(req.tenant) as place:
            self._check_text_size(_chat_chars(req), "messages")
            pending: dict[str, tuple[int, ...]] = {}
            prompt = self._build_prompt(req.tenant, ns, req.messages, req.segments, req.tools, True,
                                        pending)
            result = self.scheduler.submit(
                lambda job: self._chat_job(job, ns, prompt, req, on_text, t0, constraint, pending),
                req.tenant, is_cancelled, meta=(ns, prompt), place=place)
        result.tools_count = len(req.tools)
        if req.tools:
            result.tools_digest = next((u.hash for u in result.segments if u.kind == "tools"), None)
        return result

    def _constraint(self, req: ChatRequest) -> Constraint | None:
        """The grammar state of a constrained request (compiled here, in the request's
        thread, so a bad schema is refused before any compute)."""
        lark = grammar_for(req)
        if lark is None:
            return None
        forced = req.tool_choice == "required" or isinstance(req.tool_choice, dict)
        param = "response_format" if req.response_format and not forced else "tools"
        return Constraint(self.grammars.compile(lark, param), self.tokenizer.eos_ids)

    def _chat_job(self, job: Job, ns: str, prompt: Prompt, req: ChatRequest,
                  on_text: Callback | None, t0: float, constraint: Constraint | None,
                  pending: dict[str, tuple[int, ...]]):
        parse_calls = bool(req.tools) and req.tool_choice != "none"
        filters = [_ChoiceFilter(on_text, i) for i in range(req.sampling.n)] \
            if parse_calls and on_text is not None else []
        emit = (lambda delta: filters[delta.choice](delta)) if filters else on_text
        run = self._start(ns, prompt, req.sampling.max_tokens)
        self.memo.commit(ns, pending)
        try:
            if self.store is not None and self.cache_cfg.blend != "off":
                # exact KV from a lower tier before any approximate (blended) reuse
                yield from self._prefill_units(job, run, prompt, loaded_only=True)
            plan = yield from self._blend_plan(job, run, prompt)
            yield from self._prefill_units(job, run, prompt, None if plan is None else plan.at,
                                           with_tail=plan is None)
            logits = run.tail_logits if plan is None else (yield from self._blend(run, prompt, plan))
            result, seqs = yield from self._generate(run, prompt.tail, req.sampling, t0, emit,
                                                     job.is_cancelled, logits, constraint)
            for f in filters:
                f.flush()
            self._shape_reply(result, parse_calls)
            if not run.blended:  # a blended reply's KV is approximate
                self._keep_replies(run, prompt.tail, result, seqs)
            self._give_back(seqs)
            if result.finish_reason != "cancelled":
                if self.cache_cfg.blend != "off":
                    self._derive_standalone(run, prompt)
                self._schedule_standalone(ns, req.tenant, prompt)
        except Cancelled:
            result = self._cancelled(run, len(prompt.tail), t0)
        finally:
            self._release(run.pinned)
            self._kv_pool.give(run.kv, run.held)
        return result

    def complete(self, tenant: str, prompt: str | list[int], sampling: SamplingParams,
                 on_text: Callback | None = None,
                 is_cancelled: CancelCheck | None = None) -> GenerationResult:
        """Plain-text completion (no chat template), reusing the longest prefix of
        any earlier prompt or reply of this tenant through the radix tail. ``prompt``
        is text or token ids."""
        t0 = time.perf_counter()
        with self.scheduler.reserve(tenant) as place:
            if isinstance(prompt, str):
                self._check_text_size(len(prompt), "prompt")
                # The raw prompt is the caller's alone (no template, no other party's turn), so
                # special tokens written in it are recognised, as a hand-built chat prompt needs.
                ids = tuple(self.tokenizer.encode(prompt, special=True))
            else:
                ids = tuple(prompt)
            if not ids:
                raise EngineError("prompt must not be empty", "prompt")
            vocab = self.runtime.arch.vocab_size
            if any(not 0 <= t < vocab for t in ids):
                raise EngineError(f"prompt holds a token id outside this model's vocabulary "
                                  f"(0..{vocab - 1})", "prompt")
            self._check_sampling(sampling)
            self._check_context(len(ids), sampling.max_tokens)
            ns = self.namespace(tenant)
            return self.scheduler.submit(
                lambda job: self._complete_job(job, ns, ids, sampling, on_text, t0), tenant,
                is_cancelled, place=place)

    def _complete_job(self, job: Job, ns: str, ids: tuple[int, ...], sampling: SamplingParams,
                      on_text: Callback | None, t0: float):
        match = self.radix.match_prefix(ns, ids, max_len=len(ids) - 1)  # >= 1 token computed
        self.radix.pin(match.nodes)
        run = _Run(self.runtime.new_kv(len(ids) + sampling.max_tokens), self.tree.root(ns))
        try:
            for handle in match.handles:
                n = handle.shape[3]
                run.kv[:, :, :, run.pos:run.pos + n] = handle
                run.pos += n
            run.cached = run.pos
            result, seqs = yield from self._generate(run, ids[run.pos:], sampling, t0, on_text,
                                                     job.is_cancelled)
            if result.finish_reason != "cancelled" and not seqs[0].stream.stopped:
                self._keep_tokens(ns, run.kv, ids + tuple(result.token_ids))
            self._give_back(seqs)
            return result
        except Cancelled:
            return self._cancelled(run, len(ids) - run.pos, t0)
        finally:
            self.radix.unpin(match.nodes)
            self._enforce_budget(ns)
            self._sweep_retired()

    def _keep_tokens(self, ns: str, kv: torch.Tensor, ids: tuple[int, ...]) -> None:
        """Insert ``ids`` (whose KV is in ``kv`` slots [0, len)) into the radix tail."""
        self.radix.insert(ns, ids, lambda a, b: kv[:, :, :, a:b].clone())

    def warm(self, tenant: str, segments: list[SegmentInput]) -> WarmResult:
        """Compute and cache ``segments`` (as the start of a chat prompt) without generating."""
        if not segments:
            raise EngineError("segments must not be empty", "segments")
        ns = self.namespace(tenant)
        with self.scheduler.reserve(tenant) as place:
            self._check_text_size(sum(len(s.content or "") for s in segments), "segments")
            pending: dict[str, tuple[int, ...]] = {}
            prompt = self._build_prompt(tenant, ns, [], segments, [], False, pending)
            units = Prompt(prompt.units, ())
            return self.scheduler.submit(lambda job: self._warm_job(job, ns, units, pending), tenant,
                                         meta=(ns, units), place=place)

    def _warm_job(self, job: Job, ns: str, units: Prompt, pending: dict[str, tuple[int, ...]]):
        run = self._start(ns, units, 0)
        self.memo.commit(ns, pending)
        try:
            yield from self._prefill_units(job, run, units)
            yield from self._compute_standalone(self.standalone_namespace(ns),
                                                self._missing_standalone(ns, units))
        finally:
            self._release(run.pinned)
            self._kv_pool.give(run.kv, run.held)
        return WarmResult(len(run.usage), run.parent.chain, run.usage)

    # ------------------------------------------------------------------ prompt
    def _build_prompt(self, tenant: str, ns: str, messages: list[dict], segments: list[SegmentInput],
                      tools: list[dict], generation_prompt: bool,
                      pending: dict[str, tuple[int, ...]] | None = None) -> Prompt:
        """``pending``: new token ids go there, for the memo once the request is
        admitted (``_start`` succeeded), so a refused request leaves nothing."""
        if len(segments) > self.cache_cfg.max_segments:
            raise EngineError(f"too many segments: {len(segments)} (the limit is "
                              f"{self.cache_cfg.max_segments})", "segments")
        resolved = resolve_segments(segments, tenant, ns, self.memo, self.registry, pending)
        try:
            return build_prompt(self.tokenizer, self.memo, ns, resolved, messages, tools,
                                generation_prompt, pending, chunks=self.cache_cfg.blend == "auto")
        except TemplateError as exc:
            raise EngineError(str(exc), "messages") from exc

    def _check_sampling(self, sampling: SamplingParams) -> None:
        vocab = self.runtime.arch.vocab_size
        bad = [t for t, _ in sampling.logit_bias if t >= vocab]
        if bad:
            raise EngineError(f"Invalid key in 'logit_bias': {bad[0]} is not a token id of this "
                              f"model (its ids are 0..{vocab - 1})", "logit_bias")

    def _check_text_size(self, n_chars: int, param: str) -> None:
        """Refuse text that cannot fit the context window, from its length alone (no
        token covers more than ``tokenizer.max_token_chars`` characters), before
        anything tokenizes it."""
        at_least = n_chars // self.tokenizer.max_token_chars
        if at_least > self.context_window:
            raise ContextOverflowError(
                f"the request holds {n_chars} characters of text: at least {at_least} tokens, "
                f"over the model's context window of {self.context_window} tokens; send less "
                "text", param)

    def _check_context(self, prompt_tokens: int, max_tokens: int) -> None:
        if prompt_tokens + max_tokens > self.context_window:
            raise ContextOverflowError(
                f"the prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}: together "
                f"{prompt_tokens + max_tokens}, over the model's context window of "
                f"{self.context_window} tokens; shorten the prompt or lower max_tokens", "max_tokens")

    # ------------------------------------------------------------------ cache path
    def _start(self, ns: str, prompt: Prompt, max_tokens: int) -> _Run:
        """Match and pin the cached prefix, check the context, copy the KV in.
        The caller must release ``run.pinned``."""
        self.tree.expire()
        matched = self.tree.match(ns, [u.key.digest for u in prompt.units])
        # A hit's tokens are the node's (a kept reply holds the ids the model generated).
        n_tokens = (sum(n.n_tokens for n in matched)
                    + sum(len(u.ids) for u in prompt.units[len(matched):]) + len(prompt.tail))
        self._check_context(n_tokens, max_tokens)
        self.tree.pin(matched)
        kv, held = self._kv_pool.take(max(n_tokens + max_tokens, 1), matched)
        run = _Run(kv, self.tree.root(ns), pinned=list(matched))
        run.prefix_chain = run.parent.chain
        for i, (node, unit) in enumerate(zip(matched, prompt.units, strict=False)):
            if i >= held:  # the first ``held`` are in this buffer already
                run.kv[:, :, :, run.pos:run.pos + node.n_tokens] = node.handle
            self._advance(run, node, unit.key, node.n_tokens, "hit", "ram")
        return run

    def _prefill_units(self, job: Job, run: _Run, prompt: Prompt, stop: int | None = None,
                       with_tail: bool = False, loaded_only: bool = False):
        """Compute every unit after the matched ones (up to unit ``stop``), inserting
        a node after each; a unit a lower cache tier holds is loaded instead. A unit
        another job is computing right now is waited for, then reused. ``with_tail``:
        the last unit and ``prompt.tail`` are prefilled together where that gives the
        unit the same KV as alone (``_tail_with_unit``); the tail's logits are then in
        ``run.tail_logits``. ``loaded_only``: stop at the first unit that would have to
        be computed."""
        digests = [u.key.digest for u in prompt.units]
        last = len(prompt.units) - 1
        for i, unit in enumerate(prompt.units[:stop]):
            if i < len(run.usage):
                continue
            key = (run.parent.chain, unit.key.digest)
            while self._inflight.get(key, job.id) != job.id:
                yield WaitFor(key)
            matched = self.tree.match(run.parent.namespace, digests[:i + 1])
            if len(matched) > i:  # computed meanwhile by another request: a hit
                node = matched[i]
                self.tree.pin([node])
                run.pinned.append(node)
                run.kv[:, :, :, run.pos:run.pos + node.n_tokens] = node.handle
                self._advance(run, node, unit.key, node.n_tokens, "hit", "ram")
                continue
            self._inflight[key] = job.id
            try:
                node, tier = (yield from self._promote(run, prompt, i, stop)) or (None, None)
                if node is None and loaded_only:
                    return
                reused = 0
                if node is None:  # in no tier: compute it, after the head a sibling shares
                    reused = self._reuse_head(run, unit)
                    rest = unit.ids[reused:]
                    if with_tail and i == last and self._tail_with_unit(len(rest), len(prompt.tail)):
                        run.tail_logits = yield from self._prefill(rest + prompt.tail, run.kv,
                                                                   run.pos + reused)
                    else:
                        yield from self._prefill(rest, run.kv, run.pos + reused, logits=False)
                    node = self._insert(run, unit.key.digest, unit.ids, unit.key.ttl_s)
            finally:
                del self._inflight[key]
            status = "hit" if tier is not None else "partial" if reused else "miss"
            self._advance(run, node, unit.key, node.n_tokens, status, tier, reused)

    def _reuse_head(self, run: _Run, unit: Unit) -> int:
        """Copy into the run's buffer the KV of the longest head of ``unit`` that a
        cached sibling (a child of ``run.parent``) computed, as far as
        ``kv.partial.reusable_tokens`` allows (the rest then computes the same bits
        as a cold prefill of the unit); returns how many tokens that is."""
        if run.blended:
            return 0
        sibling, common = self.tree.closest_child(run.parent, unit.ids)
        if sibling is None:
            return 0
        n = reusable_tokens(common, len(unit.ids), sibling.n_tokens, self.scheduler.cfg.prefill_chunk,
                            getattr(self.runtime, "independent_rows", 0))
        if n > 0:
            run.kv[:, :, :, run.pos:run.pos + n] = sibling.handle[:, :, :, :n]
            self.tree.touch(sibling)
        return n

    def _tail_with_unit(self, unit_len: int, tail_len: int) -> bool:
        """Whether a unit and the tail after it can be one prefill: one call fewer (~50
        ms of a warm turn at 3.6k cached slots on the 2-core host), and the unit's KV,
        which is cached, the same bits as a prefill of the unit alone. That holds where
        the runtime computes the rows of a chunk independently (``independent_rows``)
        and the unit's chunks (from its start) would not end in a 1-token chunk, which
        takes the decode step."""
        chunk = self.scheduler.cfg.prefill_chunk
        independent = getattr(self.runtime, "independent_rows", 0)
        return tail_len > 0 and 2 <= chunk <= independent and unit_len % chunk != 1

    def _insert(self, run: _Run, digest: str, ids: tuple[int, ...], ttl_s: float | None,
                kv: torch.Tensor | None = None) -> SegmentNode:
        """Insert the KV of ``ids`` (in slots ``run.pos..`` of ``kv``, default the run's)."""
        kv = run.kv if kv is None else kv
        # handle: [n_layers, 2, n_kv_heads, n_tokens, head_dim], this unit's tokens only
        handle = kv[:, :, :, run.pos:run.pos + len(ids)].clone()
        node = self.tree.insert(run.parent, digest, ids, handle,
                                handle.numel() * handle.element_size(),
                                ttl_s=ttl_s or self.cache_cfg.default_ttl_s)
        self.tree.pin([node])
        run.pinned.append(node)
        self._publish(node, handle)
        self._enforce_budget(run.parent.namespace)
        return node

    def _enforce_budget(self, ns: str) -> None:
        """Resident KV of the segment tree and the radix tail together <= budget;
        the radix tail (unstructured prompts) gives way first."""
        if self.cache_cfg.tenant_quota_bytes is not None:
            self.tree.enforce_quota(ns)
        budget = self.cache_cfg.cache_bytes
        if self.tree.resident_bytes + self.radix.resident_bytes > budget:
            self.radix.evict_until(max(0, budget - self.tree.resident_bytes))
            self.tree.evict_until(max(0, budget - self.radix.resident_bytes))

    def _advance(self, run: _Run, node: SegmentNode, key, n: int, status: str,
                 tier: str | None = None, reused: int = 0) -> None:
        """Account unit ``key`` (``n`` tokens, now in slots ``pos..``) as ``status``:
        a hit counts all its tokens as cached, a partial hit the ``reused`` ones."""
        run.hold(node, n)
        run.usage.append(SegmentUsage(key.id, key.digest, status, n, key.kind,  # type: ignore[arg-type]
                                      tier=tier,  # type: ignore[arg-type]
                                      reused=reused if status == "partial" else None))
        run.cached += n if status == "hit" else reused
        run.pos += n
        run.parent = node
        if key.kind not in ("message", "chunk") or run.prefix_chain == "":
            run.prefix_chain = node.chain

    def _keep_replies(self, run: _Run, tail: tuple[int, ...], result: GenerationResult,
                      seqs: list[Sequence]) -> None:
        """Store tail + generated ids of each choice under the digest of the assistant
        message the client will send back next turn. Only a finished reply is kept:
        a cancelled or failed one inserts nothing, nor one cut by a stop string (not
        what was generated)."""
        kept = set()
        for choice, seq in zip(result.choices(), seqs, strict=True):
            if (choice.finish_reason not in ("stop", "length", "tool_calls") or not choice.token_ids
                    or seq.stream.stopped):
                continue
            msg = {"role": "assistant", "content": choice.text, "tool_calls": choice.tool_calls}
            digest = message_digest(msg)
            if digest in kept:  # two choices with the same reply
                continue
            kept.add(digest)
            ids = tail + tuple(choice.token_ids)
            node = self._insert(run, digest, ids, None, seq.kv)
            if seq.kv is run.kv:
                run.hold(node, len(ids))

    def _release(self, nodes: list[SegmentNode]) -> None:
        ns = nodes[0].namespace if nodes else None
        self.tree.unpin(nodes)
        nodes.clear()
        if ns is not None:
            self._enforce_budget(ns)
        self._sweep_retired()

    def _sweep_retired(self) -> None:
        """Drop what jobs that outlived a purge left in retired namespaces (engine
        thread, or under ``_lock``); a namespace stays retired while a pin holds a node."""
        for ns in list(self._retired):
            self.tree.purge(ns)
            self.radix.purge(ns)
            self.memo.forget(ns)
            if not self.tree.namespace_bytes(ns) and not self.radix.namespace_bytes(ns):
                self._retired.discard(ns)

    # ------------------------------------------------------------------ compute
    @staticmethod
    def _prefill(ids: tuple[int, ...], kv: torch.Tensor, start: int, logits: bool = True):
        """Yield the prefill of ``ids`` at slots ``start..``; returns the last logits
        [vocab], or None without ``logits`` (KV only: no LM head)."""
        work = PrefillWork(ids, kv, start, need_logits=logits)
        yield work
        return work.logits

    def _generate(self, run: _Run, tail: tuple[int, ...], sampling: SamplingParams, t0: float,
                  on_text: Callback | None, is_cancelled: CancelCheck | None,
                  logits: torch.Tensor | None = None, constraint: Constraint | None = None):
        """Prefill the tail (unless its ``logits`` are given: computed already) and
        decode ``sampling.n`` choices from it; returns (result, their sequences).
        On a finish by EOS or length a choice's buffer holds every generated token
        but a final EOS (ready to be kept as a reply)."""
        if logits is None:
            logits = yield from self._prefill(tail, run.kv, run.pos)
        start = run.pos + len(tail)
        seqs = [self._sequence(i, run, start, sampling, constraint) for i in range(sampling.n)]
        decoder = Decoder(self.tokenizer.eos_ids, self._describe, on_text, t0)
        try:
            yield from decoder.run(seqs, logits, sampling.max_tokens, is_cancelled)
        except BaseException:
            self._give_back(seqs)
            raise
        return self._result(run, len(tail), seqs, t0), seqs

    def _give_back(self, seqs: list[Sequence]) -> None:
        """The other choices' buffers to the pool (choice 0 decodes in the run's)."""
        for seq in seqs[1:]:
            self._kv_pool.give(seq.kv)

    def _sequence(self, index: int, run: _Run, start: int, sampling: SamplingParams,
                  constraint: Constraint | None) -> Sequence:
        """Choice ``index``: choice 0 decodes in the run's buffer, the others in a copy
        of its first ``start`` slots (the prompt, computed once); each has its own
        sampler (seed + index when seeded) and grammar state."""
        kv = run.kv
        if index > 0:
            kv, _ = self._kv_pool.take(start + sampling.max_tokens)
            kv[:, :, :, :start] = run.kv[:, :, :, :start]
            if constraint is not None:
                constraint = constraint.copy()
        seeded = sampling if sampling.seed is None or index == 0 else \
            replace(sampling, seed=(sampling.seed + index) % 2**63)
        return Sequence(index, kv, start, Sampler(seeded),
                        TextStream(self.tokenizer.decode_stream(), sampling.stop), constraint,
                        [] if sampling.logprobs is not None else None)

    def _describe(self, token: int) -> tuple[str, bytes]:
        """A token's text and bytes, for logprobs (a piece of a UTF-8 character
        shows as U+FFFD in the text; the bytes are exact)."""
        raw = self.grammars.token_bytes(token)
        return raw.decode("utf-8", errors="replace"), raw

    def _estimate(self, job: Job) -> int:
        """Cached prefix tokens of a queued chat/warm job (read-only walk of its
        own tenant's tree), for admission order."""
        if job.meta is None:
            return 0
        ns, prompt = job.meta
        return sum(n.n_tokens for n in self.tree.peek(ns, [u.key.digest for u in prompt.units]))

    def _result(self, run: _Run, tail_len: int, seqs: list[Sequence], t0: float) -> GenerationResult:
        first = seqs[0]
        more = [Choice(s.index, s.stream.text, s.finish or "stop", list(s.stream.ids),
                       logprobs=s.logprobs) for s in seqs[1:]]
        return GenerationResult(
            text=first.stream.text, finish_reason=first.finish or "stop",  # type: ignore[arg-type]
            prompt_tokens=run.pos + tail_len,
            completion_tokens=sum(len(s.stream.ids) for s in seqs),
            cached_tokens=run.cached, chain=run.parent.chain, segments=list(run.usage),
            ttft_s=first.ttft, total_s=time.perf_counter() - t0, token_ids=list(first.stream.ids),
            prefix_chain=run.prefix_chain or run.parent.chain, logprobs=first.logprobs,
            more_choices=more,
        )

    def _cancelled(self, run: _Run, tail_len: int, t0: float) -> GenerationResult:
        return GenerationResult(
            text="", finish_reason="cancelled", prompt_tokens=run.pos + tail_len,
            completion_tokens=0, cached_tokens=run.cached, chain=run.parent.chain,
            segments=list(run.usage), ttft_s=0.0, total_s=time.perf_counter() - t0,
            prefix_chain=run.prefix_chain or run.parent.chain)

    @staticmethod
    def _shape_reply(result: GenerationResult, parse_calls: bool) -> None:
        """Turn ``<tool_call>`` blocks in each choice's text into OpenAI tool_calls."""
        if not parse_calls or result.finish_reason == "cancelled":
            return
        for choice in [result, *result.more_choices]:
            content, calls = parse_tool_calls(choice.text)
            if calls:
                choice.text, choice.tool_calls, choice.finish_reason = content or "", calls, "tool_calls"


class _ChoiceFilter(ToolCallFilter):
    """A ``ToolCallFilter`` for choice ``index``: its text goes on as ``TextDelta``s of
    that choice, with the logprobs of the tokens received so far (those of a call's
    tokens stay in the final result only)."""

    def __init__(self, on_text: Callback, index: int) -> None:
        self._logprobs: tuple = ()
        super().__init__(lambda text: on_text(TextDelta(text, index, self._take())))

    def __call__(self, delta: str) -> None:
        self._logprobs += getattr(delta, "logprobs", ())
        super().__call__(delta)

    def _take(self) -> tuple:
        taken, self._logprobs = self._logprobs, ()
        return taken

