"""The engine loop: one thread runs every request as a coroutine.

A request is a generator (see ``Engine``) that does its cache bookkeeping in
plain Python and *yields* the model work it needs:

    PrefillWork(ids, kv, start)  -> the loop runs it in chunks across ticks, then
                                    sets ``.logits`` (last row) and resumes the job
    BlendWork(...)               -> a PrefillWork run as one computation (selective
                                    recomputation over reused KV, see engine.blend),
                                    a few layers per tick while others decode
    DecodeWork(token, kv, pos)   -> all pending decodes of a tick run as one batch
    [DecodeWork, ...]            -> several sequences of one job (its n choices), in
                                    the same batch
    WaitFor(key)                 -> another job is computing that unit; resume
                                    when it is no longer in flight (then it hits)
    LoadWait(future)             -> a unit's KV is being read from a lower cache tier
                                    (disk, Redis) on a loader thread; resume when done

One tick: admit waiting jobs, advance every job that is not waiting on work, run one
batched decode step for all decoding jobs, then prefill chunks (one while others
decode, so their streams keep moving; a few when idle), shortest job first; a
background job's chunks (``submit_background``: standalone blend copies) run only in
ticks where no request prefills, one slice of layers of about ``background_pause_s``
per tick, so they add at most that to a time to first token (whole chunks, up to
``idle_prefill_chunks`` of them a tick, kept the next request waiting up to ~1 s).
Chunk boundaries are fixed relative to each unit's start, so KV never depends on
load. While others decode, a chunk that would take longer than ``decode_pause_s``
runs a few layers per tick (same arithmetic, bit-identical KV). Cancellation and
deadlines are checked every tick: a cancelled job gets ``_Cancelled`` thrown in (it
returns a "cancelled" result and releases its pins); a job past its deadline is
closed (its ``finally`` releases the pins) and fails with 504.

Admission: across tenants, the tenant with the fewest running requests goes first,
then the one admitted least recently (round robin), then the oldest request, so a
tenant flooding the queue cannot starve another; within that tenant, the request
with the longest cached prefix goes first unless someone has waited ``max_wait_s``
(so the order reveals nothing about other tenants' caches and nobody starves). A request takes its place in the
queue (``reserve``) before the engine tokenizes it: a full queue, or a tenant
holding ``tenant_max_waiting`` places already, is refused with 429 before any work.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any

import torch

from segcache.config import SchedulerConfig
from segcache.engine.types import OverloadedError, RequestTimeoutError, ShuttingDownError

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """Thrown into a job whose client is gone."""


def _log_failure(future: Future) -> None:
    if future.exception() is not None:
        log.error("background job failed", exc_info=future.exception())


@dataclass(eq=False)
class PrefillWork:
    ids: tuple[int, ...]
    kv: torch.Tensor  # [n_layers, 2, n_kv_heads, capacity, head_dim]
    start: int
    done: int = 0
    logits: torch.Tensor | None = None  # [vocab] of the last token, once done
    need_logits: bool = True  # False: only the KV is wanted (no LM head)
    # the chunk being run a few layers at a time: (its end, its steps, layers done)
    slices: tuple[int, Generator[int, None, torch.Tensor], int] | None = field(default=None, repr=False)

    @property
    def remaining(self) -> int:
        return len(self.ids) - self.done


@dataclass(eq=False)
class BlendWork(PrefillWork):
    """A selective recomputation (CacheBlend) of ``ids``: one computation over all of
    them (not chunked), run a few layers per tick while other requests decode."""

    reused: torch.Tensor | None = None  # [T] bool: K/V already placed in ``kv``
    layer: int = 1
    ratio: float = 0.15
    filter_from: int | None = None  # gradual filtering from this layer (None: from ``layer``)
    recomputed: torch.Tensor | None = None  # [T] bool, once done


@dataclass(eq=False)
class DecodeWork:
    token: int
    kv: torch.Tensor
    pos: int
    logits: torch.Tensor | None = None  # [vocab]


@dataclass(eq=False)
class WaitFor:
    key: tuple[str, str]  # (parent chain, segment digest) computed by another job


@dataclass(eq=False)
class LoadWait:
    future: Future  # of a lower-tier load (``TieredStore.fetch_async``)


Work = PrefillWork | DecodeWork | list[DecodeWork] | WaitFor | LoadWait
JobGen = Generator[Work, None, Any]


@dataclass(eq=False)
class Job:
    gen_factory: Callable[[Job], JobGen]
    tenant: str
    is_cancelled: Callable[[], bool]
    deadline: float
    future: Future = field(default_factory=Future)
    id: int = 0
    arrived: float = 0.0
    priority: int = 0  # cached prefix tokens, set at admission time by ``estimate``
    meta: Any = None  # what ``estimate`` needs (the engine's namespace and prompt)
    background: bool = False  # nobody waits for it: its prefill gives way to requests'
    gen: JobGen | None = None
    work: Work | None = None


def _decodes(work: DecodeWork | list[DecodeWork]) -> list[DecodeWork]:
    return work if isinstance(work, list) else [work]


class Scheduler:
    """Owns the engine thread. ``runner`` provides ``prefill(PrefillWork, n, pause_s)``
    (the next chunk of ``n`` tokens, or the next slice of layers of it taking about
    ``pause_s`` when that is not None) and
    ``decode(list[DecodeWork])``; ``inflight`` tells whether a WaitFor key is
    still being computed; ``estimate(job)`` gives the cached prefix used to order
    one tenant's waiting jobs; ``lock`` is held during every tick."""

    def __init__(self, cfg: SchedulerConfig, runner: Any, inflight: Callable[[tuple[str, str]], bool],
                 lock: threading.RLock, estimate: Callable[[Job], int] | None = None) -> None:
        self.cfg = cfg
        self.runner = runner
        self._inflight = inflight
        self._lock = lock
        self._estimate = estimate or (lambda job: 0)
        self._cv = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._ids = itertools.count(1)
        self._preparing: Counter[str] = Counter()  # places reserved, per tenant, not yet queued
        self._admissions = itertools.count(1)
        self._admitted: dict[str, int] = {}  # tenant -> when it last had a job admitted
        self._stopping = False
        self.steps = 0
        self._thread = threading.Thread(target=self._loop, name="segcache-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ API
    @contextlib.contextmanager
    def reserve(self, tenant: str) -> Iterator[list[str]]:
        """A place in the queue for a request about to be prepared (tokenized), held
        until ``submit(place=...)`` queues it or the block ends. Raises OverloadedError
        (429) at once, before that work, when the queue or the tenant's share is full."""
        with self._cv:
            self._check_room(tenant)
            self._preparing[tenant] += 1
        place = [tenant]
        try:
            yield place
        finally:
            self._release(place)

    def _release(self, place: list[str] | None) -> None:
        """Give back a reserved place, once (``_cv`` is reentrant: callers may hold it)."""
        if place:
            with self._cv:
                tenant = place.pop()
                self._preparing[tenant] -= 1
                if self._preparing[tenant] <= 0:
                    del self._preparing[tenant]

    def _check_room(self, tenant: str) -> None:
        if self._stopping:
            raise ShuttingDownError("the server is shutting down; retry on another replica")
        queued = len(self._waiting) + self._preparing.total()
        if queued >= self.cfg.max_waiting:
            raise OverloadedError(
                f"the server is at capacity: {len(self._running)} requests running and "
                f"{queued} waiting (the limit); retry after {self.cfg.retry_after_s} s",
                self.cfg.retry_after_s)
        mine = sum(j.tenant == tenant for j in self._waiting) + self._preparing[tenant]
        if mine >= self.cfg.tenant_limit:
            raise OverloadedError(
                f"this API key's tenant has {mine} requests waiting, its share of the queue "
                f"({self.cfg.tenant_limit}); retry after {self.cfg.retry_after_s} s",
                self.cfg.retry_after_s)

    def submit(self, gen_factory: Callable[[Job], JobGen], tenant: str,
               is_cancelled: Callable[[], bool] | None = None, timeout_s: float | None = None,
               meta: Any = None, place: list[str] | None = None) -> Any:
        """Queue a job and block until it finishes; returns its result or raises
        its exception. ``place``: what ``reserve`` gave (the job takes it over);
        without one, raises OverloadedError (429) when the queue is full."""
        return self.enqueue(gen_factory, tenant, is_cancelled, timeout_s, meta, place).result()

    def enqueue(self, gen_factory: Callable[[Job], JobGen], tenant: str,
                is_cancelled: Callable[[], bool] | None = None, timeout_s: float | None = None,
                meta: Any = None, place: list[str] | None = None) -> Future:
        """``submit`` without the wait: the job's future (its result or exception),
        for callers that await it instead of holding a thread."""
        now = time.monotonic()
        job = Job(gen_factory, tenant, is_cancelled or (lambda: False),
                  now + (timeout_s or self.cfg.request_timeout_s), arrived=now, meta=meta)
        with self._cv:
            if not place:
                self._check_room(tenant)
            elif self._stopping:
                raise ShuttingDownError("the server is shutting down; retry on another replica")
            job.id = next(self._ids)
            self._waiting.append(job)
            self._release(place)  # counted as waiting from now on
            self._cv.notify_all()
        return job.future

    def submit_background(self, gen_factory: Callable[[Job], JobGen], tenant: str) -> Job | None:
        """Queue a job nobody waits for (its errors are logged); None when the
        queue is full or the server is stopping."""
        now = time.monotonic()
        job = Job(gen_factory, tenant, lambda: False, now + self.cfg.request_timeout_s, arrived=now,
                  background=True)
        job.future.add_done_callback(_log_failure)
        with self._cv:
            if self._stopping or len(self._waiting) + self._preparing.total() >= self.cfg.max_waiting:
                return None
            job.id = next(self._ids)
            self._waiting.append(job)
            self._cv.notify_all()
        return job

    def is_running(self, job_id: int) -> bool:
        """Whether job ``job_id`` has been admitted and not finished (engine thread)."""
        return any(j.id == job_id for j in self._running)

    def load(self) -> dict[str, int]:
        with self._cv:
            return {"running": len(self._running), "waiting": len(self._waiting)}

    def stop(self, drain: bool = True, timeout_s: float = 30.0) -> None:
        """Stop admitting; with ``drain`` let admitted and queued jobs finish."""
        with self._cv:
            self._stopping = True
            if not drain:
                for job in self._waiting:
                    job.future.set_exception(ShuttingDownError("the server is shutting down"))
                self._waiting.clear()
            self._cv.notify_all()
        self._thread.join(timeout_s)

    # ------------------------------------------------------------------ loop
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._running:
                    if self._stopping:
                        return
                    self._cv.wait()
            try:
                with self._lock:
                    self._admit()
                    self._tick()
            except Exception:  # a bug in the loop must not kill the server silently
                log.exception("engine loop error")
                self._fail_all(RuntimeError("internal engine error"))

    def _admit(self) -> None:
        with self._cv:
            while self._waiting and len(self._running) < self.cfg.max_running:
                job = self._pick()
                self._admitted[job.tenant] = next(self._admissions)
                if len(self._admitted) > 4096:  # only the order among waiting tenants matters
                    self._admitted = {j.tenant: self._admitted.get(j.tenant, 0) for j in self._waiting}
                self._waiting.remove(job)
                self._running.append(job)

    def _pick(self) -> Job:
        head = self._waiting[0]
        if time.monotonic() - head.arrived >= self.cfg.max_wait_s or len(self._waiting) == 1:
            return head
        running = Counter(j.tenant for j in self._running)
        head = min(self._waiting, key=lambda j: (running[j.tenant],
                                                 self._admitted.get(j.tenant, 0), j.id))
        same = [j for j in self._waiting if j.tenant == head.tenant]
        for j in same:
            j.priority = self._estimate(j)
        return max(same, key=lambda j: (j.priority, -j.id))

    def _tick(self) -> None:
        for job in list(self._running):
            self._advance(job)
        decoding = [j for j in self._running if isinstance(j.work, DecodeWork | list)]
        if decoding:
            self.runner.decode([w for j in decoding for w in _decodes(j.work)])
            self.steps += 1
            for job in decoding:
                self._advance(job, resume=True)
        chunks = 1 if decoding else self.cfg.idle_prefill_chunks
        prefilling = sorted((j for j in self._running if isinstance(j.work, PrefillWork)),
                            key=lambda j: (j.work.remaining, j.id))
        if any(not j.background for j in prefilling):
            # A request's prefill is its time to first token: background work (standalone
            # blend copies) waits for it, and runs beside decoding or when idle.
            prefilling = [j for j in prefilling if not j.background]
        for job in prefilling:
            while chunks > 0 and job in self._running and isinstance(job.work, PrefillWork):
                if self._check_cancel(job):
                    break
                # While others decode, a long chunk runs in slices of layers (one per tick).
                pause = self.cfg.decode_pause_s if decoding else None
                if job.background:  # nobody waits for it: one short slice, then the queue
                    pause, chunks = self.cfg.background_pause_s, 1
                self.runner.prefill(job.work, self.cfg.prefill_chunk, pause)
                chunks -= 1
                if job.work.remaining == 0:
                    self._advance(job, resume=True)
                    break
        for job in list(self._running):
            if isinstance(job.work, WaitFor) and not self._inflight(job.work.key):
                self._advance(job, resume=True)
        self._resume_loads(idle=not decoding and not prefilling)

    def _resume_loads(self, idle: bool) -> None:
        """Resume the jobs whose tier load is done; when no model work ran this tick,
        wait briefly for one instead of spinning on the lock."""
        loads = [j for j in self._running if isinstance(j.work, LoadWait)]
        if idle and loads and not any(j.work.future.done() for j in loads):
            wait_futures([j.work.future for j in loads], timeout=0.005, return_when=FIRST_COMPLETED)
        for job in loads:
            if job.work.future.done():
                self._advance(job, resume=True)

    def _check_cancel(self, job: Job) -> bool:
        """Deliver cancellation or a deadline; True if the job was stopped."""
        if time.monotonic() > job.deadline:
            job.gen.close()
            self._finish(job, exc=RequestTimeoutError(
                f"the request did not finish within {self.cfg.request_timeout_s:.0f} s"))
            return True
        if job.is_cancelled():
            self._step(job, lambda: job.gen.throw(Cancelled()))
            return job not in self._running or not isinstance(job.work, PrefillWork)
        return False

    def _advance(self, job: Job, resume: bool = False) -> None:
        """Run ``job`` until it yields work it has to wait for."""
        if job not in self._running:
            return
        if job.gen is None:
            job.gen = job.gen_factory(job)
            self._step(job, lambda: next(job.gen))
        elif resume:
            self._step(job, lambda: next(job.gen))
        elif job.work is not None and self._check_cancel(job):
            return

    def _step(self, job: Job, fn: Callable[[], Work]) -> None:
        try:
            job.work = fn()
        except StopIteration as stop:
            self._finish(job, result=stop.value)
        except BaseException as exc:  # the job's own error (bad input, ...) goes to its caller
            self._finish(job, exc=exc)

    def _finish(self, job: Job, result: Any = None, exc: BaseException | None = None) -> None:
        job.work = None
        if job in self._running:
            self._running.remove(job)
        if exc is not None:
            job.future.set_exception(exc)
        else:
            job.future.set_result(result)

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            for job in list(self._running):
                if job.gen is not None:
                    job.gen.close()
                self._finish(job, exc=exc)


def prefill(ids: tuple[int, ...], kv: Any, start: int, logits: bool = True):
    """A job's prefill of ``ids`` at slots ``start..`` of ``kv`` (``yield from`` it):
    returns the last logits [vocab], or None without ``logits`` (KV only: no LM head)."""
    work = PrefillWork(ids, kv, start, need_logits=logits)
    yield work
    return work.logits
