"""Batched decode (one step for several sequences of different lengths) equals
decoding each sequence alone."""

from __future__ import annotations

import pytest
import torch

from tests.tiny import tiny_runtime


def _prefilled(rt, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for n in lengths:
        ids = torch.randint(0, rt.arch.vocab_size, (n,), generator=g)
        kv = rt.new_kv(n + 8)
        with torch.inference_mode():
            rt.prefill(ids, torch.arange(n), kv, 0)
        seqs.append((ids, kv))
    return seqs


def _compare(rt, lengths, steps=3, tol=1e-4):
    alone = _prefilled(rt, lengths)
    together = _prefilled(rt, lengths)
    tokens = [int(ids[-1]) for ids, _ in alone]
    pos = list(lengths)
    for _ in range(steps):
        with torch.inference_mode():
            ref = torch.stack([rt.decode(torch.tensor([t]), torch.tensor([p]), kv, p)[-1]
                               for t, p, (_, kv) in zip(tokens, pos, alone, strict=True)])
            got = rt.decode_batch(tokens, pos, [kv for _, kv in together])
        assert (ref - got).abs().max().item() < tol
        assert ref.argmax(-1).tolist() == got.argmax(-1).tolist()
        tokens = ref.argmax(-1).tolist()
        pos = [p + 1 for p in pos]
    for (_, a), (_, b), n in zip(alone, together, pos, strict=True):
        assert (a[:, :, :, :n].float() - b[:, :, :, :n].float()).abs().max().item() < tol


def test_batched_decode_equals_one_by_one_tiny():
    _compare(tiny_runtime(), [5, 17, 40])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "auto"])
def test_batched_decode_equals_one_by_one_real(real_model_dir, dtype):
    from segcache.config import ModelConfig
    from segcache.model.runtime import ModelRuntime
    from segcache.model.weights import resolve_model

    cfg = ModelConfig(dtype=dtype)
    rt = ModelRuntime.load(resolve_model(None, cfg.cache_dir, progress=False), cfg)
    _compare(rt, [12, 70, 150], steps=2, tol=1e-3)
