"""Per-request records and their aggregates: latency percentiles, hit rate, cost.

Definitions (the runner measures, this module only computes):

- TTFT: request sent -> first streamed chunk carrying generated text
  (``delta.content`` non-empty). A role-only first chunk does not count: some
  servers send it before prefill.
- ITL (inter-token latency): (last text chunk - first text chunk) /
  (completion_tokens - 1), i.e. decode time per generated token.
- E2E: request sent -> end of the stream.
- cached tokens: ``usage.prompt_tokens_details.cached_tokens``, else segcache's
  ``usage.cached_prefix_tokens``; computed = prompt - cached.
- token hit rate: sum(cached) / sum(prompt) over requests that reported usage.
- cost (seed 000's model): computed input tokens at the input price plus a
  cache-write premium, cached tokens at the input price less the discount;
  the baseline is every prompt token at the input price.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Pricing:
    """$ per 1M input tokens, the fraction cached tokens save, and the extra
    fraction paid on tokens written to the cache (seed 000: ~$5/1M, ~90%)."""

    input_per_mtok: float = 5.0
    cached_discount: float = 0.9
    cache_write_premium: float = 0.25

    def __post_init__(self) -> None:
        if self.input_per_mtok < 0 or self.cache_write_premium < 0:
            raise ValueError("prices must be >= 0")
        if not 0 <= self.cached_discount <= 1:
            raise ValueError("cached_discount must be in [0, 1]")

    def cost(self, prompt_tokens: int, cached_tokens: int) -> float:
        computed = prompt_tokens - cached_tokens
        price = self.input_per_mtok / 1e6
        return (computed * (1 + self.cache_write_premium) + cached_tokens * (1 - self.cached_discount)) * price

    def baseline(self, prompt_tokens: int) -> float:
        return prompt_tokens * self.input_per_mtok / 1e6


@dataclass
class RequestRecord:
    """What one request measured. Times are seconds; None where not observed."""

    index: int
    label: str
    agent: int
    turn: int
    mode: str
    phase: str  # "run", or "cold" / "warm" in a cold-vs-warm run
    started_s: float = 0.0  # since the start of the run
    ttft_s: float | None = None
    itl_s: float | None = None
    e2e_s: float | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    cached_prefix_tokens: int | None = None
    completion_tokens: int | None = None
    segments: list[dict] | None = None  # segcache's per-segment {id, status, tokens}
    text: str = ""
    error: str | None = None

    @property
    def hit_rate(self) -> float | None:
        if not self.prompt_tokens or self.cached_tokens is None:
            return None
        return self.cached_tokens / self.prompt_tokens


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(records: list[RequestRecord], wall_s: float, pricing: Pricing) -> dict:
    """Aggregates of one phase's records (see the module docstring)."""
    ok = [r for r in records if r.error is None]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    e2es = [r.e2e_s for r in ok if r.e2e_s is not None]
    itls = [r.itl_s for r in ok if r.itl_s is not None]
    used = [r for r in ok if r.prompt_tokens is not None]
    prompt = sum(r.prompt_tokens for r in used)
    cached = sum(r.cached_tokens or 0 for r in used)
    completion = sum(r.completion_tokens or 0 for r in ok)
    return {
        "requests": len(records),
        "errors": len(records) - len(ok),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p90_s": percentile(ttfts, 90),
        "ttft_p99_s": percentile(ttfts, 99),
        "ttft_sum_s": sum(ttfts),
        "itl_mean_s": sum(itls) / len(itls) if itls else None,
        "e2e_p50_s": percentile(e2es, 50),
        "e2e_sum_s": sum(e2es),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "computed_tokens": prompt - cached,
        "completion_tokens": completion,
        "token_hit_rate": cached / prompt if prompt else None,
        "wall_s": wall_s,
        "output_tokens_per_s": completion / wall_s if wall_s > 0 else None,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else None,
        "cost_usd": sum(pricing.cost(r.prompt_tokens, r.cached_tokens or 0) for r in used),
        "cost_no_cache_usd": pricing.baseline(prompt),
    }
