"""/v1/completions: longest-common-prefix reuse across all cached prompts (radix tail)."""

from __future__ import annotations

import pytest

from segcache.engine.types import SamplingParams

GREEDY = SamplingParams(max_tokens=4, temperature=0.0)
BASE = "The quick brown fox jumps over the lazy dog. " * 4
PROMPTS = [BASE + "Then it slept.", BASE[:90] + "A different ending here.", BASE + "Then it ran away fast."]


def lcp(a, b) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def run_case(engine, tenant="t"):
    seen: list[tuple[int, ...]] = []
    results = []
    for text in PROMPTS:
        ids = tuple(engine.tokenizer.encode(text))
        expect = min(max((lcp(ids, s) for s in seen), default=0), len(ids) - 1)
        r = engine.complete(tenant, text, GREEDY)
        assert r.cached_tokens == expect, text
        assert r.prompt_tokens == len(ids)
        seen.append(ids + tuple(r.token_ids))
        results.append(r)
    return results


def test_longest_cached_prefix_is_reused_exactly(tiny_engine_factory):
    engine = tiny_engine_factory()
    results = run_case(engine)
    assert results[1].cached_tokens > 0 and results[2].cached_tokens > results[1].cached_tokens
    engine.radix.check_integrity()
    # an exact repeat reuses all but the last prompt token, and gives the same tokens
    again = engine.complete("t", PROMPTS[0], GREEDY)
    assert again.cached_tokens == again.prompt_tokens - 1
    assert again.token_ids == results[0].token_ids
    # cached == cold
    cold = tiny_engine_factory()
    for text, r in zip(PROMPTS, results, strict=True):
        assert cold.complete("c", text, GREEDY).token_ids == r.token_ids
        cold.purge("c")
    # other tenants see nothing
    assert engine.complete("other", PROMPTS[0], GREEDY).cached_tokens == 0


def test_radix_respects_the_budget(tiny_engine_factory):
    from segcache.config import CacheConfig

    engine = tiny_engine_factory(CacheConfig(cache_bytes=30_000))
    for text in PROMPTS * 2:
        engine.complete("t", text, GREEDY)
        assert engine.tree.resident_bytes + engine.radix.resident_bytes <= 30_000
        engine.radix.check_integrity()
    assert engine.radix.stats()["evictions"] > 0


@pytest.mark.slow
def test_completions_reuse_through_openai_client(real_engine):
    from openai import OpenAI

    from segcache.config import CacheConfig
    from segcache.engine.engine import Engine
    from tests.server_harness import running_server

    engine = Engine(real_engine.runtime, real_engine.tokenizer, CacheConfig(), real_engine.model_name)
    with running_server(engine) as url:
        client = OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        seen: list[tuple[int, ...]] = []
        for text in PROMPTS:
            ids = tuple(engine.tokenizer.encode(text))
            r = client.completions.create(model=engine.model_name, prompt=text, max_tokens=4, temperature=0)
            expect = min(max((lcp(ids, s) for s in seen), default=0), len(ids) - 1)
            assert r.usage.prompt_tokens_details.cached_tokens == expect
            # These prompts diverge inside earlier prompts, so replies do not change the LCP.
            seen.append(ids)
