"""The loaded model as the engine sees it: weights per phase, the KV dtype, a
fingerprint, and two calls, ``prefill`` and ``decode``.

``dtype`` policy (``ModelConfig.dtype``):
- ``float32``: everything in float32 (the reference; greedy outputs are exact
  across cache hit patterns).
- ``bfloat16``: everything in bfloat16.
- ``auto``: chosen per phase by measurement on the CPU (see BENCHMARKS.md).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch

from segcache.config import ModelConfig
from segcache.model.arch import ModelArch
from segcache.model.llama import LlamaModel, Weights
from segcache.model.weights import ResolvedModel, load_arch, load_state_dict

# Bump when the layout or meaning of stored KV changes: old KV can then never be served.
KV_LAYOUT_VERSION = "kv1:[layers,2,kv_heads,tokens,head_dim]:k-after-rope"


@dataclass(frozen=True)
class PhasePlan:
    prefill: torch.dtype
    decode: torch.dtype
    kv: torch.dtype


def plan_dtypes(dtype: str, device: str) -> PhasePlan:
    if dtype == "float32":
        return PhasePlan(torch.float32, torch.float32, torch.float32)
    if dtype == "bfloat16":
        return PhasePlan(torch.bfloat16, torch.bfloat16, torch.bfloat16)
    if device == "cuda":
        return PhasePlan(torch.bfloat16, torch.bfloat16, torch.bfloat16)
    # CPU auto: float32 until measurement says otherwise (see BENCHMARKS.md).
    return PhasePlan(torch.float32, torch.float32, torch.float32)


class ModelRuntime:
    """Weights for each phase plus the forward; no cache logic here.

    ``prefill``/``decode`` take the same arguments as ``LlamaModel.forward``
    minus the weights and return float32 logits; both mutate ``kv``.
    """

    def __init__(self, arch: ModelArch, state_dict: dict[str, torch.Tensor], plan: PhasePlan,
                 device: str = "cpu", source_digest: str = "", tokenizer_digest: str = "") -> None:
        self.arch = arch
        self.plan = plan
        self.device = device
        self.model = LlamaModel(arch, device)
        self._prefill_w = Weights.from_state_dict(arch, state_dict, plan.prefill, device)
        self._decode_w = (self._prefill_w if plan.decode == plan.prefill
                          else Weights.from_state_dict(arch, state_dict, plan.decode, device))
        self.fingerprint = _fingerprint(arch, plan, source_digest, tokenizer_digest)

    @classmethod
    def load(cls, resolved: ResolvedModel, cfg: ModelConfig, tokenizer_digest: str = "") -> ModelRuntime:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        arch = load_arch(resolved.directory)
        sd = load_state_dict(resolved.directory)
        plan = plan_dtypes(cfg.dtype, cfg.device)
        return cls(arch, sd, plan, cfg.device, resolved.source_digest, tokenizer_digest)

    @property
    def kv_dtype(self) -> torch.dtype:
        return self.plan.kv

    def new_kv(self, capacity: int) -> torch.Tensor:
        """Empty KV buffer [n_layers, 2, n_kv_heads, capacity, head_dim] in the KV dtype."""
        return self.model.new_kv(capacity, self.plan.kv)

    def prefill(self, ids: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor, start: int,
                logits_at: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.forward(self._prefill_w, ids, positions, kv, start, logits_at)

    def decode(self, ids: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor,
               start: int) -> torch.Tensor:
        return self.model.forward(self._decode_w, ids, positions, kv, start, None)


def _fingerprint(arch: ModelArch, plan: PhasePlan, source_digest: str, tokenizer_digest: str) -> str:
    parts = {
        "arch": arch.as_dict(),
        "weights": source_digest,
        "tokenizer": tokenizer_digest,
        "dtypes": [str(plan.prefill), str(plan.decode), str(plan.kv)],
        "kv_layout": KV_LAYOUT_VERSION,
    }
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()
