"""Background work (the standalone copies blending needs) gives way to requests: while
a request prefills (its time to first token), no background chunk runs; the background
job goes on after it, beside decoding and when the engine is idle, one short slice of
layers per tick, so a request that arrives meanwhile waits for one slice at most. (A request waiting
for a background job's unit does not prefill meanwhile, so the job runs: test_blend.)"""

from __future__ import annotations

import threading

from segcache.config import SchedulerConfig
from segcache.engine.scheduler import Scheduler, prefill


class RecordingRunner:
    """Prefills ``n`` tokens per call (no model), noting whose."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.pauses: dict[str, set] = {}
        self.on_call = None  # called with the job's name before each call

    def prefill(self, work, n, pause_s=None) -> None:
        if self.on_call is not None:
            self.on_call(work.kv)
        self.calls.append(work.kv)  # the "kv" is the job's name here
        self.pauses.setdefault(work.kv, set()).add(pause_s)
        work.done = min(len(work.ids), work.done + n)
        if work.remaining == 0:
            work.logits = "logits"

    def decode(self, works) -> None:  # pragma: no cover - no decoding in these jobs
        raise AssertionError("no decode expected")


def _job(name: str, n_tokens: int):
    def gen(job):
        yield from prefill(tuple(range(n_tokens)), name, 0, logits=False)
        return name
    return gen


def test_a_requests_prefill_runs_before_any_further_background_chunk():
    runner = RecordingRunner()
    sched = Scheduler(SchedulerConfig(prefill_chunk=4, idle_prefill_chunks=1), runner,
                      lambda key: False, threading.RLock())
    try:
        with sched._lock:  # hold the engine thread until both are queued
            background = sched.submit_background(_job("bg", 12), "t")
            with sched.reserve("t") as place:
                request = sched.enqueue(_job("req", 40), "t", None, place=place)
        assert request.result(timeout=10) == "req"
        background.future.result(timeout=10)
    finally:
        sched.stop()
    # The background job is shorter (3 chunks against 10), which would put it first among
    # requests; it waits instead until the request's prefill is done, then finishes.
    assert runner.calls == ["req"] * 10 + ["bg"] * 3


def test_background_work_runs_when_the_engine_is_otherwise_idle():
    runner = RecordingRunner()
    sched = Scheduler(SchedulerConfig(prefill_chunk=4), runner, lambda key: False, threading.RLock())
    try:
        job = sched.submit_background(_job("bg", 16), "t")
        assert job.future.result(timeout=10) == "bg"
    finally:
        sched.stop()
    assert runner.calls == ["bg"] * 4


def test_a_request_arriving_during_background_work_waits_one_slice_at_most():
    """Idle, the engine runs up to idle_prefill_chunks chunks of a request per tick, but a
    background job gets one slice of about background_pause_s: the request that arrives
    during the first one prefills next (before, the idle tick ran four whole chunks)."""
    runner = RecordingRunner()
    cfg = SchedulerConfig(prefill_chunk=4, idle_prefill_chunks=4)
    sched = Scheduler(cfg, runner, lambda key: False, threading.RLock())
    request = []

    def arrive(name):
        if name == "bg" and not request:
            with sched.reserve("t") as place:
                request.append(sched.enqueue(_job("req", 8), "t", None, place=place))

    runner.on_call = arrive
    try:
        background = sched.submit_background(_job("bg", 16), "t")
        background.future.result(timeout=10)
        assert request[0].result(timeout=10) == "req"
    finally:
        sched.stop()
    assert runner.calls == ["bg", "req", "req", "bg", "bg", "bg"]
    assert runner.pauses == {"bg": {cfg.background_pause_s}, "req": {None}}
