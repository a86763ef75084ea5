"""The request runner: executes the scheduler's model work (prefill chunks or
slices of layers, blends layer by layer, batched decode steps) on the runtime,
and keeps the measured prefill speed that sizes the slices."""

from __future__ import annotations

import math
import time
from collections.abc import Generator
from typing import Any

import torch

from segcache.engine.scheduler import BlendWork, DecodeWork, PrefillWork
from segcache.model.runtime import ModelRuntime

_NO_ROWS = torch.empty(0, dtype=torch.long)  # logits_at for a chunk whose logits nobody reads


class Runner:
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
        layer, logits = step_layers(steps, arch.n_layers)
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
                work.reused, work.layer, work.ratio, work.filter_from), 0)
        steps, n_layers = work.slices[1], self.runtime.arch.n_layers
        t0 = last = time.perf_counter()
        while (done := step_layers(steps, n_layers))[1] is None:
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


def step_layers(steps: Generator[int, None, Any], n_layers: int) -> tuple[int, Any]:
    """One step of a layer generator (``prefill_steps``, ``blend_steps``):
    (layers done, None), or (n_layers, its result) once it has finished."""
    with torch.inference_mode():
        try:
            return next(steps), None
        except StopIteration as finished:
            return n_layers, finished.value
