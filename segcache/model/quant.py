"""Block-quantized weights for the decode phase and their CPU matrix-vector kernel.

Decoding one token reads every weight once, so on a CPU it is bound by memory
bandwidth, not arithmetic: float32 weights (540 MB for SmolLM2-135M) cap it
near 10 tok/s. The default model comes from a GGUF file whose matrices are Q4_1
(blocks of 32: ``w = d*q + m``, ``q`` in 0..15, ``d``/``m`` float16) and whose
embedding is Q8_0 (``w = d*q``, ``q`` in -127..127). The float32 weights we
converted from it are therefore *exactly* representable in those block formats:
``recover`` finds ``q``, ``d``, ``m`` again and checks every element
bit-for-bit. Decoding from the blocks runs the very weights of the float32
reference at 1/6 of the bytes; activations stay float32, so only the summation
order differs from the dense product.

Weights that do not verify (a model that never went through Q4_1/Q8_0) are
quantized to Q8_0, which is lossy (per-block 8-bit); ``BlockLinear.exact`` says
which and the runtime puts it in the model fingerprint.

The kernels that multiply by these blocks are C sources in ``csrc/``, built and
bound by ``segcache.model.kernels``; this module holds only the block formats.

Layouts (one matrix, ``N`` outputs, ``K`` inputs, ``nb = K/32`` blocks per row):
    q4_1: qs uint8 [N, nb*16] (byte j of a block: element j low nibble, j+16 high,
          as in GGUF), d float32 [N, nb], m float32 [N, nb]
    q8_0: qs int8 [N, K], d float32 [N, nb]
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

BLOCK = 32
# Bump when the block formats change (names the block cache files; part of the fingerprint).
QUANT_VERSION = "blocks1"


@dataclass
class BlockLinear:
    """One weight matrix [out_features, in_features] in a GGUF block format."""

    kind: str  # "q4_1" | "q8_0"
    qs: torch.Tensor  # see module docstring
    d: torch.Tensor  # float32 [N, nb]
    m: torch.Tensor | None  # float32 [N, nb] (q4_1 only)
    exact: bool  # dequantize() equals the matrix it was made from, bit for bit
    _panels: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False,
                                                                            compare=False)

    @property
    def shape(self) -> tuple[int, int]:
        return self.d.shape[0], self.d.shape[1] * BLOCK

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.d, self.m) if t is not None)

    def panels(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q4_1 only, N a multiple of 16: the layout ``block_gemm`` dequantises without a
        transpose (made once, then kept; ~the bytes of the blocks again). For panel p of
        16 rows: q uint8 [N/16, K, 8], byte j of k = row j's q (low nibble) | row j+8's
        (high); d and m float32 [N/16, nb, 16], a block's 16 rows contiguous."""
        if self._panels is None:
            n, k = self.shape
            if self.kind != "q4_1" or n % 16:
                raise ValueError("panels: Q4_1 with a multiple of 16 rows only")
            b = self.qs.view(n, -1, 16)
            q = torch.cat([b & 0x0F, b >> 4], -1).view(n // 16, 16, k)  # [P, 16, K]
            packed = (q[:, :8] | (q[:, 8:] << 4)).transpose(1, 2).contiguous()  # [P, K, 8]
            per_panel = [t.view(n // 16, 16, -1).transpose(1, 2).contiguous() for t in (self.d, self.m)]
            self._panels = (packed, *per_panel)
        return self._panels

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K], computed as GGUF does (``d*q + m`` in float32)."""
        n, k = self.shape
        if self.kind == "q4_1":
            b = self.qs.view(n, -1, 16)
            q = torch.cat([b & 0x0F, b >> 4], -1).float()  # [N, nb, 32]
            return (self.d[..., None] * q + self.m[..., None]).reshape(n, k)
        return (self.d[..., None] * self.qs.view(n, -1, BLOCK).float()).reshape(n, k)


def _blocks(w: torch.Tensor) -> torch.Tensor:
    n, k = w.shape
    return w.float().reshape(n, k // BLOCK, BLOCK)  # [N, nb, 32]


def recover_q4_1(w: torch.Tensor) -> BlockLinear | None:
    """The Q4_1 blocks ``w`` was dequantised from, or None if it was not."""
    if w.dim() != 2 or w.shape[1] % BLOCK:
        return None
    b = _blocks(w)
    lo, hi = b.amin(-1), b.amax(-1)
    d = ((hi - lo) / 15).half().float()  # [N, nb]
    m = lo.half().float()
    if not torch.equal(m, lo):
        return None
    safe_d = torch.where(d == 0, torch.ones_like(d), d)
    q = ((b - m[..., None]) / safe_d[..., None]).round().clamp(0, 15)
    if not torch.equal(d[..., None] * q + m[..., None], b):
        return None
    q = q.to(torch.uint8)
    qs = (q[..., :16] | (q[..., 16:] << 4)).reshape(w.shape[0], -1).contiguous()
    return BlockLinear("q4_1", qs, d.contiguous(), m.contiguous(), exact=True)


def quantize_q8_0(w: torch.Tensor) -> BlockLinear | None:
    """Q8_0 blocks for ``w``: exact when ``w`` was dequantised from Q8_0, else lossy."""
    if w.dim() != 2 or w.shape[1] % BLOCK:
        return None
    b = _blocks(w)
    d = (b.abs().amax(-1) / 127).half().float()  # [N, nb]
    safe_d = torch.where(d == 0, torch.ones_like(d), d)
    q = (b / safe_d[..., None]).round().clamp(-127, 127)
    exact = torch.equal(d[..., None] * q, b)
    qs = q.to(torch.int8).reshape(w.shape).contiguous()
    return BlockLinear("q8_0", qs, d.contiguous(), None, exact=exact)


def to_blocks(w: torch.Tensor) -> BlockLinear | None:
    """Q4_1 if ``w`` came from Q4_1, else Q8_0 (exact if it came from Q8_0).
    None for shapes the kernel does not take (inputs not a multiple of 32)."""
    return recover_q4_1(w) or quantize_q8_0(w)


def save_blocks(path: Path, blocks: dict[str, BlockLinear]) -> None:
    """Write ``blocks`` (by matrix name) to one safetensors file, atomically."""
    tensors, meta = {}, {}
    for name, b in blocks.items():
        tensors[name + ".qs"], tensors[name + ".d"] = b.qs, b.d
        if b.m is not None:
            tensors[name + ".m"] = b.m
        meta[name] = [b.kind, b.exact]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"blocks": json.dumps(meta), "version": QUANT_VERSION})
    tmp.replace(path)


def load_blocks(path: Path) -> dict[str, BlockLinear]:
    """What ``save_blocks`` wrote; {} if the file is missing or from another version."""
    if not path.is_file():
        return {}
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("version") != QUANT_VERSION:
        return {}
    t = load_file(str(path))
    return {name: BlockLinear(kind, t[name + ".qs"], t[name + ".d"], t.get(name + ".m"), exact)
            for name, (kind, exact) in json.loads(meta["blocks"]).items()}
