"""Per-request records and their aggregates: latency percentiles, hit rate, cost.

Definitions (the runner measures, this module only computes):

- TTFT: request sent -> first streamed chunk carrying generated text
  (``delta.content`` non-empty). A role-only first chunk does not count: some
  servers send it before prefill.
- ITL (inter-token latency): (last text chunk - first text chunk) /
  (completion_tokens - 1), i.e. decode time per generated token.
- E2E: request sent -> end of the stream.
- cached tokens: ``usage.prompt_tokens_details.cached_tokens``, else segcache's
  ``usage.cached_prefix_tokens``; computed = prompt - cached - blended +
  recomputed (the tokens the server ran through the model).
- token hit rate: sum(cached) / sum(prompt) over requests that reported usage
  (exact prefix hits only).
- blended tokens: segcache's ``usage.segcache.blended_tokens``, prompt tokens
  whose KV came from a segment computed elsewhere (non-prefix reuse, CacheBlend);
  recomputed tokens: of those, the ones recomputed to restore cross-attention.
  None where the server does not report them.
- reused fraction: (sum(cached) + sum(blended)) / sum(prompt); the hit rate
  where nothing is blended.
- cost (seed 000's model): computed input tokens at the input price plus a
  cache-write premium, cached tokens at the input price less the discount;
  the baseline is every prompt token at the input price. Blended tokens are
  priced as computed: no provider's price list has them.
- output agreement (``agreement``): how close the texts generated in one run
  are to those of a reference run of the same requests (e.g. with the cache
  purged before each request): the fraction of requests with the same text, and
  the mean fraction of leading characters and of leading words they share.
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
    blended_tokens: int | None = None  # segcache with blending; None: not reported
    recomputed_tokens: int | None = None
    segments: list[dict] | None = None  # segcache's per-segment {id, status, tokens[, recomputed]}
    text: str = ""
    error: str | None = None

    @property
    def hit_rate(self) -> float | None:
        if not self.prompt_tokens or self.cached_tokens is None:
            return None
        return self.cached_tokens / self.prompt_tokens

    @property
    def reused_rate(self) -> float | None:
        """(cached + blended) / prompt; None where the server reports no blending."""
        if not self.prompt_tokens or self.blended_tokens is None:
            return None
        return ((self.cached_tokens or 0) + self.blended_tokens) / self.prompt_tokens


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
    blended = _sum_reported([r.blended_tokens for r in used])
    recomputed = _sum_reported([r.recomputed_tokens for r in used])
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
        "computed_tokens": prompt - cached - (blended or 0) + (recomputed or 0),
        "completion_tokens": completion,
        "token_hit_rate": cached / prompt if prompt else None,
        "blended_tokens": blended,
        "recomputed_tokens": recomputed,
        "reused_fraction": (cached + (blended or 0)) / prompt if prompt else None,
        "wall_s": wall_s,
        "output_tokens_per_s": completion / wall_s if wall_s > 0 else None,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else None,
        "cost_usd": sum(pricing.cost(r.prompt_tokens, r.cached_tokens or 0) for r in used),
        "cost_no_cache_usd": pricing.baseline(prompt),
    }


def _sum_reported(values: list[int | None]) -> int | None:
    reported = [v for v in values if v is not None]
    return sum(reported) if reported else None


def leading_match(a: str | list[str], b: str | list[str]) -> float:
    """The share of the longer of ``a`` and ``b`` that their common start covers
    (1.0 for two empty ones)."""
    longest = max(len(a), len(b))
    if not longest:
        return 1.0
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n / longest


def agreement(pairs: list[tuple[str, str]]) -> dict:
    """Output agreement of ``(reference text, text)`` pairs, one per request:
    ``exact_match`` (the fraction of equal texts), ``leading_chars`` and
    ``leading_words`` (means of ``leading_match`` over characters and over
    whitespace-separated words, a tokenizer-free stand-in for tokens)."""
    n = len(pairs)
    if not n:
        return {"pairs": 0, "exact_match": None, "leading_chars": None, "leading_words": None}
    return {
        "pairs": n,
        "exact_match": sum(a == b for a, b in pairs) / n,
        "leading_chars": sum(leading_match(a, b) for a, b in pairs) / n,
        "leading_words": sum(leading_match(a.split(), b.split()) for a, b in pairs) / n,
    }
