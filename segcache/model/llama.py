"""Llama-family forward pass (Llama, Mistral, Qwen2, SmolLM) with an explicit KV buffer.

The model knows nothing about caching: it is a function from (token ids, absolute
positions, a KV buffer holding the past) to logits for the positions asked for,
writing the new tokens' K/V into the buffer. Imports only torch.

Shapes used throughout (one sequence):
    T  new tokens in this call, S = start + T visible slots
    x:        [T, hidden]
    q:        [n_heads, T, head_dim]
    k, v:     [n_kv_heads, T, head_dim]
    kv buffer [n_layers, 2, n_kv_heads, capacity, head_dim]   (2 = K, V)
K is stored after RoPE. Slot order must equal position order (the causal mask is
built from slots). ``decode_batch`` runs one token of each of B sequences, each
with its own KV buffer: then T = B rows of different sequences, and attention
runs per row over its own buffer. The layer is written once (``_project_qkv``,
then attention, then ``_output_and_mlp``) and shared by every call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from segcache.model.arch import ModelArch

# A projection matrix [out, in]: a dense tensor, or a packed one called as
# ``w(x)`` ([T, in] -> [T, out], float32), e.g. ``segcache.model.kernels.PackedLinear``.
Linear = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]
# (key naming the matrix, its float32 values [out, in]) -> the Linear the forward uses.
PackFn = Callable[[str, torch.Tensor], Linear]


def linear(x: torch.Tensor, w: Linear, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.T + bias`` for a dense or packed ``w``; the result has x's dtype."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, bias)
    y = w(x).to(x.dtype)
    return y if bias is None else y + bias


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [hidden]
    qkv: Linear  # [q_dim + 2*kv_dim, hidden]  (q, k, v fused)
    qkv_bias: torch.Tensor | None  # [q_dim + 2*kv_dim]
    o: Linear  # [hidden, q_dim]
    mlp_norm: torch.Tensor  # [hidden]
    gate_up: Linear  # [2*intermediate, hidden]  (gate, up fused)
    down: Linear  # [hidden, intermediate]


@dataclass
class Weights:
    """All weights of one model in Hugging Face layout (rotate-half RoPE). Norms and
    the embedding are dense in the compute dtype; projections may be packed."""

    embed: torch.Tensor  # [vocab, hidden]
    layers: list[LayerWeights]
    norm: torch.Tensor  # [hidden]
    lm_head: Linear  # [vocab, hidden] (the embedding itself when tied and dense)

    @property
    def dtype(self) -> torch.dtype:
        """The compute (activation) dtype."""
        return self.embed.dtype

    @classmethod
    def from_state_dict(cls, arch: ModelArch, sd: dict[str, torch.Tensor], dtype: torch.dtype,
                        device: str = "cpu", pack: PackFn | None = None,
                        embed: torch.Tensor | None = None) -> Weights:
        """Build from HF names (``model.layers.N.self_attn.q_proj.weight`` ...).

        ``pack`` (optional) receives each projection as stored (fused, not yet cast)
        and returns what the forward multiplies by. ``embed`` reuses an embedding
        tensor already built in ``dtype``."""

        def get(name: str) -> torch.Tensor:
            return sd[name].to(device=device, dtype=dtype).contiguous()

        def proj(*names: str) -> Linear:
            w = torch.cat([sd[n] for n in names], 0) if len(names) > 1 else sd[names[0]]
            return pack("+".join(names), w) if pack is not None \
                else w.to(device=device, dtype=dtype).contiguous()

        layers = []
        for i in range(arch.n_layers):
            p = f"model.layers.{i}."
            bias = None
            if arch.qkv_bias:
                bias = torch.cat([get(p + f"self_attn.{n}_proj.bias") for n in "qkv"], 0)
            layers.append(LayerWeights(
                attn_norm=get(p + "input_layernorm.weight"),
                qkv=proj(*(p + f"self_attn.{n}_proj.weight" for n in "qkv")), qkv_bias=bias,
                o=proj(p + "self_attn.o_proj.weight"), mlp_norm=get(p + "post_attention_layernorm.weight"),
                gate_up=proj(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
                down=proj(p + "mlp.down_proj.weight"),
            ))
        embed = get("model.embed_tokens.weight") if embed is None else embed
        head = "model.embed_tokens.weight" if arch.tie_embeddings or "lm_head.weight" not in sd \
            else "lm_head.weight"
        lm_head = embed if head == "model.embed_tokens.weight" and pack is None else proj(head)
        return cls(embed=embed, layers=layers, norm=get("model.norm.weight"), lm_head=lm_head)


def rope_inv_freq(arch: ModelArch) -> torch.Tensor:
    """Inverse frequencies [head_dim/2], with Llama-3 / linear scaling if configured."""
    d = arch.head_dim
    inv = 1.0 / (arch.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    sc = arch.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind in (None, "default"):
        return inv
    if kind == "linear":
        return inv / float(sc["factor"])
    if kind == "llama3":
        factor, lo, hi = float(sc["factor"]), float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
        old_ctx = float(sc["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen <= old_ctx / lo) & (wavelen >= old_ctx / hi)
        return torch.where(is_mid, mid, scaled)
    raise NotImplementedError(f"rope_scaling type {kind!r} is not supported (default, linear, llama3 are)")


class RopeTable:
    """cos/sin for every position, computed once: [max_position, head_dim] each."""

    def __init__(self, arch: ModelArch, device: str = "cpu") -> None:
        inv = rope_inv_freq(arch)
        pos = torch.arange(arch.max_position, dtype=torch.float64)
        freqs = torch.outer(pos, inv)  # [P, D/2]
        emb = torch.cat([freqs, freqs], -1)  # [P, D]
        self.cos = emb.cos().to(device=device, dtype=torch.float32)
        self.sin = emb.sin().to(device=device, dtype=torch.float32)

    def at(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions].to(dtype), self.sin[positions].to(dtype)  # [T, D] each


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [H, T, D]; cos/sin: [T, D]. Rotate-half (HF) layout: ``x * cos + rot * sin``
    with ``rot = cat(-x2, x1)``, written as in-place updates of each half (no ``rot``
    and no sum tensor; the same bits: a + (-b) == a - b). 1.2x (bfloat16) to 2.6x
    (float32) faster on a 256-token chunk on the 2-core Intel host."""
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half] -= x[..., half:] * sin[..., :half]
    out[..., half:] += x[..., :half] * sin[..., half:]
    return out


def causal_mask(start: int, n_new: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """Bool [T, S]: new token t (slot start+t) sees slots 0..start+t."""
    slots = torch.arange(start + n_new, device=device)
    rows = start + torch.arange(n_new, device=device)
    return slots[None, :] <= rows[:, None]


# Attention of one new token: (q [Hq, 1, D], keys [Hkv, S, D], values [Hkv, S, D],
# scale) -> [Hq, 1, D], e.g. ``segcache.model.kernels.BlockKernels.attend_decode``.
DecodeAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
# Causal attention of T new tokens after ``start`` slots: (q [Hq, T, D], keys/values
# [Hkv, start+T, D] as stored, start, scale) -> [Hq, T, D], e.g. ``BlockKernels.attend_prefill``.
PrefillAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, float], torch.Tensor]


class LlamaModel:
    """Stateless forward over a given weight set; call ``forward`` under ``torch.inference_mode``.

    ``decode_attention`` (optional) replaces SDPA for single-token steps;
    ``prefill_attention`` (optional) for causal prefills of 2 .. ``prefill_attention_tokens``
    tokens (they read K/V as stored, so a float16 past is not copied to float32).
    ``split_products``: (M, K, N) products of the layers' projections computed as two row
    halves (those whose bits depend on torch's thread count: ``threads.unstable_gemm_shapes``)."""

    def __init__(self, arch: ModelArch, device: str = "cpu",
                 decode_attention: DecodeAttention | None = None,
                 prefill_attention: PrefillAttention | None = None,
                 prefill_attention_tokens: int = 0,
                 split_products: frozenset[tuple[int, int, int]] = frozenset()) -> None:
        self.arch = arch
        self.device = device
        self.rope = RopeTable(arch, device)
        self.scale = 1.0 / math.sqrt(arch.head_dim)
        self.decode_attention = decode_attention
        self.prefill_attention = prefill_attention
        self.prefill_attention_tokens = prefill_attention_tokens if prefill_attention is not None else 0
        self.split_products = split_products

    def new_kv(self, capacity: int, dtype: torch.dtype) -> torch.Tensor:
        a = self.arch
        # kv: [n_layers, 2, n_kv_heads, capacity, head_dim]
        return torch.empty(a.n_layers, 2, a.n_kv_heads, capacity, a.head_dim, dtype=dtype,
                           device=self.device)

    def forward(self, w: Weights, ids: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor,
                start: int, logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """Run ``ids`` ([T] long) at ``positions`` ([T] long), writing K/V to slots
        ``start .. start+T-1`` of ``kv`` and attending to slots ``0 .. start+T-1``.

        Returns logits [len(logits_at), vocab] in float32 for the row indices
        ``logits_at`` (default: the last row only). Mutates ``kv``.
        """
        return finish(self.forward_steps(w, ids, positions, kv, start, len(w.layers), logits_at))

    def forward_steps(self, w: Weights, ids: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor,
                      start: int, layers_per_step: int, logits_at: torch.Tensor | None = None,
                      ) -> Generator[int, None, torch.Tensor]:
        """``forward`` a few layers at a time: yields the number of layers done after
        every ``layers_per_step`` layers (but the last) and returns the logits. The
        same operations in the same order as one ``forward``, so KV and logits are
        bit-identical; the caller may run other work (on other KV) between steps."""
        x = F.embedding(ids, w.embed)  # [T, hidden]
        n_layers = len(w.layers)
        cos, sin = self.rope.at(positions, w.dtype)
        # No mask tensor: decode sees every slot, a prefill is causal from slot
        # ``start`` (see _attention).
        for i, lw in enumerate(w.layers):
            x = self._layer(lw, x, cos, sin, kv[i], start, None)
            if (i + 1) % layers_per_step == 0 and i + 1 < n_layers:
                yield i + 1
        return self.head(w, x, logits_at)

    def decode_batch(self, w: Weights, tokens: list[int], positions: list[int],
                     kvs: list[torch.Tensor]) -> torch.Tensor:
        """One decode step for B sequences at once: token ``tokens[b]`` at position
        ``positions[b]`` (also its slot) of sequence ``b``, whose KV buffer is
        ``kvs[b]`` [n_layers, 2, n_kv_heads, capacity_b, head_dim]. The projections
        run once for all B rows (on the CPU decode is bound by reading the weights,
        so B rows cost little more than one); attention runs per sequence over its
        own slots ``0..positions[b]``. Returns float32 logits [B, vocab]; mutates ``kvs``."""
        x = F.embedding(torch.tensor(tokens), w.embed)  # [B, hidden]
        cos, sin = self.rope.at(torch.tensor(positions), w.dtype)  # [B, D]: row b at its position
        for i, lw in enumerate(w.layers):
            q, k, v = self._project_qkv(lw, x, cos, sin)  # [Hq, B, D], [Hkv, B, D] x 2
            outs = []
            for b, pos in enumerate(positions):
                kv = kvs[b][i]
                kv[0, :, pos] = k[:, b]
                kv[1, :, pos] = v[:, b]
                keys, values = kv[0, :, :pos + 1], kv[1, :, :pos + 1]  # [Hkv, S_b, D]
                outs.append(self._attention(q[:, b:b + 1], keys, values, None))  # [Hq, 1, D]
            x = self._output_and_mlp(lw, x, torch.cat(outs, 1))  # attention [Hq, B, D]
        return self.head(w, x, torch.arange(len(tokens), device=self.device))

    def head(self, w: Weights, x: torch.Tensor, logits_at: torch.Tensor | None) -> torch.Tensor:
        """Final norm and LM head for rows ``logits_at`` of ``x`` [T, hidden] (default:
        the last row): float32 logits [R, vocab]."""
        rows = logits_at if logits_at is not None else torch.tensor([x.shape[0] - 1], device=self.device)
        h = F.rms_norm(x[rows], (x.shape[-1],), w.norm, self.arch.rms_eps)
        return linear(h, w.lm_head).float()  # [R, vocab]

    def rotate_keys(self, k: torch.Tensor, positions: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """RoPE on stored keys ``k`` [..., T, head_dim] at ``positions`` [T]
        (``inverse``: undo it), in float32; returns float32."""
        cos, sin = self.rope.at(positions, torch.float32)
        return apply_rope(k.float(), cos, -sin if inverse else sin)

    def blend(self, w: Weights, ids: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor,
              start: int, reused: torch.Tensor, layer: int, ratio: float,
              filter_from: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``blend_steps`` run to the end."""
        return finish(self.blend_steps(w, ids, positions, kv, start, reused, layer, ratio, filter_from))

    def blend_steps(self, w: Weights, ids: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor,
                    start: int, reused: torch.Tensor, layer: int, ratio: float,
                    filter_from: int | None = None,
                    ) -> Generator[int, None, tuple[torch.Tensor, torch.Tensor]]:
        """Selective recomputation (CacheBlend) of ``ids`` at slots ``start..start+T-1``,
        yielding the number of layers done after each layer but the last (the caller
        may run other work between layers; the result does not change).

        ``reused`` ([T] bool) marks the tokens whose K/V for every layer the caller
        has already written into ``kv`` (reused from another context, K rotated
        for these positions); the others have none. Layers ``0..F`` (``filter_from``,
        default ``layer``) run for every token; at each layer ``i`` of ``F..layer``
        the reused tokens still running are scored by how far their fresh V moved
        from the reused one and the top ones kept, a share of all reused tokens
        shrinking linearly from ``2 * ratio`` at ``F`` to ``ratio`` at ``layer``
        (CacheBlend's gradual filtering: the later layers' selection at a fraction
        of the earlier layers' cost); the tokens kept at ``layer`` and every token
        without reused KV run the remaining layers, their fresh K/V written over the
        reused ones. Attention is exactly causal by slot throughout.

        Returns (logits of the last token [1, vocab], recomputed [T] bool: the
        tokens that ran every layer). The last token must not be reused."""
        n_new = ids.shape[0]
        if bool(reused[-1]):
            raise ValueError("the last token of a blend must be computed, not reused")
        end = start + n_new
        n_layers = len(w.layers)
        layer = min(layer, n_layers - 1)  # past the last layer: a full prefill
        first = layer if filter_from is None else min(max(1, filter_from), layer)
        x = F.embedding(ids, w.embed)
        cos, sin = self.rope.at(positions, w.dtype)
        # The reused V of every scoring layer, before the fresh V overwrites it.
        v_reused = {i: kv[i, 1, :, start:end].to(torch.float32, copy=True) for i in range(first, layer + 1)}
        candidates = reused.nonzero().squeeze(1)  # reused tokens still running, by index
        n_reused = candidates.numel()
        rows = torch.arange(n_new, device=self.device)  # tokens still running
        mask = slots = None
        for i in range(layer + 1):
            x = self._layer(w.layers[i], x, cos, sin, kv[i], start, mask, slots)
            share = ratio if i == layer else ratio * (1 + (layer - i) / max(1, layer - first))
            n_keep = math.ceil(min(1.0, share) * n_reused - 1e-9)
            if i >= first and n_keep < candidates.numel():
                # Score the running reused tokens by their V's move at layer i; keep the top.
                fresh = kv[i, 1, :, start:end].index_select(1, rows).float()  # [Hkv, R, D]
                deviation = torch.zeros(n_new, device=self.device)  # by token
                deviation[rows] = (fresh - v_reused[i][:, rows]).square().sum((0, 2))
                candidates = candidates[deviation[candidates].topk(n_keep).indices].sort().values
                keep = ~reused
                keep[candidates] = True
                sel = keep[rows]  # which of the running rows stay
                rows = rows[sel]
                x, cos, sin = x[sel], cos[sel], sin[sel]
                slots = start + rows
                mask = torch.arange(end, device=self.device)[None, :] <= slots[:, None]  # [R, S]
            if i + 1 < n_layers:
                yield i + 1
        recompute = torch.zeros(n_new, dtype=torch.bool, device=self.device)
        recompute[rows] = True
        for i in range(layer + 1, n_layers):
            x = self._layer(w.layers[i], x, cos, sin, kv[i], start, mask, slots)
            if i + 1 < n_layers:
                yield i + 1
        return self.head(w, x, None), recompute

    def _layer(self, lw: LayerWeights, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               kv: torch.Tensor, start: int, mask: torch.Tensor | None,
               slots: torch.Tensor | None = None) -> torch.Tensor:
        """One decoder layer for the rows of ``x``: at slots ``start..start+T-1``, or at
        the increasing ``slots`` ([T] long, the last one the highest slot to attend to)."""
        n_new = x.shape[0]
        end = start + n_new if slots is None else int(slots[-1]) + 1
        q, k, v = self._project_qkv(lw, x, cos, sin)  # [Hq, T, D], [Hkv, T, D] x 2
        if slots is None:
            kv[0, :, start:end] = k
            kv[1, :, start:end] = v
        else:
            kv[0].index_copy_(1, slots, k.to(kv.dtype))
            kv[1].index_copy_(1, slots, v.to(kv.dtype))
        keys, values = kv[0, :, :end], kv[1, :, :end]  # [Hkv, S, D], in the KV dtype
        attn = self._attention(q, keys, values, mask, start)  # [Hq, T, D]
        return self._output_and_mlp(lw, x, attn)

    def _project_qkv(self, lw: LayerWeights, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The attention inputs of rows ``x`` [T, hidden] (cos/sin [T, D] at their positions):
        q [Hq, T, D] and k [Hkv, T, D] after RoPE, v [Hkv, T, D]."""
        a = self.arch
        n_new = x.shape[0]
        h = F.rms_norm(x, (a.hidden_size,), lw.attn_norm, a.rms_eps)
        qkv = self._linear(h, lw.qkv, lw.qkv_bias)  # [T, q_dim + 2*kv_dim]
        qk, v = qkv.split([a.q_dim + a.kv_dim, a.kv_dim], -1)
        # One RoPE over the query and key heads together (half the ops of two calls).
        qk = apply_rope(qk.view(n_new, a.n_heads + a.n_kv_heads, a.head_dim).transpose(0, 1), cos, sin)
        v = v.view(n_new, a.n_kv_heads, a.head_dim).transpose(0, 1)
        return qk[:a.n_heads], qk[a.n_heads:], v

    def _output_and_mlp(self, lw: LayerWeights, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The rest of the layer for rows ``x`` [T, hidden] given their attention output
        ``attn`` [Hq, T, D]: output projection and MLP, each with its residual."""
        a = self.arch
        x = x + self._linear(attn.transpose(0, 1).reshape(x.shape[0], a.q_dim), lw.o)
        h = F.rms_norm(x, (a.hidden_size,), lw.mlp_norm, a.rms_eps)
        gate, up = self._linear(h, lw.gate_up).chunk(2, -1)  # [T, inter] each
        return x + self._linear(F.silu(gate) * up, lw.down)

    def _linear(self, x: torch.Tensor, w: Linear, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``linear``, with a product in ``split_products`` computed as two row halves."""
        if self.split_products and isinstance(w, torch.Tensor) and x.shape[0] >= 2 \
                and (x.shape[0], w.shape[1], w.shape[0]) in self.split_products:
            half = x.shape[0] // 2
            return torch.cat([self._linear(x[:half], w, bias), self._linear(x[half:], w, bias)])
        return linear(x, w, bias)

    def _attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   mask: torch.Tensor | None, start: int = 0) -> torch.Tensor:
        """q [Hq, T, D], keys/values [Hkv, S, D] -> [Hq, T, D]. ``mask`` [T, S] bool
        (True = visible) or None: decode (T == 1) sees every slot, a prefill of
        slots ``start..S-1`` is causal from ``start``. Keys/values may be in another
        dtype than q (float16 KV): the kernels read them as stored, SDPA gets a copy."""
        a = self.arch
        group = a.n_heads // a.n_kv_heads
        n_new = q.shape[1]
        if n_new == 1 and mask is None and self.decode_attention is not None:
            return self.decode_attention(q, keys, values, self.scale)
        if mask is None and 1 < n_new <= self.prefill_attention_tokens:
            return self.prefill_attention(q, keys, values, start, self.scale).to(q.dtype)
        if keys.dtype != q.dtype:
            keys, values = keys.to(q.dtype), values.to(q.dtype)
        if n_new == 1 and mask is None:
            # Decode: fold the query heads that share a KV head into rows, so K/V are
            # read once per KV head instead of being repeated: q [Hkv, group, D].
            qg = q.reshape(a.n_kv_heads, group, a.head_dim)
            out = F.scaled_dot_product_attention(qg, keys, values, scale=self.scale)
            return out.view(a.n_heads, 1, a.head_dim)
        if mask is None and start > 0:
            if _FLASH_CPU is not None and q.device.type == "cpu" and q.dtype in _FLASH_DTYPES:
                return self._attend_past_then_causal(q, keys, values, start)
            mask = causal_mask(start, n_new, q.device)
        # is_causal (no mask tensor) takes the CPU flash kernel's fast path; it aligns
        # the mask top-left, which is right only when S == T (start == 0).
        return F.scaled_dot_product_attention(
            q[None], keys[None], values[None], attn_mask=mask, is_causal=mask is None,
            scale=self.scale, enable_gqa=True,
        )[0]

    def _attend_past_then_causal(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                                 start: int) -> torch.Tensor:
        """A prefill continuing past KV, without a mask tensor: the new tokens over
        the past slots (all visible; the query heads of a KV head folded into rows,
        so K/V are not repeated) and over themselves (causal, square: the flash
        kernel skips the upper triangle), merged by their log-sum-exp. A masked
        SDPA computes every (new, slot) pair instead; this is 1.2x (a 256-token
        chunk after 3.3k slots) to 2x (a long prefill after a short prefix) faster."""
        a = self.arch
        group = a.n_heads // a.n_kv_heads
        n_new = q.shape[1]
        qf = q.reshape(a.n_kv_heads, group * n_new, a.head_dim)
        o1, l1 = _FLASH_CPU(qf[None], keys[None, :, :start], values[None, :, :start], scale=self.scale)
        o1 = o1[0].reshape(a.n_heads, n_new, a.head_dim)
        l1 = l1[0].reshape(a.n_heads, n_new)
        kc = keys[:, start:].repeat_interleave(group, 0)
        vc = values[:, start:].repeat_interleave(group, 0)
        o2, l2 = _FLASH_CPU(q[None], kc[None], vc[None], is_causal=True, scale=self.scale)
        o2, l2 = o2[0], l2[0]
        l1, l2 = l1.double(), l2.double()
        total = torch.logaddexp(l1, l2)
        out = o1 * (l1 - total).exp()[..., None] + o2 * (l2 - total).exp()[..., None]
        return out.to(q.dtype)


def finish(steps: Generator[int, None, Any]) -> Any:
    """Run a step generator (``forward_steps``, ``blend_steps``) to its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


# The CPU flash attention kernel with its log-sum-exp output (torch >= 2.3).
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_DTYPES = (torch.float32, torch.bfloat16)
