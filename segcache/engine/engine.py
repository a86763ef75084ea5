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
chunk of a message under ``--blend auto`` (see ``segcache.engine.prompt``). Blending is
``Blender``'s (``segcache.engine.blend``), the lower tiers ``Tiers``'; the runner, the
KV buffer pool and the run state have their own modules; ``EngineClient``
(``segcache.engine.types``) is what the server sees of all this. Node payloads are torch tensors
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

import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace

import torch

from segcache.config import CacheConfig, Config, SchedulerConfig
from segcache.engine.blend import Blender
from segcache.engine.cache_control import CacheAdmin
from segcache.engine.decode import Decoder, Sequence
from segcache.engine.detok import TextStream
from segcache.engine.grammar import Constraint, Grammars, grammar_for
from segcache.engine.kv_pool import KV_POOL_BYTES, KVPool, kv_bytes, split_kv
from segcache.engine.prompt import Prompt, TokenMemo, Unit, build_prompt, resolve_segments, sink_ids
from segcache.engine.run import RunState
from segcache.engine.runner import Runner
from segcache.engine.sampling import Sampler
from segcache.engine.scheduler import (
    Cancelled,
    Job,
    Scheduler,
    WaitFor,
    prefill,
)
from segcache.engine.tiering import Tiers, build_store
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


def _chat_chars(req: ChatRequest) -> int:
    """Characters of text a chat request brings (contents, tool calls, tools)."""
    n = sum(len(s.content or "") for s in req.segments)
    for m in req.messages:
        content = m.get("content")
        n += len(content) if isinstance(content, str) else 0
        n += sum(len(str(c)) for c in m.get("tool_calls") or ())
    return n + sum(len(str(t)) for t in req.tools)


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
        # disk, Redis (store None: RAM only)
        self.tiers = Tiers(build_store(cache, KV_LAYOUT_VERSION), self.tree, self.fingerprint, cache,
                           self._enforce_budget)
        self.radix = RadixTree(cache.cache_bytes, split_handle=split_kv, bytes_of=kv_bytes,
                               handle_len=lambda h: h.shape[3], clock=clock)
        self.registry = SegmentRegistry(clock, cache.registry_bytes, cache.tenant_registry_bytes,
                                        cache.tenant_registry_entries)
        self.memo = TokenMemo(tokenizer, cache.memo_bytes, cache.tenant_memo_bytes,
                              max_tokens=runtime.arch.max_position)
        self.grammars = Grammars(tokenizer.hf, runtime.arch.vocab_size)
        self._kv_pool = KVPool(runtime.new_kv, KV_POOL_BYTES)
        self._lock = threading.RLock()  # tree, radix, in-flight map: held by each engine step
        # (parent chain, digest) of every unit being computed -> the job computing it
        self._inflight: dict[tuple[str, str], int] = {}
        self._purges: dict[str, int] = {}  # namespace -> purges so far (see Blender.compute_standalone)
        # A purge moves the tenant to a new namespace (its generation); the old ones are
        # retired: unreachable, and swept of whatever jobs still running insert there.
        self._generation: dict[str, int] = {}
        self._retired: set[str] = set()
        self.scheduler = Scheduler(sched_cfg, Runner(runtime),
                                   lambda key: key in self._inflight, self._lock, self._estimate)
        self.blender = Blender(runtime=runtime, tree=self.tree, cache_cfg=cache,
                               scheduler=self.scheduler, inflight=self._inflight, purges=self._purges,
                               sink=sink_ids(tokenizer), enforce_budget=self._enforce_budget,
                               sweep_retired=self._sweep_retired)
        self.cache = CacheAdmin(tree=self.tree, radix=self.radix, registry=self.registry,
                                memo=self.memo, lock=self._lock, cache_cfg=cache,
                                model_name=model_name, fingerprint=self.fingerprint,
                                namespace=self.namespace, retire=self._retire,
                                standalone_namespace=self.blender.standalone_namespace,
                                tier_stats=self.tiers.stats, purge_tiers=self.tiers.purge,
                                check_text_size=self._check_text_size)
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
        self._check_sampling(req.sampling)
        constraint = self._constraint(req)
        ns = self.namespace(req.tenant)
        with self.scheduler.reserve(req.tenant) as place:
            self._check_text_size(_chat_chars(req), "messages")
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
        filters = [_ChoiceFilter(on_text, i) for i in range(req.sampling.n)] \
            if parse_calls and on_text is not None else []
        emit = (lambda delta: filters[delta.choice](delta)) if filters else on_text
        run = self._start(ns, prompt, req.sampling.max_tokens)
        self.memo.commit(ns, pending)
        try:
            if self.tiers.store is not None and self.cache_cfg.blend != "off":
                # exact KV from a lower tier before any approximate (blended) reuse
                yield from self._prefill_units(job, run, prompt, loaded_only=True)
            plan = yield from self.blender.plan(job, run, prompt)
            yield from self._prefill_units(job, run, prompt, None if plan is None else plan.at,
                                           with_tail=plan is None)
            logits = run.tail_logits if plan is None else (yield from self.blender.blend(run, prompt, plan))
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
                    self.blender.derive(run, prompt)
                self.blender.schedule(ns, req.tenant, prompt)
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
        return self.submit_complete(tenant, prompt, sampling, on_text, is_cancelled).result()

    def submit_complete(self, tenant: str, prompt: str | list[int], sampling: SamplingParams,
                        on_text: Callback | None = None,
                        is_cancelled: CancelCheck | None = None) -> Future:
        """``complete`` without the wait (see ``submit_chat``)."""
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
            yield from self.blender.compute_standalone(self.blender.standalone_namespace(ns),
                                                       self.blender.missing(ns, units))
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
    def _start(self, ns: str, prompt: Prompt, max_tokens: int) -> RunState:
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
        run = RunState(kv, self.tree.root(ns), pinned=list(matched))
        run.prefix_chain = run.parent.chain
        for i, (node, unit) in enumerate(zip(matched, prompt.units, strict=False)):
            if i >= held:  # the first ``held`` are in this buffer already
                run.kv[:, :, :, run.pos:run.pos + node.n_tokens] = node.handle
            self._advance(run, node, unit.key, node.n_tokens, "hit", "ram")
        return run

    def _prefill_units(self, job: Job, run: RunState, prompt: Prompt, stop: int | None = None,
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
                node, tier = (yield from self.tiers.promote(run, prompt, i, stop)) or (None, None)
                if node is None and loaded_only:
                    return
                reused = 0
                if node is None:  # in no tier: compute it, after the head a sibling shares
                    reused = self._reuse_head(run, unit)
                    rest = unit.ids[reused:]
                    if with_tail and i == last and self._tail_with_unit(len(rest), len(prompt.tail)):
                        run.tail_logits = yield from prefill(rest + prompt.tail, run.kv,
                                                                   run.pos + reused)
                    else:
                        yield from prefill(rest, run.kv, run.pos + reused, logits=False)
                    node = self._insert(run, unit.key.digest, unit.ids, unit.key.ttl_s)
            finally:
                del self._inflight[key]
            status = "hit" if tier is not None else "partial" if reused else "miss"
            self._advance(run, node, unit.key, node.n_tokens, status, tier, reused)

    def _reuse_head(self, run: RunState, unit: Unit) -> int:
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

    def _insert(self, run: RunState, digest: str, ids: tuple[int, ...], ttl_s: float | None,
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
        self.tiers.publish(node, handle)
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

    def _advance(self, run: RunState, node: SegmentNode, key, n: int, status: str,
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

    def _keep_replies(self, run: RunState, tail: tuple[int, ...], result: GenerationResult,
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
            self._retired |= {ns, ns_s}
            self._sweep_retired()
        return ns, ns_s, removed

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
    def _generate(self, run: RunState, tail: tuple[int, ...], sampling: SamplingParams, t0: float,
                  on_text: Callback | None, is_cancelled: CancelCheck | None,
                  logits: torch.Tensor | None = None, constraint: Constraint | None = None):
        """Prefill the tail (unless its ``logits`` are given: computed already) and
        decode ``sampling.n`` choices from it; returns (result, their sequences).
        On a finish by EOS or length a choice's buffer holds every generated token
        but a final EOS (ready to be kept as a reply)."""
        if logits is None:
            logits = yield from prefill(tail, run.kv, run.pos)
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

    def _sequence(self, index: int, run: RunState, start: int, sampling: SamplingParams,
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

    def _result(self, run: RunState, tail_len: int, seqs: list[Sequence], t0: float) -> GenerationResult:
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

    def _cancelled(self, run: RunState, tail_len: int, t0: float) -> GenerationResult:
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

