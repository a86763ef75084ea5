"""Where a constrained decode step's time goes, in one process (no HTTP).

Builds an engine (the real default model, or ``--tiny`` random weights), runs
``--streams`` requests at once (greedy, or ``--temperature``), plain and then constrained by the
``segcache bench constrained`` schema, and prints for each kind: the CPU time per
sequence per step spent choosing tokens (``Decoder._choose``: bias, mask,
sampling, detokenisation; of it, llguidance's allowed sets and masking rows)
against the batched forward's wall time (``decode``), and with
``--top N`` the engine thread's cProfile (the top functions by own time).

    PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/profile_constrained_step.py [--tiny] [--temperature 1] [--top 25]

Figures from a shared machine are for the breakdown, not for publishing.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import threading
import time

from segcache.bench.constrained import FACTS_FORMAT, _prompt
from segcache.config import CacheConfig, Config, ModelConfig, read_environment
from segcache.engine import decode as decode_mod
from segcache.engine.engine import Engine
from segcache.engine.grammar import Constraint
from segcache.engine.scheduler import Scheduler
from segcache.engine.types import ChatRequest, SamplingParams


class _Timer:
    """Time and call count of a wrapped function. ``clock``: ``time.thread_time`` (CPU
    time of the calling thread: steady on a loaded machine, where a preempted thread's
    wall time is not) for work done in the engine thread, ``time.perf_counter`` for
    work spread over other threads (the forward's)."""

    def __init__(self, clock=time.thread_time) -> None:
        self.clock = clock
        self.seconds = 0.0
        self.calls = 0

    def wrap(self, fn):
        def timed(*args, **kw):
            t = self.clock()
            try:
                return fn(*args, **kw)
            finally:
                self.seconds += self.clock() - t
                self.calls += 1
        return timed


def _engine(tiny: bool) -> Engine:
    cache_dir = read_environment().cache_dir
    if not tiny:
        return Engine.load(Config(model=ModelConfig(cache_dir=cache_dir), cache=CacheConfig()),
                           progress=False)
    from segcache.model.tokenizer import ChatTokenizer
    from segcache.model.weights import resolve_model
    from tests.tiny import tiny_runtime

    tok = ChatTokenizer.load(resolve_model(None, cache_dir, progress=False).directory, (2,))
    return Engine(tiny_runtime(), tok, CacheConfig(), "tiny")


def _round(engine: Engine, n: int, max_tokens: int, constrained: bool, offset: int,
           temperature: float = 0.0) -> list:
    results: list = [None] * n
    fmt = FACTS_FORMAT if constrained else None

    def ask(i: int) -> None:
        req = ChatRequest("p", [{"role": "user", "content": _prompt(offset + i)}],
                          sampling=SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                                  seed=offset + i),
                          response_format=fmt)
        results[i] = engine.chat(req)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def profile(engine: Engine, n: int, max_tokens: int, constrained: bool, top: int,
            temperature: float = 0.0) -> None:
    """One round of ``n`` streams; ``top`` > 0 also runs the engine thread under cProfile
    (which inflates small functions: the per-call figures are from a run without it)."""
    _round(engine, n, 4, constrained, 1000)  # warm-up: tokenizer, grammar compiler
    prof = cProfile.Profile()
    choose, forward = _Timer(), _Timer(time.perf_counter)
    runner = engine.scheduler.runner
    tick, run_decode = Scheduler._tick, runner.decode
    original_choose = decode_mod.Decoder._choose
    allowed, mask = _Timer(), _Timer()
    # (an older tree without ``_allowed``: its masks are timed whole)
    original_allowed = getattr(Constraint, "_allowed", None)
    original_mask = Constraint.mask

    def profiled_tick(self):
        prof.enable()
        try:
            tick(self)
        finally:
            prof.disable()

    if top:
        Scheduler._tick = profiled_tick
    decode_mod.Decoder._choose = choose.wrap(original_choose)
    Constraint.mask = mask.wrap(original_mask)
    if original_allowed is not None:
        Constraint._allowed = allowed.wrap(original_allowed)
    runner.decode = forward.wrap(run_decode)
    try:
        results = _round(engine, n, max_tokens, constrained, 0, temperature)
    finally:
        Scheduler._tick, decode_mod.Decoder._choose = tick, original_choose
        Constraint.mask = original_mask
        if original_allowed is not None:
            Constraint._allowed = original_allowed
        runner.decode = run_decode
    kind = "constrained" if constrained else "plain"
    tokens = sum(r.completion_tokens for r in results)
    print(f"\n=== {kind}: {n} streams, {tokens} tokens, {forward.calls} batched steps")
    print(f"choose: {1e3 * choose.seconds / max(choose.calls, 1):.3f} ms CPU per sequence-step "
          f"({choose.calls} calls); forward: {1e3 * forward.seconds / max(forward.calls, 1):.2f} "
          f"ms wall per step")
    if constrained:  # mask() includes the _allowed() it calls
        print(f"  of which allowed set (llguidance): {1e3 * allowed.seconds / choose.calls:.3f} ms; "
              f"masking rows: {1e3 * mask.seconds / choose.calls:.3f} ms "
              f"({mask.calls} of {choose.calls} choices needed a masked row)")
    if top:
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
        print(out.getvalue())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="the tiny random model (fast)")
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top", type=int, default=0,
                   help="also profile with cProfile and show this many functions (default: 0, off)")
    args = p.parse_args()
    engine = _engine(args.tiny)
    try:
        for constrained in (False, True):
            profile(engine, args.streams, args.max_tokens, constrained, args.top, args.temperature)
    finally:
        engine.close(drain=False)


if __name__ == "__main__":
    main()
