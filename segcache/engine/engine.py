"""The engine: the one place where a request meets the cache.

Request path (``chat``), in KV slots of one buffer:

    resolve + tokenize + lay out units   errors raised here, before any compute (and a
                                          response_format / forced tool call compiled)
    walk the tenant's tree                matched = units[0:h]            -> pinned
    copy matched KV into the buffer       slots [0, p_h)
    prefill missing units one by one      slots [p_h, p_n), a node inserted (pinned) after each;
                                          a unit's head a cached sibling shares is copied, not
                                          computed (a partial hit, ``kv.partial``)
    prefill the tail                      slots [p_n, P)  (always >= 1 token: fresh logits)
    decode                                slots [P, P + completion); choices 1..n-1 in
                                          copies of slots [0, P) (``engine.decode``)
    keep the reply                        tail + generated ids -> a node keyed by the reply
                                          message's digest (only for a clean finish), per choice
    unpin everything                      on success, error and cancellation alike

Units are explicit segments, the tools block and each message, or each content-defined
chunk of a message under ``--blend auto`` (see ``segcache.engine.prompt``). The engine
composes the parts and owns what they share (the tree, radix tail, registry, memo, the
in-flight map and the lock); each part is its own module:

    Limits       engine.limits       what a request may ask, checked before any compute
    CachePath    engine.cache_path   tree walk, unit prefill (partial hits, waits on other
                                     requests' units), inserts, kept replies, release;
                                     ``Residency``: the byte budget, retired namespaces
    Tiers        engine.tiering      disk / Redis under the tree: loads, write-through
    Blender      engine.blend        CacheBlend: non-prefix reuse and standalone copies
    Generation   engine.generate     decode n choices, shape tool calls, the result
    CacheAdmin   engine.cache_control  stats, purge, metrics, the named-segment registry
    Scheduler    engine.scheduler    the engine thread: batches and interleaves the work

``EngineClient`` (``segcache.engine.types``) is what the server sees of all this. Node
payloads are torch tensors ``[n_layers, 2, n_kv_heads, n_tokens, head_dim]`` in the
runtime's KV dtype; the tree only sees them as opaque handles.

Every request runs as a generator on the engine thread (``segcache.engine.scheduler``):
it yields the model work it needs (prefill of a unit, one decode step, or a wait
for a unit another request is computing right now) and the scheduler batches and
interleaves that work across requests. ``submit_*`` return the request's future (the
server awaits it, holding no thread); ``chat`` / ``complete`` / ``warm`` wait for it. The
tree, radix, registry and memo are only touched under ``_lock`` (held by the engine
thread during each step). Prompts are built (tokenized) in the request's own thread
under no engine-wide lock (the memo and registry lock themselves briefly), after the
scheduler reserved the request a place in its queue: a full queue or a tenant past its
share is refused before any tokenizing, and so is text too long for the context window
by its length alone.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import torch

from segcache.config import CacheConfig, Config, SchedulerConfig
from segcache.engine.blend import Blender
from segcache.engine.cache_control import CacheAdmin
from segcache.engine.cache_path import CachePath, Residency
from segcache.engine.generate import CancelCheck, ChoiceFilter, Generation
from segcache.engine.grammar import Constraint, Grammars, grammar_for
from segcache.engine.kv_pool import KV_POOL_BYTES, KVPool, kv_bytes, split_kv
from segcache.engine.limits import Limits, chat_chars
from segcache.engine.prompt import Prompt, TokenMemo, build_prompt, resolve_segments, sink_ids
from segcache.engine.run import RunState
from segcache.engine.runner import Runner
from segcache.engine.scheduler import Cancelled, Job, Scheduler
from segcache.engine.tiering import Tiers, build_store
from segcache.engine.types import (
    ChatRequest,
    EngineError,
    GenerationResult,
    SamplingParams,
    SegmentInput,
    WarmResult,
)
from segcache.kv.hashing import namespace_digest
from segcache.kv.radix import RadixTree
from segcache.kv.registry import SegmentRegistry
from segcache.kv.segment_tree import SegmentTree
from segcache.kv.tiers import fingerprint_with
from segcache.model.runtime import KV_LAYOUT_VERSION, ModelRuntime
from segcache.model.threads import leave_openmp_to_other_threads
from segcache.model.tokenizer import ChatTokenizer, TemplateError
from segcache.model.weights import load_arch, resolve_model

Callback = Callable[[str], None]


_QUANT_SUFFIX = re.compile(r"[.-](?:I?Q\d[\w]*|F16|F32|BF16)$", re.I)


def model_id(file_stem: str) -> str:
    """The model's name without a GGUF quantisation suffix: ``SmolLM2-135M-Instruct.Q4_1``
    -> ``SmolLM2-135M-Instruct`` (one name for the default model everywhere)."""
    return _QUANT_SUFFIX.sub("", file_stem) or file_stem


class Engine:
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
        self.tree = SegmentTree(cache.cache_bytes, clock=clock,
                                on_remove=lambda node, reason: self.tiers.on_tree_remove(node, reason),
                                tenant_quota_bytes=cache.tenant_quota_bytes)
        self.radix = RadixTree(cache.cache_bytes, split_handle=split_kv, bytes_of=kv_bytes,
                               handle_len=lambda h: h.shape[3], clock=clock)
        self.registry = SegmentRegistry(clock, cache.registry_bytes, cache.tenant_registry_bytes,
                                        cache.tenant_registry_entries)
        self.memo = TokenMemo(tokenizer, cache.memo_bytes, cache.tenant_memo_bytes,
                              max_tokens=runtime.arch.max_position)
        self.residency = Residency(self.tree, self.radix, self.memo, cache)
        # disk, Redis (store None: RAM only)
        self.tiers = Tiers(build_store(cache, KV_LAYOUT_VERSION), self.tree, self.fingerprint, cache,
                           self.residency.enforce)
        self.grammars = Grammars(tokenizer.hf, runtime.arch.vocab_size)
        self.limits = Limits(runtime.arch.vocab_size, self.context_window, tokenizer.max_token_chars)
        self._kv_pool = KVPool(runtime.new_kv, KV_POOL_BYTES)
        self.generation = Generation(tokenizer, self.grammars, self._kv_pool)
        self._lock = threading.RLock()  # tree, radix, in-flight map: held by each engine step
        # (parent chain, digest) of every unit being computed -> the job computing it
        self._inflight: dict[tuple[str, str], int] = {}
        self._purges: dict[str, int] = {}  # namespace -> purges so far (see Blender.compute_standalone)
        # A purge moves the tenant to a new namespace (its generation); the old ones are
        # retired: unreachable, and swept of whatever jobs still running insert there.
        self._generation: dict[str, int] = {}
        self.scheduler = Scheduler(sched_cfg, Runner(runtime),
                                   lambda key: key in self._inflight, self._lock, self._estimate)
        self.path = CachePath(tree=self.tree, tiers=self.tiers, residency=self.residency,
                              kv_pool=self._kv_pool, inflight=self._inflight, cache_cfg=cache,
                              prefill_chunk=sched_cfg.prefill_chunk,
                              independent_rows=getattr(runtime, "independent_rows", 0),
                              check_context=self.limits.check_context)
        self.blender = Blender(runtime=runtime, tree=self.tree, cache_cfg=cache,
                               scheduler=self.scheduler, inflight=self._inflight, purges=self._purges,
                               sink=sink_ids(tokenizer), enforce_budget=self.residency.enforce,
                               sweep_retired=self.residency.sweep_retired)
        self.cache = CacheAdmin(tree=self.tree, radix=self.radix, registry=self.registry,
                                memo=self.memo, lock=self._lock, cache_cfg=cache,
                                model_name=model_name, fingerprint=self.fingerprint,
                                namespace=self.namespace, retire=self._retire,
                                standalone_namespace=self.blender.standalone_namespace,
                                tier_stats=self.tiers.stats, purge_tiers=self.tiers.purge,
                                check_text_size=self.limits.check_text_size)
        # EngineClient's cache calls
        self.cache_stats, self.purge, self.metrics = (self.cache.cache_stats, self.cache.purge,
                                                      self.cache.metrics)
        self.put_segment, self.get_segment, self.delete_segment = (
            self.cache.put_segment, self.cache.get_segment, self.cache.delete_segment)

    @property
    def store(self):
        """The lower tiers' store (None: RAM only)."""
        return self.tiers.store

    def close(self, drain: bool = True) -> None:
        """Stop taking requests; with ``drain`` finish the ones already queued; then
        finish the writes queued for the lower tiers."""
        self.scheduler.stop(drain)
        self.tiers.close()

    @classmethod
    def load(cls, cfg: Config, progress: bool = True) -> Engine:
        """Find (and on first use convert) the model, then build the engine, with one
        request buffer ready (``KVPool.prepare``) and, with cache tiers, read buffers
        for their loads (``Tiers.prepare``)."""
        resolved = resolve_model(cfg.model.path, cfg.model.cache_dir, progress=progress)
        arch = load_arch(resolved.directory)
        tokenizer = ChatTokenizer.load(resolved.directory, arch.eos_token_ids)
        runtime = ModelRuntime.load(resolved, cfg.model, tokenizer_digest=tokenizer.digest)
        engine = cls(runtime, tokenizer, cfg.cache, cfg.server.model_name or model_id(resolved.name),
                     cfg.scheduler)
        # one buffer of the whole context window (189 MB for SmolLM2-135M), for prompts of
        # half the window or more: the long ones, whose buffers cost most to fault in
        engine._kv_pool.prepare(engine.context_window)
        engine.tiers.prepare()  # and read buffers for the first loads from disk or Redis
        return engine

    def hand_over_threads(self) -> bool:
        """Call on the thread that built this engine when it will not run the model itself
        (a server's main thread): it ends its team of OpenMP threads and runs its own parallel
        regions on one thread from then on, so that the engine thread's team is the only one
        (two teams on few cores make libgomp throttle both:
        ``model.threads.leave_openmp_to_other_threads``). Returns whether it could."""
        return leave_openmp_to_other_threads()

    def namespace(self, tenant: str) -> str:
        """The root of the tenant's cache: its id, the model fingerprint and how many
        times it was purged (so nothing from before a purge is ever reachable)."""
        generation = self._generation.get(tenant, 0)
        if not generation:
            return namespace_digest(tenant, self.fingerprint)
        ns = namespace_digest(tenant, self.fingerprint + f"#{generation}")
        self.tiers.note_generation(ns, namespace_digest(tenant, self.fingerprint))  # Tiers.tier_root
        return ns

    # ------------------------------------------------------------------ requests
    def chat(self, req: ChatRequest, on_text: Callback | None = None,
             is_cancelled: CancelCheck | None = None) -> GenerationResult:
        """Generate a reply for ``req``; raises EngineError subclasses for bad input
        (before any compute) and OverloadedError (429) when the queue is full.
        ``on_text`` gets ``TextDelta``s (plain strings for one choice)."""
        return self.submit_chat(req, on_text, is_cancelled).result()

    def submit_chat(self, req: ChatRequest, on_text: Callback | None = None,
                    is_cancelled: CancelCheck | None = None) -> Future:
        """``chat`` without the wait: checks and tokenizes ``req`` in the calling
        thread (raising what ``chat`` raises for bad input), queues it and returns
        the future of its ``GenerationResult``. An awaiting caller holds no thread
        while the request generates (``EngineClient``)."""
        t0 = time.perf_counter()
        self.limits.check_sampling(req.sampling)
        constraint = self._constraint(req)
        ns = self.namespace(req.tenant)
        with self.scheduler.reserve(req.tenant) as place:
            self.limits.check_text_size(chat_chars(req), "messages")
            pending: dict[str, tuple[int, ...]] = {}
            prompt = self._build_prompt(req.tenant, ns, req.messages, req.segments, req.tools, True,
                                        pending)

            def job_gen(job: Job):
                result = yield from self._chat_job(job, ns, prompt, req, on_text, t0, constraint,
                                                   pending)
                result.tools_count = len(req.tools)
                if req.tools:
                    result.tools_digest = next((u.hash for u in result.segments if u.kind == "tools"),
                                               None)
                return result

            return self.scheduler.enqueue(job_gen, req.tenant, is_cancelled, meta=(ns, prompt),
                                          place=place)

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
        filters = [ChoiceFilter(on_text, i) for i in range(req.sampling.n)] \
            if parse_calls and on_text is not None else []
        emit = (lambda delta: filters[delta.choice](delta)) if filters else on_text
        run = self.path.start(ns, prompt, req.sampling.max_tokens)
        self.memo.commit(ns, pending)
        try:
            if self.tiers.store is not None and self.cache_cfg.blend != "off":
                # exact KV from a lower tier before any approximate (blended) reuse
                yield from self.path.prefill_units(job, run, prompt, loaded_only=True)
            plan = yield from self.blender.plan(job, run, prompt)
            yield from self.path.prefill_units(job, run, prompt, None if plan is None else plan.at,
                                               with_tail=plan is None)
            logits = run.tail_logits if plan is None else (yield from self.blender.blend(run, prompt, plan))
            result, seqs = yield from self.generation.run(run, prompt.tail, req.sampling, t0, emit,
                                                          job.is_cancelled, logits, constraint)
            for f in filters:
                f.flush()
            self.generation.shape_reply(result, parse_calls)
            if not run.blended:  # a blended reply's KV is approximate
                self.path.keep_replies(run, prompt.tail, result, seqs)
            self.generation.give_back(seqs)
            if result.finish_reason != "cancelled":
                if self.cache_cfg.blend != "off":
                    self.blender.derive(run, prompt)
                self.blender.schedule(ns, req.tenant, prompt)
        except Cancelled:
            result = self.generation.cancelled(run, len(prompt.tail), t0)
        finally:
            self.path.release(run)
        return result

    def complete(self, tenant: str, prompt: str | list[int], sampling: SamplingParams,
                 on_text: Callback | None = None,
                 is_cancelled: CancelCheck | None = None) -> GenerationResult:
        """Plain-text completion (no chat template), reusing the longest prefix of
        any earlier prompt or reply of this tenant through the radix tail. ``prompt``
        is text or token ids."""
        return self.submit_complete(tenant, prompt, sampling, on_text, is_cancelled).result()

    def submit_complete(self, tenant: str, prompt: str | list[int], sampling: SamplingParams,
                        on_text: Callback | None = None,
                        is_cancelled: CancelCheck | None = None) -> Future:
        """``complete`` without the wait (see ``submit_chat``)."""
        t0 = time.perf_counter()
        with self.scheduler.reserve(tenant) as place:
            if isinstance(prompt, str):
                self.limits.check_text_size(len(prompt), "prompt")
                # The raw prompt is the caller's alone (no template, no other party's turn), so
                # special tokens written in it are recognised, as a hand-built chat prompt needs.
                ids = tuple(self.tokenizer.encode(prompt, special=True))
            else:
                ids = tuple(prompt)
            self.limits.check_token_ids(ids, "prompt")
            self.limits.check_sampling(sampling)
            self.limits.check_context(len(ids), sampling.max_tokens)
            ns = self.namespace(tenant)
            return self.scheduler.enqueue(
                lambda job: self._complete_job(job, ns, ids, sampling, on_text, t0), tenant,
                is_cancelled, place=place)

    def _complete_job(self, job: Job, ns: str, ids: tuple[int, ...], sampling: SamplingParams,
                      on_text: Callback | None, t0: float):
        match = self.radix.match_prefix(ns, ids, max_len=len(ids) - 1)  # >= 1 token computed
        self.radix.pin(match.nodes)
        run = RunState(self.runtime.new_kv(len(ids) + sampling.max_tokens), self.tree.root(ns))
        try:
            for handle in match.handles:
                n = handle.shape[3]
                run.kv[:, :, :, run.pos:run.pos + n] = handle
                run.pos += n
            run.cached = run.pos
            result, seqs = yield from self.generation.run(run, ids[run.pos:], sampling, t0, on_text,
                                                          job.is_cancelled)
            if result.finish_reason != "cancelled" and not seqs[0].stream.stopped:
                self._keep_tokens(ns, run.kv, ids + tuple(result.token_ids))
            self.generation.give_back(seqs)
            return result
        except Cancelled:
            return self.generation.cancelled(run, len(ids) - run.pos, t0)
        finally:
            self.radix.unpin(match.nodes)
            self.residency.enforce(ns)
            self.residency.sweep_retired()

    def _keep_tokens(self, ns: str, kv: torch.Tensor, ids: tuple[int, ...]) -> None:
        """Insert ``ids`` (whose KV is in ``kv`` slots [0, len)) into the radix tail."""
        self.radix.insert(ns, ids, lambda a, b: kv[:, :, :, a:b].clone())

    def warm(self, tenant: str, segments: list[SegmentInput]) -> WarmResult:
        """Compute and cache ``segments`` (as the start of a chat prompt) without generating."""
        if not segments:
            raise EngineError("segments must not be empty", "segments")
        ns = self.namespace(tenant)
        with self.scheduler.reserve(tenant) as place:
            self.limits.check_text_size(sum(len(s.content or "") for s in segments), "segments")
            pending: dict[str, tuple[int, ...]] = {}
            prompt = self._build_prompt(tenant, ns, [], segments, [], False, pending)
            units = Prompt(prompt.units, ())
            return self.scheduler.submit(lambda job: self._warm_job(job, ns, units, pending), tenant,
                                         meta=(ns, units), place=place)

    def _warm_job(self, job: Job, ns: str, units: Prompt, pending: dict[str, tuple[int, ...]]):
        run = self.path.start(ns, units, 0)
        self.memo.commit(ns, pending)
        try:
            yield from self.path.prefill_units(job, run, units)
            yield from self.blender.compute_standalone(self.blender.standalone_namespace(ns),
                                                       self.blender.missing(ns, units))
        finally:
            self.path.release(run)
        return WarmResult(len(run.usage), run.parent.chain, run.usage)

    # ------------------------------------------------------------------ prompt
    def _build_prompt(self, tenant: str, ns: str, messages: list[dict], segments: list[SegmentInput],
                      tools: list[dict], generation_prompt: bool,
                      pending: dict[str, tuple[int, ...]] | None = None) -> Prompt:
        """``pending``: new token ids go there, for the memo once the request is
        admitted (``CachePath.start`` succeeded), so a refused request leaves nothing."""
        if len(segments) > self.cache_cfg.max_segments:
            raise EngineError(f"too many segments: {len(segments)} (the limit is "
                              f"{self.cache_cfg.max_segments})", "segments")
        resolved = resolve_segments(segments, tenant, ns, self.memo, self.registry, pending)
        try:
            return build_prompt(self.tokenizer, self.memo, ns, resolved, messages, tools,
                                generation_prompt, pending, chunks=self.cache_cfg.blend == "auto")
        except TemplateError as exc:
            raise EngineError(str(exc), "messages") from exc

    # ------------------------------------------------------------------ tenants
    def _retire(self, tenant: str) -> tuple[str, str, int]:
        """Move ``tenant`` to a new namespace (its next generation) and drop what its
        old one and that one's standalone copies hold in RAM; returns (old namespace,
        its standalone namespace, nodes removed). Requests and background jobs still
        running insert into the retired namespaces, swept when they end."""
        with self._lock:
            ns = self.namespace(tenant)
            ns_s = self.blender.standalone_namespace(ns)
            self._purges[ns_s] = self._purges.get(ns_s, 0) + 1  # queued background jobs skip work
            self._generation[tenant] = self._generation.get(tenant, 0) + 1
            removed = (len(self.tree.purge(ns)) + len(self.tree.purge(ns_s))
                       + len(self.radix.purge(ns)))
            self.residency.retired |= {ns, ns_s}
            self.residency.sweep_retired()
        return ns, ns_s, removed

    def _estimate(self, job: Job) -> int:
        """Cached prefix tokens of a queued chat/warm job (read-only walk of its
        own tenant's tree), for admission order."""
        if job.meta is None:
            return 0
        ns, prompt = job.meta
        return sum(n.n_tokens for n in self.tree.peek(ns, [u.key.digest for u in prompt.units]))
