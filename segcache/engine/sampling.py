"""Next-token choice from logits: greedy, temperature, top-k, top-p, seeded."""

from __future__ import annotations

import math

import torch

from segcache.engine.types import SamplingParams

_SMALL_TEMPERATURE = 1e-3
_TINY_TEMPERATURE = 1e-30  # float32 logits 1e-6 apart are then e^-1e24 apart: 0


def argmax(logits: torch.Tensor) -> int:
    """The first index of the largest of ``logits`` [vocab], as ``torch.argmax``; on
    the CPU through numpy, ~20x faster on a vocabulary row (torch's single-row
    reduction takes ~60 us a call, once per sequence per step)."""
    if logits.is_cpu and logits.dtype == torch.float32:
        return int(logits.numpy().argmax())
    return int(torch.argmax(logits))


class Sampler:
    """One per request; owns the request's random generator so a ``seed`` gives
    the same tokens whatever else the server is doing."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits the choice is made from: ``logits`` [vocab] plus ``logit_bias``."""
        if not self.params.logit_bias:
            return logits
        ids, bias = zip(*self.params.logit_bias, strict=True)
        return logits.index_add(0, torch.tensor(ids), torch.tensor(bias, dtype=logits.dtype))

    def sample(self, logits: torch.Tensor) -> int:
        """``logits``: [vocab] float32, already ``adjust``ed. Returns a token id."""
        p = self.params
        if p.greedy:
            return argmax(logits)
        if p.temperature >= _SMALL_TEMPERATURE:
            logits = logits / p.temperature
        else:
            # Shifted so the best logit is 0: the others go to -inf (probability 0), never
            # to inf - inf = nan; below float32's range the distribution no longer changes.
            logits = (logits - logits.max()) / max(p.temperature, _TINY_TEMPERATURE)
        if p.top_k > 0:
            k = min(p.top_k, logits.shape[-1])
            kth = torch.topk(logits, k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, -1)
        if p.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            cum = torch.cumsum(sorted_p, -1)
            # Keep the smallest set whose mass reaches top_p (always at least one token).
            drop = cum - sorted_p > p.top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        return self._draw(probs)

    def _draw(self, probs: torch.Tensor) -> int:
        """One token from ``probs`` [vocab] (>= 0, any positive sum) with the request's
        generator: on the CPU by inverting the cumulative sum (~40 us a row where
        ``torch.multinomial`` takes ~1 ms, once per sampled sequence per step). A token
        of probability 0 is never drawn: the first sum above the target is never one
        that a zero added nothing to."""
        cum = torch.cumsum(probs, 0, dtype=torch.float64) if probs.is_cpu else None
        total = float(cum[-1]) if cum is not None else 0.0  # float64: no drift over the vocab
        if not 0.0 < total < math.inf:  # not on the CPU, or nan: multinomial (it raises on nan)
            return int(torch.multinomial(probs, 1, generator=self.generator))
        u = float(torch.rand(1, generator=self.generator, dtype=torch.float64))
        target = min(u * total, math.nextafter(total, 0.0))  # below the last sum, always
        return int(torch.searchsorted(cum, torch.tensor([target], dtype=torch.float64), right=True))
