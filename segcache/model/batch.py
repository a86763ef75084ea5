"""One decode step for several sequences at once.

Every sequence has its own KV buffer and length; the weight products run once
for all B rows (on the CPU decode is bound by reading the weights, so B rows cost
little more than one), attention runs per sequence over its own slots.

Shapes: x [B, hidden]; q [Hq, B, D]; k, v [Hkv, B, D]; each kvs[b] is
[n_layers, 2, n_kv_heads, capacity_b, head_dim].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from segcache.model.llama import LlamaModel, Weights, apply_rope, linear


def decode_batch(model: LlamaModel, w: Weights, tokens: list[int], positions: list[int],
                 kvs: list[torch.Tensor]) -> torch.Tensor:
    """Token ``tokens[b]`` at position ``positions[b]`` (also its slot) for each
    sequence ``b``; writes its K/V into ``kvs[b]``. Returns float32 logits [B, vocab]."""
    a = model.arch
    n = len(tokens)
    x = F.embedding(torch.tensor(tokens), w.embed)  # [B, hidden]
    cos, sin = model.rope.at(torch.tensor(positions), w.dtype)  # [B, D]: row b at its position
    for i, lw in enumerate(w.layers):
        h = F.rms_norm(x, (a.hidden_size,), lw.attn_norm, a.rms_eps)
        qkv = linear(h, lw.qkv, lw.qkv_bias)  # [B, q_dim + 2*kv_dim]
        qk, v = qkv.split([a.q_dim + a.kv_dim, a.kv_dim], -1)
        qk = apply_rope(qk.view(n, a.n_heads + a.n_kv_heads, a.head_dim).transpose(0, 1), cos, sin)
        q, k = qk[:a.n_heads], qk[a.n_heads:]  # [Hq, B, D], [Hkv, B, D]
        v = v.view(n, a.n_kv_heads, a.head_dim).transpose(0, 1)  # [Hkv, B, D]
        outs = []
        for b, pos in enumerate(positions):
            kv = kvs[b][i]
            kv[0, :, pos] = k[:, b]
            kv[1, :, pos] = v[:, b]
            keys, values = kv[0, :, :pos + 1], kv[1, :, :pos + 1]  # [Hkv, S_b, D]
            if keys.dtype != q.dtype and model.decode_attention is None:
                keys, values = keys.to(q.dtype), values.to(q.dtype)
            outs.append(model._attention(q[:, b:b + 1], keys, values, None))  # [Hq, 1, D]
        attn = torch.cat(outs, 1)  # [Hq, B, D]
        x = x + linear(attn.transpose(0, 1).reshape(n, a.q_dim), lw.o)
        h = F.rms_norm(x, (a.hidden_size,), lw.mlp_norm, a.rms_eps)
        gate, up = linear(h, lw.gate_up).chunk(2, -1)  # [B, inter] each
        x = x + linear(F.silu(gate) * up, lw.down)
    h = F.rms_norm(x, (a.hidden_size,), w.norm, a.rms_eps)
    return linear(h, w.lm_head).float()  # [B, vocab]
