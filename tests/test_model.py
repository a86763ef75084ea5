"""The model layer: forward vs transformers, KV continuation, golden answer, loading errors."""

from __future__ import annotations

import pytest
import torch

from segcache.model.llama import causal_mask
from segcache.model.weights import ModelNotFoundError, resolve_model
from tests.tiny import TINY, tiny_runtime


def _prefill(rt, ids, kv, start, all_rows=False):
    pos = torch.arange(start, start + len(ids))
    rows = torch.arange(len(ids)) if all_rows else None
    with torch.inference_mode():
        return rt.prefill(torch.tensor(ids), pos, kv, start, rows)


def _continuation_case(rt, vocab: int, n_a: int = 37, n_b: int = 23, steps: int = 5):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (n_a + n_b,), generator=g).tolist()
    kv_full = rt.new_kv(n_a + n_b + steps)
    full = _prefill(rt, ids, kv_full, 0, all_rows=True)
    kv_split = rt.new_kv(n_a + n_b + steps)
    _prefill(rt, ids[:n_a], kv_split, 0)
    split = _prefill(rt, ids[n_a:], kv_split, n_a, all_rows=True)
    assert (full[n_a:] - split).abs().max().item() < 1e-4
    # decode steps on both buffers stay equal
    tok = int(full[-1].argmax())
    for s in range(steps):
        p = n_a + n_b + s
        with torch.inference_mode():
            a = rt.decode(torch.tensor([tok]), torch.tensor([p]), kv_full, p)
            b = rt.decode(torch.tensor([tok]), torch.tensor([p]), kv_split, p)
        assert (a - b).abs().max().item() < 1e-4
        tok = int(a[-1].argmax())
    # decode of one token equals prefill of it as the last token of the sequence
    kv_ref = rt.new_kv(n_a + n_b + 1)
    ref = _prefill(rt, ids + [7], kv_ref, 0)
    kv_dec = rt.new_kv(n_a + n_b + 1)
    _prefill(rt, ids, kv_dec, 0)
    with torch.inference_mode():
        dec = rt.decode(torch.tensor([7]), torch.tensor([n_a + n_b]), kv_dec, n_a + n_b)
    assert (ref - dec).abs().max().item() < 1e-4


def test_causal_mask_offsets():
    m = causal_mask(3, 2)
    assert m.shape == (2, 5)
    assert m[0].tolist() == [True, True, True, True, False]
    assert m[1].tolist() == [True] * 5


def test_kv_continuation_tiny():
    _continuation_case(tiny_runtime(), TINY.vocab_size)


def test_qkv_bias_and_untied_head_load():
    from dataclasses import replace

    from segcache.model.plan import ExecPlan
    from segcache.model.runtime import ModelRuntime
    from tests.tiny import tiny_state_dict

    arch = replace(TINY, qkv_bias=True, tie_embeddings=False)
    rt = tiny_runtime(arch=arch)
    sd = tiny_state_dict(arch, qkv_bias=True)
    zero_bias = {k: torch.zeros_like(v) if k.endswith("_proj.bias") else v for k, v in sd.items()}
    without = ModelRuntime(arch, zero_bias, ExecPlan.dense(torch.float32))
    ids = torch.arange(10, 16)
    with torch.inference_mode():
        a = rt.prefill(ids, torch.arange(6), rt.new_kv(8), 0)
        b = without.prefill(ids, torch.arange(6), without.new_kv(8), 0)
    assert (a - b).abs().max() > 1e-3  # the bias is loaded and added
    _continuation_case(rt, arch.vocab_size, 9, 4, 2)


def test_missing_model_path_names_paths(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model(str(missing), tmp_path)
    assert str(missing) in str(e.value)
    d = tmp_path / "hfdir"
    d.mkdir()
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model(str(d), tmp_path)
    assert "config.json" in str(e.value)


@pytest.mark.slow
def test_logits_match_transformers(real_model_dir):
    from transformers import LlamaForCausalLM

    from segcache.config import ModelConfig
    from segcache.model.runtime import ModelRuntime
    from segcache.model.weights import ResolvedModel

    rt = ModelRuntime.load(ResolvedModel(real_model_dir, "m", real_model_dir, "x"),
                           ModelConfig(dtype="float32"))
    hf = LlamaForCausalLM.from_pretrained(str(real_model_dir), dtype=torch.float32).eval()
    ids = torch.randint(0, rt.arch.vocab_size, (200,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = hf(ids[None]).logits[0]
    ours = _prefill(rt, ids.tolist(), rt.new_kv(200), 0, all_rows=True)
    assert (ref - ours).abs().max().item() < 1e-3
    _continuation_case(rt, rt.arch.vocab_size, 40, 25, 3)


@pytest.mark.slow
def test_golden_answer(real_engine):
    from segcache.engine.types import ChatRequest, SamplingParams

    req = ChatRequest("golden", [{"role": "user", "content": "What is the capital of France?"}],
                      [], SamplingParams(max_tokens=20, temperature=0.0))
    result = real_engine.chat(req)
    assert result.text == "The capital of France is Paris."
    assert result.finish_reason == "stop"
