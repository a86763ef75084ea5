"""The execution plan: which code computes each kind of model call.

``choose_plan`` is the one place that decides, from the architecture, the
``ModelConfig`` and what the machine offers (the block kernels of ``csrc/`` (``kernels.py``),
native bfloat16 GEMM). ``ModelRuntime`` only dispatches on the ``ExecPlan`` it
is given: ``prefill_route(n)``, ``decode_route``, ``batch_decode_route`` and
``blend_route`` name the code, and the fingerprint and ``independent_rows``
come from the plan's fields. Tests select a plan by constructing one.

``dtype`` policy (``ModelConfig.dtype``):
- ``float32``: everything in float32 (the reference; greedy outputs are exact
  across cache hit patterns).
- ``bfloat16`` (and any CUDA device): everything in bfloat16.
- ``auto`` on the CPU: prefill (matrix-matrix) in bfloat16 where the CPU
  multiplies bfloat16 natively (AVX512-BF16 or AMX), else float32 (an AVX2-only
  CPU runs bfloat16 GEMM ~7x slower than float32); decode (matrix-vector, bound
  by memory bandwidth) with float32 activations and weights in GGUF blocks
  (Q4_1/Q8_0, the default model's own weights, bit-exact), about 1/6 of the
  bytes of float32, and KV in float16 (half the bytes a decode step reads at
  long context; the kernels widen it to float32 in registers). Without the
  kernels (no C compiler, no AVX2) both phases use the prefill dtype.

The routes (``Route``):
- ``c-step``: ``kernels.FusedDecoder``: every layer and the LM head of a decode
  step in one C call (B rows at once for a batched step), run as one program of
  stages on the kernels' pool (``csrc/pool.c``: any running thread starts the next
  stage and redoes a task a parked thread holds).
- ``c-layers``: the embedding and LM head in torch, the layers in one C call
  per slice of layers (``FusedDecoder.prefill_layers``): block weights,
  ``attend_prefill`` arithmetic, each row independent of the others.
- ``torch-blocks``: ``LlamaModel`` (the torch layer) over the block weights,
  the kernels' attention for 1 new token (``attend_decode``) and for 2 ..
  ``kernel_prefill_tokens`` new tokens (``attend_prefill``), SDPA beyond.
- ``torch-dense``: ``LlamaModel`` over dense weights with SDPA (the CPU flash
  kernel); in the bfloat16-prefill plan its LM head is the block one.

Which code computes what, for the plans ``choose_plan`` returns (P = 256 =
``PREFILL_ATTENTION_TOKENS``, S = 32 = ``SMALL_PREFILL_TOKENS``):

| call                          | dense (float32, bfloat16, CUDA, no kernels) | auto + kernels, float32 prefill | auto + kernels, bfloat16 prefill |
| ----------------------------- | ------------------------------------------- | ------------------------------- | -------------------------------- |
| 1-token decode                | torch-dense                                 | c-step                          | c-step                           |
| short prefill, 1 token        | torch-dense                                 | c-step                          | c-step                           |
| short prefill, 2..S tokens    | torch-dense                                 | c-layers                        | c-layers (decode weights)        |
| chunked prefill, S+1..P       | torch-dense                                 | c-layers                        | torch-dense (bfloat16)           |
| long prefill, > P tokens      | torch-dense                                 | torch-blocks (SDPA)             | torch-dense (bfloat16)           |
| batched decode (B sequences)  | torch-dense, B rows per projection          | c-step, B rows                  | c-step, B rows                   |
| blend (CacheBlend)            | torch-dense                                 | torch-blocks                    | torch-dense (bfloat16)           |
| rows independent of the call  | no (0)                                      | 2..P tokens (``independent_rows``) | no (0)                        |

Under load (``ModelConfig.share_cores``), the bfloat16 plan's chunked prefill slices run
torch at one thread while other processes' busy threads hold the other cores
(``segcache.model.threads``); the products whose bits depend on the thread count run as two
row halves (the runtime's ``split_products``, part of the fingerprint), so the bits do not.

Where the architecture rules a kernel out, the route falls back one step:
``c-step``/``c-layers`` need every projection in blocks (inputs a multiple of
32), head_dim a multiple of 8 (16 for ``c-layers`` and ``attend_prefill``) and
at most ``MAX_GROUP`` query heads per KV head; without them the call runs
``torch-blocks``. At run time a KV buffer ``c-step`` cannot index (another
dtype or layout) takes ``torch-blocks`` too.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any

import torch

from segcache.config import ModelConfig
from segcache.model.arch import ModelArch
from segcache.model.kernels import MAX_GROUP
from segcache.model.quant import BLOCK

# Prefills of up to this many tokens run on the decode weights (the blocks): a few
# tokens (the new turn after a cache hit) are bound by reading the weights, like
# decode, and the block weights read 1/6 of the bytes. Measured on the 2-core AMD
# host at 3.6k context with a bfloat16 dense prefill: 6 tokens 136 -> 73 ms,
# 25 tokens 255 -> 198 ms, 32 tokens 269-303 -> 233-249 ms; even at 48.
SMALL_PREFILL_TOKENS = 32
# Prefills of up to this many tokens take the kernels' attention (``attend_prefill``: K/V
# read as stored, register-tiled), longer ones SDPA over a float32 copy. Measured on the
# 2-core AMD host, one layer, float16 KV: 25 tokens after 3,640 slots 2.95 -> 1.76 ms,
# 5 after 3,660 1.16 -> 0.45 ms, 256 after 2,048 12.1 -> 11.4 ms, 256 after 256 3.3 -> 2.3 ms.
PREFILL_ATTENTION_TOKENS = 256

WEIGHT_FORMS = ("dense", "blocks")
KV_DTYPES_OF_KERNELS = (torch.float32, torch.float16)


class Route(enum.Enum):
    """The code that computes a call (see the module docstring)."""

    C_STEP = "c-step"
    C_LAYERS = "c-layers"
    TORCH_BLOCKS = "torch-blocks"
    TORCH_DENSE = "torch-dense"


@dataclass(frozen=True)
class ExecPlan:
    """Dtypes, weight forms and kernel thresholds of one model runtime; frozen, and
    validated so that every combination it admits has code behind it.

    Every numeric path is a function of these fields (the routes below), so the
    fields are the plan part of the model fingerprint: a change of plan never
    serves KV computed under another."""

    prefill_dtype: torch.dtype  # dense prefill weights and activations
    decode_dtype: torch.dtype  # decode activations (and dense decode weights)
    kv_dtype: torch.dtype
    decode_weights: str = "dense"  # "dense" | "blocks" (GGUF blocks, csrc/ kernels)
    prefill_weights: str = "dense"  # "blocks": prefill on the decode's block weights (float32)
    block_head: bool = False  # a dense prefill's LM head in blocks (one row: 1/4 of the bytes)
    small_prefill_tokens: int = 0  # prefills of 1..this many tokens run on the decode weights
    kernel_decode_attention: bool = False  # attend_decode for 1 new token (torch-blocks)
    kernel_prefill_tokens: int = 0  # attend_prefill for 2..this many new tokens (torch-blocks)
    c_step: bool = False  # FusedDecoder: decode steps (single and batched), 1-token prefills
    c_layers_tokens: int = 0  # FusedDecoder.prefill_layers for block prefills of 2..this many
    # Prefill calls of 2..this many tokens compute each row independently of the others
    # in the call (the block GEMM, attend_prefill, slot chunks counted from slot 0): a
    # unit's KV is the same bits alone or prefilled with what follows it. 0: no such
    # guarantee (SDPA and torch's GEMM block by the call's shape).
    independent_rows: int = 0

    def __post_init__(self) -> None:
        if self.decode_weights not in WEIGHT_FORMS or self.prefill_weights not in WEIGHT_FORMS:
            raise ValueError(f"decode_weights and prefill_weights must be one of {WEIGHT_FORMS}")
        kernel_fields = (self.prefill_weights != "dense", self.block_head, self.small_prefill_tokens,
                         self.kernel_decode_attention, self.kernel_prefill_tokens, self.c_step,
                         self.c_layers_tokens, self.independent_rows)
        if self.decode_weights == "dense":
            if any(kernel_fields):
                raise ValueError("a plan with dense decode weights uses no block weights or kernels")
            if self.decode_dtype != self.prefill_dtype:
                raise ValueError("dense weights have one dtype: decode_dtype must equal prefill_dtype")
            return
        if self.decode_dtype != torch.float32:
            raise ValueError("the block kernels compute in float32: decode_dtype must be float32")
        if self.prefill_weights == "blocks" and self.prefill_dtype != torch.float32:
            raise ValueError("a prefill on the block weights is float32")
        if self.block_head and self.prefill_weights == "blocks":
            raise ValueError("block_head is for a dense prefill")
        attention = self.kernel_decode_attention or self.kernel_prefill_tokens
        if attention and self.kv_dtype not in KV_DTYPES_OF_KERNELS:
            raise ValueError(f"the kernels' attention reads KV in {KV_DTYPES_OF_KERNELS}")
        if self.c_step and not self.kernel_decode_attention:
            raise ValueError("c_step needs kernel_decode_attention (its torch fallback's arithmetic)")
        if self.c_layers_tokens and not (self.c_step and self.c_layers_tokens <= self.kernel_prefill_tokens):
            raise ValueError("c_layers_tokens needs c_step and kernel_prefill_tokens >= it")
        if self.independent_rows and not (self.prefill_weights == "blocks"
                                          and self.independent_rows <= self.c_layers_tokens):
            raise ValueError("independent_rows needs a block prefill in c-layers up to that many tokens")

    @classmethod
    def dense(cls, dtype: torch.dtype) -> ExecPlan:
        """Everything in ``dtype`` with torch's own kernels (torch-dense throughout)."""
        return cls(dtype, dtype, dtype)

    @property
    def uses_kernels(self) -> bool:
        """Whether any call runs on the block kernels (csrc/)."""
        return self.decode_weights == "blocks"

    @property
    def name(self) -> str:
        """A short label: ``dense-float32``, ``kernels-float32``, ``kernels-bfloat16`` ..."""
        return f"{'kernels' if self.uses_kernels else 'dense'}-{str(self.prefill_dtype).removeprefix('torch.')}"

    def decode_route(self) -> Route:
        """One new token of one sequence."""
        if self.c_step:
            return Route.C_STEP
        return Route.TORCH_BLOCKS if self.decode_weights == "blocks" else Route.TORCH_DENSE

    def batch_decode_route(self) -> Route:
        """One new token for each of several sequences (each its own KV buffer)."""
        return self.decode_route()

    def prefill_route(self, n_tokens: int) -> Route:
        """A prefill of ``n_tokens`` new tokens (a chunk, or a whole short prompt)."""
        if n_tokens <= self.small_prefill_tokens:
            if n_tokens == 1:
                return self.decode_route()
            return Route.C_LAYERS if n_tokens <= self.c_layers_tokens else Route.TORCH_BLOCKS
        if self.prefill_weights == "blocks":
            return Route.C_LAYERS if n_tokens <= self.c_layers_tokens else Route.TORCH_BLOCKS
        return Route.TORCH_DENSE

    @property
    def shares_cores(self) -> bool:
        """Whether chunked prefills run torch's bfloat16 GEMM (torch-dense in bfloat16 with
        the block LM head), whose slices ``threads.CoreShare`` may run at one thread while
        other processes hold the cores. The dense plans' LM head is torch's GEMM over the
        vocabulary, not checked at both thread counts, so they keep theirs."""
        return self.uses_kernels and self.prefill_dtype == torch.bfloat16 and self.prefill_weights == "dense"

    def blend_route(self) -> Route:
        """Selective recomputation (``LlamaModel.blend_steps``) on the prefill weights."""
        return Route.TORCH_BLOCKS if self.prefill_weights == "blocks" else Route.TORCH_DENSE

    def as_dict(self) -> dict[str, Any]:
        """The fields, JSON-able (dtypes by name): the plan part of the fingerprint."""
        return {f.name: str(getattr(self, f.name)).removeprefix("torch.") for f in dataclasses.fields(self)}


def choose_plan(arch: ModelArch, cfg: ModelConfig, kernels: bool, bf16_gemm: bool) -> ExecPlan:
    """The plan for ``arch`` under ``cfg`` (its ``dtype`` and ``device``), given whether
    the block kernels loaded here (``kernels.probe_kernels``) and whether the CPU multiplies
    bfloat16 natively (``cpu_has_bf16_gemm``). Pure: same arguments, same plan."""
    if cfg.dtype == "float32":
        return ExecPlan.dense(torch.float32)
    if cfg.dtype == "bfloat16" or cfg.device == "cuda":
        return ExecPlan.dense(torch.bfloat16)
    prefill = torch.bfloat16 if bf16_gemm else torch.float32
    if not kernels:
        return ExecPlan.dense(prefill)
    packed = all(n % BLOCK == 0 for n in (arch.hidden_size, arch.q_dim, arch.intermediate_size))
    tiles = arch.head_dim % 16 == 0  # attend_prefill's output tiles
    step = (packed and arch.head_dim % 8 == 0 and arch.head_dim <= 256
            and arch.n_heads // arch.n_kv_heads <= MAX_GROUP)
    c_layers = PREFILL_ATTENTION_TOKENS if step and tiles else 0
    on_blocks = prefill == torch.float32
    # The block GEMM (outputs a multiple of 16; dot_rows groups rows by 8 otherwise).
    gemm_rows = all(n % 16 == 0 for n in (arch.q_dim + 2 * arch.kv_dim, arch.hidden_size,
                                           2 * arch.intermediate_size))
    # float32 prefill runs on the block weights too: the kernels' register-tiled GEMM
    # beats torch's float32 GEMM at every chunk size the engine uses (2-core AMD host,
    # every projection of a layer: 25 rows 42.9 vs 72.2 ms x 30 layers, 256 rows 301 vs
    # 342 ms) and reads 1/6 of the bytes. A bfloat16 prefill (AMX hosts) stays dense,
    # with the block LM head (~20 ms less per prefill: it needs one row of logits).
    return ExecPlan(
        prefill, torch.float32, torch.float16, decode_weights="blocks",
        prefill_weights="blocks" if on_blocks else "dense",
        block_head=not on_blocks and arch.hidden_size % BLOCK == 0,
        small_prefill_tokens=SMALL_PREFILL_TOKENS,
        kernel_decode_attention=True,
        kernel_prefill_tokens=PREFILL_ATTENTION_TOKENS if tiles else 0,
        c_step=step, c_layers_tokens=c_layers,
        independent_rows=c_layers if on_blocks and gemm_rows else 0,
    )


def cpu_has_bf16_gemm() -> bool:
    """Whether torch multiplies bfloat16 matrices natively here (oneDNN needs
    AVX512-BF16 or AMX; elsewhere it falls back to a slow path)."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)
