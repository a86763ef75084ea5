"""The loaded model as the engine sees it: weights per phase, the KV dtype, a
fingerprint, and two calls, ``prefill`` and ``decode``.

``dtype`` policy (``ModelConfig.dtype``):
- ``float32``: everything in float32 (the reference; greedy outputs are exact
  across cache hit patterns).
- ``bfloat16``: everything in bfloat16.
- ``auto``: chosen per phase by measurement on the CPU (see BENCHMARKS.md):
  prefill (matrix-matrix) in bfloat16 where the CPU multiplies bfloat16 natively
  (AVX512-BF16 or AMX), else float32 (an AVX2-only CPU runs bfloat16 GEMM ~7x
  slower than float32); decode (matrix-vector, bound by memory bandwidth) with
  float32 activations and weights in GGUF blocks (``quant.py``: Q4_1/Q8_0, the
  default model's own weights, bit-exact), about 1/6 of the bytes of float32,
  and KV in float16 (half the bytes a decode step reads at long context; the
  attention kernel widens it to float32 in registers). Without the kernels
  (no C compiler, no AVX2) both phases use the prefill dtype.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

import torch

from segcache.config import ModelConfig
from segcache.model.arch import ModelArch
from segcache.model.batch import decode_batch
from segcache.model.kernels import (
    KERNEL_VERSION,
    MAX_GROUP,
    BlockKernels,
    DecodeLayer,
    FusedDecoder,
    KernelProbe,
    PackedLinear,
    probe_kernels,
)
from segcache.model.llama import LlamaModel, Weights
from segcache.model.quant import QUANT_VERSION, BlockLinear, load_blocks, save_blocks, to_blocks
from segcache.model.weights import ResolvedModel, load_arch, load_state_dict

log = logging.getLogger("segcache.model")

# Bump when the layout or meaning of stored KV changes: old KV can then never be served.
KV_LAYOUT_VERSION = "kv1:[layers,2,kv_heads,tokens,head_dim]:k-after-rope"


SMALL_PREFILL_TOKENS = 32
# Prefills of up to this many tokens take the kernels' attention (``attend_prefill``: K/V
# read as stored, register-tiled), longer ones SDPA over a float32 copy. Measured on the
# 2-core AMD host, one layer, float16 KV: 25 tokens after 3,640 slots 2.95 -> 1.76 ms,
# 5 after 3,660 1.16 -> 0.45 ms, 256 after 2,048 12.1 -> 11.4 ms, 256 after 256 3.3 -> 2.3 ms.
PREFILL_ATTENTION_TOKENS = 256


@dataclass(frozen=True)
class PhasePlan:
    prefill: torch.dtype  # compute dtype of prefill (weights and activations)
    decode: torch.dtype  # activation dtype of decode
    kv: torch.dtype
    decode_weights: str = "dense"  # "dense" (in ``decode``) | "blocks" (the csrc/ kernels)


def cpu_has_bf16_gemm() -> bool:
    """Whether torch multiplies bfloat16 matrices natively here (oneDNN needs
    AVX512-BF16 or AMX; elsewhere it falls back to a slow path)."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def plan_dtypes(dtype: str, device: str, block_kernels: bool = False,
                bf16_gemm: bool | None = None) -> PhasePlan:
    """The per-phase plan for ``ModelConfig.dtype``. ``block_kernels``: the
    csrc/ kernels loaded on this machine; ``bf16_gemm`` defaults to asking the CPU."""
    if dtype == "float32":
        return PhasePlan(torch.float32, torch.float32, torch.float32)
    if dtype == "bfloat16":
        return PhasePlan(torch.bfloat16, torch.bfloat16, torch.bfloat16)
    if device == "cuda":
        return PhasePlan(torch.bfloat16, torch.bfloat16, torch.bfloat16)
    bf16 = cpu_has_bf16_gemm() if bf16_gemm is None else bf16_gemm
    prefill = torch.bfloat16 if bf16 else torch.float32
    if not block_kernels:
        return PhasePlan(prefill, prefill, prefill)
    # Decode reads all of the KV every step (at 2k context, float32 KV is as many
    # bytes as the block weights): float16 halves it and the kernel widens it in registers.
    return PhasePlan(prefill, torch.float32, torch.float16, "blocks")


class ModelRuntime:
    """Weights for each phase plus the forward; no cache logic here.

    ``prefill``/``decode`` take the same arguments as ``LlamaModel.forward``
    minus the weights and return float32 logits; both mutate ``kv``.
    """

    def __init__(self, arch: ModelArch, state_dict: dict[str, torch.Tensor], plan: PhasePlan,
                 device: str = "cpu", source_digest: str = "", tokenizer_digest: str = "",
                 kernels: BlockKernels | None = None, block_cache: Path | None = None) -> None:
        """``kernels``: required by a "blocks" plan. ``block_cache``: a file where the
        block form of the weights is kept between starts (packing takes seconds)."""
        if plan.decode_weights == "blocks" and kernels is None:
            raise ValueError("plan.decode_weights='blocks' needs the block kernels (kernels.probe_kernels)")
        self.kernel_probe: KernelProbe | None = None  # set by load(): how the kernels were had
        self.arch = arch
        self.plan = plan
        self.device = device
        self.model = LlamaModel(arch, device)
        self._decode_model = self.model
        self._prefill_w = Weights.from_state_dict(arch, state_dict, plan.prefill, device)
        self.decode_scheme = "dense"
        # Prefill calls of 2 .. this many tokens compute each row independently of the
        # others in the call (the block GEMM; attend_prefill, slot chunks counted from
        # slot 0): a unit's KV is the same bits alone or prefilled with what follows it.
        # 0: no such guarantee (SDPA and torch's GEMM block by the call's shape).
        self.independent_rows = 0
        # The whole decode step in one C call, where every projection is in blocks;
        # the torch forward over the same weights is the fallback (same arithmetic).
        self._fused: FusedDecoder | None = None
        if plan.decode_weights == "blocks":
            self._decode_w, self.decode_scheme = _block_weights(arch, state_dict, plan, kernels,
                                                                self._prefill_w, block_cache)
            if plan.kv in (torch.float32, torch.float16):
                tiles = arch.head_dim % 16 == 0  # attend_prefill's output tiles
                self._decode_model = LlamaModel(
                    arch, device, decode_attention=kernels.attend_decode,
                    prefill_attention=kernels.attend_prefill if tiles else None,
                    prefill_attention_tokens=PREFILL_ATTENTION_TOKENS)
                self.decode_scheme += "+attn" + (f"+pattn{PREFILL_ATTENTION_TOKENS}" if tiles else "")
                self._fused = _fused_decoder(arch, self._decode_w, kernels, self._decode_model, plan.kv)
                if self._fused is not None:
                    self.decode_scheme += "+fused"
                    if tiles:  # prefills of 2..PREFILL_ATTENTION_TOKENS tokens: one C call per slice
                        self._decode_model.use_fused_layers(self._fused.prefill_layers, self._decode_w)
                        self.decode_scheme += "+layers"
            if plan.prefill == torch.float32:
                # float32 prefill runs on the block weights too: the kernels' register-tiled
                # GEMM beats torch's float32 GEMM at every chunk size the engine uses (2-core
                # AMD host, every projection of a layer: 25 rows 42.9 vs 72.2 ms x 30 layers,
                # 256 rows 301 vs 342 ms) and reads 1/6 of the bytes; the dense float32
                # projections are then not kept. A bfloat16 prefill (AMX hosts) stays dense.
                self._prefill_w = self._decode_w
                self.model = self._decode_model
                # Rows are independent where every chunk runs prefill_layers (all projections
                # in blocks) and every projection takes the GEMM (outputs a multiple of 16;
                # dot_rows groups rows by 8).
                if "+layers" in self.decode_scheme and all(
                        p.shape[0] % 16 == 0 for lw in self._decode_w.layers
                        for p in (lw.qkv, lw.o, lw.gate_up, lw.down)):
                    self.independent_rows = PREFILL_ATTENTION_TOKENS
            elif isinstance(self._decode_w.lm_head, PackedLinear):
                # A (bfloat16) prefill needs the logits of one row: the block head reads 1/4
                # of the bytes of the dense one (same weights; ~20 ms less per prefill here).
                self._prefill_w = dataclasses.replace(self._prefill_w, lm_head=self._decode_w.lm_head)
        elif plan.decode == plan.prefill:
            self._decode_w = self._prefill_w
        else:
            self._decode_w = Weights.from_state_dict(arch, state_dict, plan.decode, device)
        self.fingerprint = _fingerprint(arch, plan, self.decode_scheme, source_digest, tokenizer_digest)

    @classmethod
    def load(cls, resolved: ResolvedModel, cfg: ModelConfig, tokenizer_digest: str = "") -> ModelRuntime:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        arch = load_arch(resolved.directory)
        sd = load_state_dict(resolved.directory)
        probe = KernelProbe(None, "not-used", f"--dtype {cfg.dtype} on {cfg.device} runs dense")
        if cfg.dtype == "auto" and cfg.device == "cpu":
            probe = probe_kernels(Path(cfg.cache_dir) / "kernels")
            if probe.status == "build-failed":
                log.error("%s; serving on the dense torch path instead, at a fraction of the "
                          "speed.\nCompiler output:\n%s", probe.reason, probe.log)
        kernels = probe.kernels
        plan = plan_dtypes(cfg.dtype, cfg.device, block_kernels=kernels is not None)
        block_cache = None
        if resolved.source_digest.startswith("sha256:"):
            digest = resolved.source_digest.removeprefix("sha256:")[:24]
            block_cache = Path(cfg.cache_dir) / "blocks" / f"{digest}-{QUANT_VERSION}.safetensors"
        runtime = cls(arch, sd, plan, cfg.device, resolved.source_digest, tokenizer_digest, kernels,
                      block_cache)
        runtime.kernel_probe = probe
        log.info("execution plan: %s", runtime.plan_summary())
        return runtime

    def plan_summary(self) -> str:
        """One line naming which code computes prefill and decode, and why the kernels are
        not used where they are not (shown at start-up, in /health and /v1/models)."""
        kv = str(self.plan.kv).removeprefix("torch.")
        if self.plan.decode_weights == "blocks":
            prefill = "block kernels" if self._prefill_w is self._decode_w else (
                f"dense {str(self.plan.prefill).removeprefix('torch.')}")
            decode = "fused C step" if self._fused is not None else "torch over block weights"
            return f"kernels: prefill {prefill}, decode {decode}, KV {kv} ({self.decode_scheme})"
        probe = self.kernel_probe
        why = f"; block kernels {probe.status}: {probe.reason}" if probe is not None else ""
        return f"dense: {str(self.plan.prefill).removeprefix('torch.')} torch, KV {kv}{why}"

    @property
    def kv_dtype(self) -> torch.dtype:
        return self.plan.kv

    def new_kv(self, capacity: int) -> torch.Tensor:
        """Empty KV buffer [n_layers, 2, n_kv_heads, capacity, head_dim] in the KV dtype."""
        return self.model.new_kv(capacity, self.plan.kv)

    def prefill(self, ids: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor, start: int,
                logits_at: torch.Tensor | None = None) -> torch.Tensor:
        if self._small_on_blocks(ids):
            if ids.shape[0] == 1 and (logits_at is None or logits_at.tolist() in ([0], [])):
                # the fused step (its logits dropped when none are wanted: same KV either way)
                return self.decode(ids, positions, kv, start)[:len(logits_at) if logits_at is not None else 1]
            return self._decode_model.forward(self._decode_w, ids, positions, kv, start, logits_at)
        return self.model.forward(self._prefill_w, ids, positions, kv, start, logits_at)

    def _small_on_blocks(self, ids: torch.Tensor) -> bool:
        """Whether a prefill of ``ids`` is a few tokens on the block weights (with a
        dense bfloat16 prefill). A few tokens (the new turn after a cache hit) are
        bound by reading the weights, like decode: the block weights read 1/6 of the
        bytes. Measured on the 2-core AMD host at 3.6k context: 6 tokens 136 -> 73 ms,
        25 tokens 255 -> 198 ms, 32 tokens 269-303 -> 233-249 ms; even at 48."""
        return self.decode_scheme != "dense" and ids.shape[0] <= SMALL_PREFILL_TOKENS

    def prefill_steps(self, ids: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor, start: int,
                      layers_per_step: int, logits_at: torch.Tensor | None = None,
                      ) -> Generator[int, None, torch.Tensor]:
        """``prefill`` a few layers at a time (``LlamaModel.forward_steps``): bit-identical
        to one ``prefill``. A few tokens (the block-weight path) run in one step."""
        if self._small_on_blocks(ids):
            return self.prefill(ids, positions, kv, start, logits_at)
        return (yield from self.model.forward_steps(self._prefill_w, ids, positions, kv, start,
                                                    layers_per_step, logits_at))

    def blend(self, ids: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor, start: int,
              reused: torch.Tensor, layer: int, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Selective recomputation over reused K/V (``LlamaModel.blend``), on the
        prefill weights. Returns (last logits [1, vocab], recomputed [T] bool)."""
        return self.model.blend(self._prefill_w, ids, positions, kv, start, reused, layer, ratio)

    def blend_steps(self, ids: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor, start: int,
                    reused: torch.Tensor, layer: int, ratio: float,
                    ) -> Generator[int, None, tuple[torch.Tensor, torch.Tensor]]:
        """``blend`` one layer at a time (``LlamaModel.blend_steps``)."""
        return self.model.blend_steps(self._prefill_w, ids, positions, kv, start, reused, layer, ratio)

    def unrope_keys(self, handle: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """A copy of KV ``handle`` [n_layers, 2, n_kv_heads, T, head_dim] whose keys,
        stored rotated for ``positions``, are un-rotated (position-independent)."""
        out = handle.clone()
        out[:, 0] = self.model.rotate_keys(handle[:, 0], positions, inverse=True).to(handle.dtype)
        return out

    def place_keys(self, kv: torch.Tensor, handle: torch.Tensor, start: int) -> None:
        """Write position-independent ``handle`` into ``kv`` slots ``start..``,
        rotating its keys for positions ``start..`` (slot == position)."""
        n = handle.shape[3]
        positions = torch.arange(start, start + n)
        kv[:, 0, :, start:start + n] = self.model.rotate_keys(handle[:, 0], positions).to(kv.dtype)
        kv[:, 1, :, start:start + n] = handle[:, 1]

    def decode(self, ids: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor,
               start: int) -> torch.Tensor:
        if self._fused is not None and ids.shape[0] == 1 and self._fused.accepts(kv):
            return self._fused(ids, positions, torch.tensor([start]), [kv])
        return self._decode_model.forward(self._decode_w, ids, positions, kv, start, None)

    def decode_batch(self, tokens: list[int], positions: list[int],
                     kvs: list[torch.Tensor]) -> torch.Tensor:
        """One decode step for several sequences (each its own KV buffer); logits [B, vocab]."""
        if self._fused is not None and all(map(self._fused.accepts, kvs)):
            pos = torch.tensor(positions)
            return self._fused(torch.tensor(tokens), pos, pos, kvs)
        return decode_batch(self._decode_model, self._decode_w, tokens, positions, kvs)


def _block_weights(arch: ModelArch, sd: dict[str, torch.Tensor], plan: PhasePlan,
                   kernels: BlockKernels, prefill_w: Weights,
                   cache: Path | None) -> tuple[Weights, str]:
    """Decode weights with every projection (and the LM head) in GGUF blocks, and
    the scheme name for the fingerprint: which formats, and whether all are exact."""
    known = load_blocks(cache) if cache is not None else {}
    made: dict[str, BlockLinear] = {}
    formats: set[str] = set()
    exact = True

    def pack(key: str, w: torch.Tensor) -> PackedLinear | torch.Tensor:
        nonlocal exact
        blocks = known.get(key)
        if blocks is None or blocks.shape != tuple(w.shape):
            blocks = to_blocks(w)
            if blocks is not None:
                made[key] = blocks
        if blocks is None:  # a shape the kernel does not take: stay dense
            formats.add("dense")
            return w.to(plan.decode).contiguous()
        formats.add(blocks.kind)
        exact = exact and blocks.exact
        return PackedLinear(blocks, kernels)

    embed = prefill_w.embed if prefill_w.dtype == plan.decode else None
    w = Weights.from_state_dict(arch, sd, plan.decode, "cpu", pack=pack, embed=embed)
    if cache is not None and made:
        try:
            save_blocks(cache, {**known, **made})
        except OSError:
            pass  # a read-only cache dir only costs the packing time at the next start
    scheme = f"{QUANT_VERSION}:{'+'.join(sorted(formats))}:{'exact' if exact else 'lossy'}"
    return w, scheme


def _fused_decoder(arch: ModelArch, w: Weights, kernels: BlockKernels, model: LlamaModel,
                   kv: torch.dtype) -> FusedDecoder | None:
    """The one-call decode step over ``w``, or None where a projection stayed dense."""
    projections = [w.lm_head] + [p for lw in w.layers for p in (lw.qkv, lw.o, lw.gate_up, lw.down)]
    if not all(isinstance(p, PackedLinear) for p in projections) or w.dtype != torch.float32:
        return None
    if arch.head_dim % 8 or arch.head_dim > 256 or arch.n_heads // arch.n_kv_heads > MAX_GROUP:
        return None  # the attention kernel's limits
    layers = [DecodeLayer(lw.attn_norm, lw.qkv.w, lw.qkv_bias, lw.o.w, lw.mlp_norm, lw.gate_up.w, lw.down.w)
              for lw in w.layers]
    dims = {"n_layers": arch.n_layers, "hidden": arch.hidden_size, "inter": arch.intermediate_size,
            "n_heads": arch.n_heads, "n_kv": arch.n_kv_heads, "head_dim": arch.head_dim}
    return kernels.decoder(dims, arch.rms_eps, model.scale, layers, w.embed, w.norm, w.lm_head.w,
                           model.rope.cos, model.rope.sin, kv)


def _fingerprint(arch: ModelArch, plan: PhasePlan, decode_scheme: str, source_digest: str,
                 tokenizer_digest: str) -> str:
    parts = {
        "arch": arch.as_dict(),
        "weights": source_digest,
        "tokenizer": tokenizer_digest,
        "dtypes": [str(plan.prefill), str(plan.decode), str(plan.kv)],
        "decode_weights": decode_scheme,
        "kernels": KERNEL_VERSION if decode_scheme != "dense" else "",
        "kv_layout": KV_LAYOUT_VERSION,
        # which prefill lengths run on the decode weights changes the KV's numerics
        "small_prefill": SMALL_PREFILL_TOKENS if decode_scheme != "dense" else 0,
        "prefill_weights": "blocks" if decode_scheme != "dense" and plan.prefill == torch.float32 else "dense",
    }
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()
