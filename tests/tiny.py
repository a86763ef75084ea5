"""A tiny random-weight Llama for fast tests (same tokenizer as the real model)."""

from __future__ import annotations

import torch

from segcache.model.arch import ModelArch
from segcache.model.plan import ExecPlan
from segcache.model.runtime import ModelRuntime

TINY = ModelArch(vocab_size=49152, hidden_size=64, intermediate_size=128, n_layers=2, n_heads=4,
                 n_kv_heads=2, head_dim=16, max_position=2048, rope_theta=10000.0,
                 tie_embeddings=True, bos_token_id=1, eos_token_ids=(2,))


def tiny_state_dict(arch: ModelArch = TINY, seed: int = 0, qkv_bias: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, std: float = 0.08) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    sd = {"model.embed_tokens.weight": rnd(arch.vocab_size, arch.hidden_size, std=0.5),
          "model.norm.weight": 1 + rnd(arch.hidden_size)}
    for i in range(arch.n_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = 1 + rnd(arch.hidden_size)
        sd[p + "post_attention_layernorm.weight"] = 1 + rnd(arch.hidden_size)
        sd[p + "self_attn.q_proj.weight"] = rnd(arch.q_dim, arch.hidden_size)
        sd[p + "self_attn.k_proj.weight"] = rnd(arch.kv_dim, arch.hidden_size)
        sd[p + "self_attn.v_proj.weight"] = rnd(arch.kv_dim, arch.hidden_size)
        sd[p + "self_attn.o_proj.weight"] = rnd(arch.hidden_size, arch.q_dim)
        sd[p + "mlp.gate_proj.weight"] = rnd(arch.intermediate_size, arch.hidden_size)
        sd[p + "mlp.up_proj.weight"] = rnd(arch.intermediate_size, arch.hidden_size)
        sd[p + "mlp.down_proj.weight"] = rnd(arch.hidden_size, arch.intermediate_size)
        if qkv_bias:
            for n, d in (("q", arch.q_dim), ("k", arch.kv_dim), ("v", arch.kv_dim)):
                sd[p + f"self_attn.{n}_proj.bias"] = rnd(d)
    return sd


def tiny_runtime(dtype: torch.dtype = torch.float32, arch: ModelArch = TINY, seed: int = 0) -> ModelRuntime:
    plan = ExecPlan.dense(dtype)
    return ModelRuntime(arch, tiny_state_dict(arch, seed, arch.qkv_bias), plan, "cpu",
                        source_digest=f"tiny-{seed}")
