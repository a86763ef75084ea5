"""A warm turn's last message unit and the generation prompt are one prefill, and the
unit's cached KV is still the same bits as a prefill of the unit alone.

That rests on the block kernels computing each row of a prefill chunk independently
of the other rows in the call (``ModelRuntime.independent_rows``): tested here on the
runtime (tiny model, block weights) and through the engine on the tiny and the real
model with the default ``auto`` plan, where a unit computed together with a tail is
later reused in the middle of a prompt and compared with a cold engine.
"""

from __future__ import annotations

import pytest
import torch

from segcache.config import CacheConfig, ModelConfig
from segcache.engine.engine import Engine
from segcache.engine.types import ChatRequest, SamplingParams, SegmentInput
from segcache.model.plan import PREFILL_ATTENTION_TOKENS, choose_plan
from segcache.model.runtime import ModelRuntime
from tests.tiny import TINY, tiny_state_dict

GREEDY = SamplingParams(max_tokens=5, temperature=0.0)
RULES = "Global rules: answer in English, cite files, never invent APIs. " * 10
SKILL = "Backend agent: Python, SQL, migrations, pytest. " * 4
Q1 = [{"role": "user", "content": "What does the auth module do?"}]
Q2 = Q1 + [{"role": "user", "content": "And which tests cover it? Answer briefly."}]


def tiny_auto(kernels) -> ModelRuntime:
    plan = choose_plan(TINY, ModelConfig(dtype="auto"), kernels=True, bf16_gemm=False)
    return ModelRuntime(TINY, tiny_state_dict(TINY), plan, source_digest="tiny-auto", kernels=kernels)


@pytest.mark.parametrize(("start", "unit", "tail"), [(0, 2, 3), (7, 13, 5), (40, 30, 1), (3, 130, 40),
                                                     (130, 250, 6)])  # calls of <= 256 tokens
def test_prefill_rows_do_not_depend_on_the_call(kernels, start, unit, tail):
    rt = tiny_auto(kernels)
    assert rt.independent_rows == PREFILL_ATTENTION_TOKENS
    ids = torch.randint(0, TINY.vocab_size, (start + unit + tail,), generator=torch.Generator().manual_seed(unit))
    end = start + unit + tail
    kv_apart, kv_together = rt.new_kv(end + 4), rt.new_kv(end + 4)
    with torch.inference_mode():
        if start:
            for kv in (kv_apart, kv_together):
                rt.prefill(ids[:start], torch.arange(start), kv, 0)
        rt.prefill(ids[start:start + unit], torch.arange(start, start + unit), kv_apart, start)
        apart = rt.prefill(ids[start + unit:], torch.arange(start + unit, end), kv_apart, start + unit)
        together = rt.prefill(ids[start:], torch.arange(start, end), kv_together, start)
    assert torch.equal(kv_apart[:, :, :, :start + unit], kv_together[:, :, :, :start + unit])
    torch.testing.assert_close(together, apart, atol=1e-4, rtol=1e-4)


def _counting(engine: Engine) -> list[int]:
    """Token counts of every prefill call the engine's runtime makes from now on."""
    calls: list[int] = []
    prefill, steps = engine.runtime.prefill, engine.runtime.prefill_steps

    def counted(ids, *a, **k):
        calls.append(len(ids))
        return prefill(ids, *a, **k)

    def counted_steps(ids, *a, **k):
        calls.append(len(ids))
        return steps(ids, *a, **k)

    engine.runtime.prefill, engine.runtime.prefill_steps = counted, counted_steps
    return calls


def _unit_kv(engine: Engine, tenant: str, result, depth: int) -> torch.Tensor:
    """The cached KV of the ``depth``-th unit of ``result``'s prompt (1-based)."""
    path = engine.tree.peek(engine.namespace(tenant), [unit.hash for unit in result.segments[:depth]])
    assert len(path) == depth
    return path[-1].handle


def _turns_against_cold(runtime: ModelRuntime, tokenizer) -> None:
    engines: list[Engine] = []

    def make_engine() -> Engine:
        engines.append(Engine(runtime, tokenizer, CacheConfig(), "auto"))
        return engines[-1]

    try:
        _turns_against_cold_with(make_engine)
    finally:
        for e in engines:
            e.close(drain=False)


def _turns_against_cold_with(make_engine) -> None:
    segments = [SegmentInput(id="rules", content=RULES), SegmentInput(id="skill", content=SKILL)]
    warm = make_engine()
    calls = _counting(warm)
    first = warm.chat(ChatRequest("t", Q1, segments, GREEDY))
    assert first.cached_tokens == 0
    q1_tokens = first.segments[-1].tokens
    # the units, then the question with the generation prompt in one call (no call of its own)
    assert calls[-1] > q1_tokens and q1_tokens not in calls
    calls.clear()
    second = warm.chat(ChatRequest("t", Q2, segments, GREEDY))
    # Q2's unit starts with the template tokens that also start the kept reply (its
    # sibling): a partial hit of those few, the rest computed as a cold prefill would
    assert [u.status for u in second.segments][:3] == ["hit", "hit", "hit"]
    assert second.segments[3].status in ("miss", "partial")
    assert len(calls) == 1 and calls[0] > second.segments[-1].tokens
    # A cold engine computes the first question alone (it is not last here).
    cold = make_engine()
    cold_second = cold.chat(ChatRequest("t", Q2, segments, GREEDY))
    assert cold_second.token_ids == second.token_ids
    for depth in (3, 4):  # Q1 (warm: with the tail; cold: alone), then Q2 (with the tail in both)
        assert torch.equal(_unit_kv(warm, "t", second, depth), _unit_kv(cold, "t", cold_second, depth))


def test_warm_turn_is_one_prefill_and_cached_equals_cold_tiny(kernels, tokenizer):
    _turns_against_cold(tiny_auto(kernels), tokenizer)


def test_without_independent_rows_the_unit_is_prefilled_alone(tiny_engine_factory):
    engine = tiny_engine_factory()  # float32 reference plan: torch's GEMM and SDPA
    assert engine.runtime.independent_rows == 0
    calls = _counting(engine)
    result = engine.chat(ChatRequest("t", Q1, [SegmentInput(id="rules", content=RULES)], GREEDY))
    assert calls[-2] == result.segments[-1].tokens  # the question, then the tail


@pytest.mark.slow
def test_warm_turn_is_one_prefill_and_cached_equals_cold_real(kernels, tokenizer, real_model_dir, tmp_path):
    """The real model on the kernel plan with a float32 prefill (``auto`` on a CPU
    without native bfloat16 GEMM), selected here whatever this CPU would choose."""
    from segcache.model.weights import load_arch, load_state_dict

    arch = load_arch(real_model_dir)
    plan = choose_plan(arch, ModelConfig(dtype="auto"), kernels=True, bf16_gemm=False)
    rt = ModelRuntime(arch, load_state_dict(real_model_dir), plan, source_digest="real-f32-blocks",
                      kernels=kernels, block_cache=tmp_path / "blocks.safetensors")
    assert rt.independent_rows == PREFILL_ATTENTION_TOKENS
    _turns_against_cold(rt, tokenizer)
