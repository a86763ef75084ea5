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

The kernel is a small C file (AVX2 + FMA, OpenMP from torch's own libgomp)
built once with the system C compiler into the cache directory and called
through ctypes. ``load_kernels`` returns None where that is impossible (no
compiler, no AVX2, another OS); the runtime then keeps dense weights.

Layouts (one matrix, ``N`` outputs, ``K`` inputs, ``nb = K/32`` blocks per row):
    q4_1: qs uint8 [N, nb*16] (byte j of a block: element j low nibble, j+16 high,
          as in GGUF), d float32 [N, nb], m float32 [N, nb]
    q8_0: qs int8 [N, K], d float32 [N, nb]
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

BLOCK = 32
# Bump when the block formats change (names the block cache files; part of the fingerprint).
QUANT_VERSION = "blocks1"
# Bump when the kernels' arithmetic (summation order, exp) changes: part of the model
# fingerprint, so KV computed by other kernels is never served.
KERNEL_VERSION = "rows2+gemm3+pattn1+layers1"
MAX_GROUP = 8  # query heads per KV head the attention kernel takes (MAXM in the C source)


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


# --- kernel ---------------------------------------------------------------------------

_C_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

#define MAXM 8

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256 u8x8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }
static inline __m256 i8x8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }
static inline __m256 load8_f16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }

/* Several rows of x against one weight row: the block is dequantised once into float32
   registers (w = d*q + m, or d*q for Q8_0: exactly the float32 matrix, d*q being exact)
   and each of the R rows runs its own FMA chain, so the unpacking is shared and the
   FMA units stay busy. R is a compile-time constant at every call (always_inline). */
#define INLINE static inline __attribute__((always_inline))

INLINE void dot_rows(const float *x, int K, int nb, const uint8_t *q4, const int8_t *q8,
                     const float *dr, const float *mr, float *y, int N, const int R) {
    const __m128i lowmask = _mm_set1_epi8(0x0F);
    __m256 acc[MAXM], acc2[MAXM];
    for (int i = 0; i < R; i++) { acc[i] = _mm256_setzero_ps(); acc2[i] = _mm256_setzero_ps(); }
    for (int b = 0; b < nb; b++) {
        __m256 w0, w1, w2, w3;
        const __m256 db = _mm256_set1_ps(dr[b]);
        if (q4) {
            const __m128i raw = _mm_loadu_si128((const __m128i *)(q4 + (size_t)b * 16));
            const __m128i lo = _mm_and_si128(raw, lowmask), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), lowmask);
            const __m256 mb = _mm256_set1_ps(mr[b]);
            w0 = _mm256_fmadd_ps(db, u8x8(lo), mb); w1 = _mm256_fmadd_ps(db, u8x8(_mm_srli_si128(lo, 8)), mb);
            w2 = _mm256_fmadd_ps(db, u8x8(hi), mb); w3 = _mm256_fmadd_ps(db, u8x8(_mm_srli_si128(hi, 8)), mb);
        } else {
            const __m128i a = _mm_loadu_si128((const __m128i *)(q8 + (size_t)b * 32));
            const __m128i c = _mm_loadu_si128((const __m128i *)(q8 + (size_t)b * 32 + 16));
            w0 = _mm256_mul_ps(db, i8x8(a)); w1 = _mm256_mul_ps(db, i8x8(_mm_srli_si128(a, 8)));
            w2 = _mm256_mul_ps(db, i8x8(c)); w3 = _mm256_mul_ps(db, i8x8(_mm_srli_si128(c, 8)));
        }
        for (int i = 0; i < R; i++) {
            const float *xb = x + (size_t)i * K + (size_t)b * 32;
            if (R <= 4) {  /* few rows: two chains per row hide the FMA latency */
                acc[i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xb), acc[i]);
                acc2[i] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb + 8), acc2[i]);
                acc[i] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xb + 16), acc[i]);
                acc2[i] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xb + 24), acc2[i]);
            } else {
                acc[i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xb), acc[i]);
                acc[i] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb + 8), acc[i]);
                acc[i] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xb + 16), acc[i]);
                acc[i] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xb + 24), acc[i]);
            }
        }
    }
    if (R == 8) {  /* eight horizontal sums at once */
        const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
        const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
        float r[8];
        _mm256_storeu_ps(r, _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31)));
        for (int i = 0; i < 8; i++) y[(size_t)i * N] = r[i];
    } else {
        for (int i = 0; i < R; i++) y[(size_t)i * N] = hsum8(R <= 4 ? _mm256_add_ps(acc[i], acc2[i]) : acc[i]);
    }
}

/* y[M,N] = x[M,K] @ W^T for W in Q4_1 (q8 == NULL) or Q8_0 (q4 == NULL) blocks. */
static void block_matmul(const float *x, int M, int K, const uint8_t *q4, const int8_t *q8,
                         const float *d, const float *m, float *y, int N, int nthreads) {
    const int nb = K / 32;
    /* dynamic: when another process takes a core mid-step, the other thread takes over the
       remaining rows instead of the whole step waiting for a descheduled thread's static share */
    #pragma omp parallel for schedule(dynamic, 16) num_threads(nthreads)
    for (int n = 0; n < N; n++) {
        const uint8_t *qr4 = q4 ? q4 + (size_t)n * nb * 16 : NULL;
        const int8_t *qr8 = q8 ? q8 + (size_t)n * K : NULL;
        const float *dr = d + (size_t)n * nb, *mr = m ? m + (size_t)n * nb : NULL;
        for (int i0 = 0; i0 < M; i0 += MAXM) {
            const float *xi = x + (size_t)i0 * K;
            float *yi = y + (size_t)i0 * N + n;
            switch (M - i0 < MAXM ? M - i0 : MAXM) {
                case 1: dot_rows(xi, K, nb, qr4, qr8, dr, mr, yi, N, 1); break;
                case 2: dot_rows(xi, K, nb, qr4, qr8, dr, mr, yi, N, 2); break;
                case 3: dot_rows(xi, K, nb, qr4, qr8, dr, mr, yi, N, 3); break;
                case 4: dot_rows(xi, K, nb, qr4, qr8, dr, mr, yi, N, 4); break;
                case 5: dot_rows(xi, K, nb, qr4, qr8, dr, mr, yi, N, 5); break;
                case 6: dot_rows(xi, K, nb, qr4, qr8, dr, mr, yi, N, 6); break;
                case 7: dot_rows(xi, K, nb, qr4, qr8, dr, mr, yi, N, 7); break;
                default: dot_rows(xi, K, nb, qr4, qr8, dr, mr, yi, N, 8); break;
            }
        }
    }
}

/* --- more rows: a register-tiled GEMM over dequantised panels ---------------------------
   Panels of NP weight rows are dequantised once into a transposed float32 buffer
   (wt[k*NP + j] = W[n0+j][k], exactly the float32 matrix) and every row of x runs against
   the panel in tiles of MR rows x NP outputs: 12 accumulators, two panel loads and MR
   broadcasts per k. Each output is one FMA chain over k = 0..K-1 in order, so a row's
   result does not depend on M or on the rows it shares a call with. */
#define NP 16
#define MR 6

static inline void transpose8(__m256 r[8]) {
    const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    r[0] = _mm256_permute2f128_ps(s0, s4, 0x20); r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
    r[2] = _mm256_permute2f128_ps(s2, s6, 0x20); r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
    r[4] = _mm256_permute2f128_ps(s0, s4, 0x31); r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
    r[6] = _mm256_permute2f128_ps(s2, s6, 0x31); r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

static void dequant_panel(int K, int nb, const uint8_t *q4, const int8_t *q8, const float *d,
                          const float *m, int n0, float *wt) {
    const __m128i lowmask = _mm_set1_epi8(0x0F);
    for (int half = 0; half < NP / 8; half++)
        for (int b = 0; b < nb; b++)
            for (int j = 0; j < 4; j++) {  /* elements 8j..8j+7 of block b, for 8 weight rows */
                __m256 r[8];
                for (int i = 0; i < 8; i++) {
                    const size_t n = (size_t)(n0 + half * 8 + i), nbi = n * nb + b;
                    const __m256 db = _mm256_set1_ps(d[nbi]);
                    if (q4) {  /* GGUF order: elements 0..15 low nibbles, 16..31 high */
                        const __m128i raw = _mm_loadl_epi64((const __m128i *)(q4 + nbi * 16 + (j & 1) * 8));
                        const __m128i nib = j < 2 ? _mm_and_si128(raw, lowmask)
                                                  : _mm_and_si128(_mm_srli_epi16(raw, 4), lowmask);
                        r[i] = _mm256_fmadd_ps(db, u8x8(nib), _mm256_set1_ps(m[nbi]));
                    } else {
                        r[i] = _mm256_mul_ps(db, i8x8(_mm_loadl_epi64((const __m128i *)(q8 + n * K + b * 32 + j * 8))));
                    }
                }
                transpose8(r);
                float *dst = wt + (size_t)(b * 32 + j * 8) * NP + half * 8;
                for (int i = 0; i < 8; i++) _mm256_store_ps(dst + (size_t)i * NP, r[i]);
            }
}

/* c[i][0..15] = sum over k = 0..K-1 in order of a[i][k] * b[k][0..15], for i < R (a
   compile-time constant at every call, so the 2R accumulators stay in registers). */
INLINE void tile16(const float *a, int lda, const float *b, int ldb, int K, float *c, int ldc, const int R) {
    __m256 c0[MR], c1[MR];
    for (int i = 0; i < R; i++) { c0[i] = _mm256_setzero_ps(); c1[i] = _mm256_setzero_ps(); }
    for (int k = 0; k < K; k++) {
        const __m256 b0 = _mm256_loadu_ps(b + (size_t)k * ldb), b1 = _mm256_loadu_ps(b + (size_t)k * ldb + 8);
        for (int i = 0; i < R; i++) {
            const __m256 x = _mm256_broadcast_ss(a + (size_t)i * lda + k);
            c0[i] = _mm256_fmadd_ps(x, b0, c0[i]);
            c1[i] = _mm256_fmadd_ps(x, b1, c1[i]);
        }
    }
    for (int i = 0; i < R; i++) {
        _mm256_storeu_ps(c + (size_t)i * ldc, c0[i]);
        _mm256_storeu_ps(c + (size_t)i * ldc + 8, c1[i]);
    }
}

/* tile16 over all M rows of a, MR at a time. */
static void rows16(const float *a, int lda, int M, const float *b, int ldb, int K, float *c, int ldc) {
    for (int i0 = 0; i0 < M; i0 += MR) {
        const float *ai = a + (size_t)i0 * lda;
        float *ci = c + (size_t)i0 * ldc;
        switch (M - i0 < MR ? M - i0 : MR) {
            case 1: tile16(ai, lda, b, ldb, K, ci, ldc, 1); break;
            case 2: tile16(ai, lda, b, ldb, K, ci, ldc, 2); break;
            case 3: tile16(ai, lda, b, ldb, K, ci, ldc, 3); break;
            case 4: tile16(ai, lda, b, ldb, K, ci, ldc, 4); break;
            case 5: tile16(ai, lda, b, ldb, K, ci, ldc, 5); break;
            default: tile16(ai, lda, b, ldb, K, ci, ldc, 6); break;
        }
    }
}

/* The same panel from Q4_1 weights packed per panel (BlockLinear.panels): for each k, 8
   bytes hold rows j (low nibble) and j+8 (high nibble) of the panel, and each block's 16
   scales and mins are contiguous, so a k is two conversions and two FMAs, no transpose.
   The same values as dequant_panel, bit for bit. */
static void dequant_panel_packed(int K, const uint8_t *pq, const float *pd, const float *pmin, float *wt) {
    const __m128i lowmask = _mm_set1_epi8(0x0F);
    for (int b = 0; b < K / 32; b++) {
        const __m256 d0 = _mm256_loadu_ps(pd + b * 16), d1 = _mm256_loadu_ps(pd + b * 16 + 8);
        const __m256 m0 = _mm256_loadu_ps(pmin + b * 16), m1 = _mm256_loadu_ps(pmin + b * 16 + 8);
        for (int k = b * 32; k < b * 32 + 32; k++) {
            const __m128i raw = _mm_loadl_epi64((const __m128i *)(pq + (size_t)k * 8));
            const __m128i lo = _mm_and_si128(raw, lowmask), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), lowmask);
            _mm256_store_ps(wt + (size_t)k * NP, _mm256_fmadd_ps(d0, u8x8(lo), m0));
            _mm256_store_ps(wt + (size_t)k * NP + 8, _mm256_fmadd_ps(d1, u8x8(hi), m1));
        }
    }
}

/* pq/pd/pm: the Q4_1 weights packed per panel, or NULL (then dequant_panel). */
static void block_gemm(const float *x, int M, int K, const uint8_t *q4, const int8_t *q8,
                       const float *d, const float *m, const uint8_t *pq, const float *pd,
                       const float *pm, float *y, int N, int nthreads) {
    const int nb = K / 32, npanel = N / NP;
    #pragma omp parallel num_threads(nthreads)
    {
        float *wt = (float *)aligned_alloc(32, sizeof(float) * (size_t)K * NP);
        #pragma omp for schedule(dynamic, 1)
        for (int p = 0; p < npanel; p++) {
            if (pq) dequant_panel_packed(K, pq + (size_t)p * K * 8, pd + (size_t)p * nb * NP,
                                         pm + (size_t)p * nb * NP, wt);
            else dequant_panel(K, nb, q4, q8, d, m, p * NP, wt);
            rows16(x, K, M, wt, NP, K, y + (size_t)p * NP, N);
        }
        free(wt);
    }
}

/* More than gemm_rows rows (and N a multiple of NP): the GEMM, else dot_rows. The decode step
   passes DECODE_GEMM_ROWS, where the two cross over on the 2-core AMD host (every projection
   of a layer x 30, dot_rows vs the GEMM on packed panels: 6 rows 13.9 vs 14.6 ms, 8 rows
   18.1 vs 19.0, 12 rows 28.1 vs 20.9, 25 rows 67.1 vs 38.2); a prefill passes 1, so that a
   prompt row's result never depends on how many rows its call has. */
#define DECODE_GEMM_ROWS 8

void q4_1_matmul(const float *x, int M, int K, const uint8_t *qs, const float *d,
                 const float *m, const uint8_t *pq, const float *pd, const float *pm,
                 float *y, int N, int gemm_rows, int nthreads) {
    if (M > gemm_rows && N % NP == 0) block_gemm(x, M, K, qs, NULL, d, m, pq, pd, pm, y, N, nthreads);
    else block_matmul(x, M, K, qs, NULL, d, m, y, N, nthreads);
}

void q8_0_matmul(const float *x, int M, int K, const int8_t *qs, const float *d, float *y,
                 int N, int gemm_rows, int nthreads) {
    if (M > gemm_rows && N % NP == 0) block_gemm(x, M, K, NULL, qs, d, NULL, NULL, NULL, NULL, y, N, nthreads);
    else block_matmul(x, M, K, NULL, qs, d, NULL, y, N, nthreads);
}
"""

_ATTEND_C = r"""
/* Decode attention, one new token: out[Hq,D] = softmax(q k^T * scale) v over S slots.
   Query heads h*G .. h*G+G-1 share KV head h. K/V rows are contiguous [S, D] per head,
   heads `hstride` elements apart; K/V are float32 or float16 (one function each). Work is split over (head, slot chunk) tasks whose
   partial softmax states are merged at the end, so 2 threads share 3 heads evenly. */
void ATTEND_NAME(const float *q, const KV_T *k, const KV_T *v, long hstride, int Hkv, int G,
                   int S, int D, float scale, float *out, int nthreads) {
    const int nv = D / 8;
    int nchunk = nthreads * 4;
    if (nchunk > S) nchunk = S;
    const int chunk = (S + nchunk - 1) / nchunk;
    const int ntask = Hkv * nchunk;
    float *pm = (float *)malloc(sizeof(float) * (size_t)ntask * G * (D + 2));  /* per task: [G][D+2] */
    #pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int t = 0; t < ntask; t++) {
        const int h = t / nchunk, c = t % nchunk;
        const int s0 = c * chunk, s1 = s0 + chunk < S ? s0 + chunk : S;
        float *part = pm + (size_t)t * G * (D + 2);
        if (s1 <= s0) { for (int g = 0; g < G; g++) part[g * (D + 2)] = -INFINITY; continue; }
        const KV_T *kh = k + (size_t)h * hstride, *vh = v + (size_t)h * hstride;
        float *sc = (float *)malloc(sizeof(float) * (size_t)G * (s1 - s0));
        __m256 qv[MAXM][32];
        for (int g = 0; g < G; g++)
            for (int j = 0; j < nv; j++)
                qv[g][j] = _mm256_mul_ps(_mm256_loadu_ps(q + (size_t)(h * G + g) * D + j * 8),
                                         _mm256_set1_ps(scale));
        for (int s = s0; s < s1; s++) {
            const KV_T *kr = kh + (size_t)s * D;
            __m256 acc[MAXM];
            for (int g = 0; g < G; g++) acc[g] = _mm256_setzero_ps();
            for (int j = 0; j < nv; j++) {
                __m256 kk = LOAD8(kr + j * 8);
                for (int g = 0; g < G; g++) acc[g] = _mm256_fmadd_ps(qv[g][j], kk, acc[g]);
            }
            for (int g = 0; g < G; g++) sc[(size_t)g * (s1 - s0) + (s - s0)] = hsum8(acc[g]);
        }
        __m256 o[MAXM][32];
        for (int g = 0; g < G; g++) {
            float *sg = sc + (size_t)g * (s1 - s0), mx = -INFINITY, l = 0.f;
            for (int s = 0; s < s1 - s0; s++) mx = sg[s] > mx ? sg[s] : mx;
            for (int s = 0; s < s1 - s0; s++) { sg[s] = expf(sg[s] - mx); l += sg[s]; }
            part[g * (D + 2)] = mx;
            part[g * (D + 2) + 1] = l;
            for (int j = 0; j < nv; j++) o[g][j] = _mm256_setzero_ps();
        }
        for (int s = s0; s < s1; s++) {
            const KV_T *vr = vh + (size_t)s * D;
            for (int j = 0; j < nv; j++) {
                __m256 vv = LOAD8(vr + j * 8);
                for (int g = 0; g < G; g++)
                    o[g][j] = _mm256_fmadd_ps(_mm256_set1_ps(sc[(size_t)g * (s1 - s0) + (s - s0)]), vv, o[g][j]);
            }
        }
        for (int g = 0; g < G; g++)
            for (int j = 0; j < nv; j++) _mm256_storeu_ps(part + g * (D + 2) + 2 + j * 8, o[g][j]);
        free(sc);
    }
    merge_states(pm, Hkv, nchunk, G, D, out, nthreads);
    free(pm);
}
"""

_MERGE_C = r"""
/* Merge the attention kernels' partial softmax states: pm[((h*nchunk + c)*R + r)*(D+2)]
   holds (max, sum, output[D]) of row r of KV head h over slot chunk c (max -INFINITY: the
   row saw no slot there); out[(h*R + r)*D] gets the normalised output. */
static void merge_states(const float *pm, int Hkv, int nchunk, int R, int D, float *out, int nthreads) {
    const int W = D + 2;
    #pragma omp parallel for schedule(static) num_threads(nthreads) if (Hkv * R >= 64)
    for (int hr = 0; hr < Hkv * R; hr++) {
        const int h = hr / R, r = hr % R;
        float mx = -INFINITY, l = 0.f;
        for (int c = 0; c < nchunk; c++) {
            const float m = pm[((size_t)(h * nchunk + c) * R + r) * W];
            mx = m > mx ? m : mx;
        }
        float *o = out + ((size_t)h * R + r) * D;
        for (int d = 0; d < D; d++) o[d] = 0.f;
        for (int c = 0; c < nchunk; c++) {
            const float *st = pm + ((size_t)(h * nchunk + c) * R + r) * W;
            if (st[0] == -INFINITY) continue;
            const float w = expf(st[0] - mx);
            l += w * st[1];
            for (int d = 0; d < D; d++) o[d] += w * st[2 + d];
        }
        for (int d = 0; d < D; d++) o[d] /= l;
    }
}
"""


def _per_kv_dtype(template: str, name: str, prefix: str) -> str:
    """``template`` once per KV dtype: ``name`` -> prefix_f32 / prefix_f16, KV_T the element
    type, LOAD8 the load of 8 elements as float32."""
    return "".join(template.replace(name, f"{prefix}_{suffix}").replace("KV_T", kv_t).replace("LOAD8", load8)
                   for suffix, kv_t, load8 in (("f32", "float", "_mm256_loadu_ps"),
                                               ("f16", "uint16_t", "load8_f16")))


_C_SOURCE += _MERGE_C + _per_kv_dtype(_ATTEND_C, "ATTEND_NAME", "attend_decode")

_DECODE_C = r"""
/* One decode step of a whole Llama model for B sequences, every projection in blocks:
   the same kernels and arithmetic as the torch path (LlamaModel.forward with
   PackedLinear weights and attend_decode), without a Python op between them. */
typedef struct {
    const void *qs; const float *d; const float *m; int kind; int n; int k;  /* kind 0 q4_1, 1 q8_0 */
    const uint8_t *pq; const float *pd; const float *pm;                       /* q4_1 panels, or NULL */
} Mat;
typedef struct { const float *attn_norm, *qkv_bias, *mlp_norm; Mat qkv, o, gate_up, down; } Layer;
typedef struct {
    int n_layers, hidden, inter, n_heads, n_kv, head_dim, kv_f16;
    float eps, scale;
    const Layer *layers;
    const float *embed, *norm, *cos, *sin;  /* embed [vocab, hidden]; cos/sin [max_position, head_dim] */
    Mat head;
} Net;

static void mat_mul_rows(const Mat *w, const float *x, int M, float *y, int gemm_rows, int nt) {
    if (w->kind == 0) q4_1_matmul(x, M, w->k, (const uint8_t *)w->qs, w->d, w->m, w->pq, w->pd, w->pm, y, w->n,
                                  gemm_rows, nt);
    else q8_0_matmul(x, M, w->k, (const int8_t *)w->qs, w->d, y, w->n, gemm_rows, nt);
}

static void mat_mul(const Mat *w, const float *x, int M, float *y, int nt) {
    mat_mul_rows(w, x, M, y, DECODE_GEMM_ROWS, nt);
}

static void rms_norm_row(const float *x, const float *w, int n, float eps, float *y) {
    float ss = 0.f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    const float r = 1.f / sqrtf(ss / n + eps);
    for (int i = 0; i < n; i++) y[i] = x[i] * r * w[i];
}

/* Rotate-half RoPE in place on `nh` heads of `D` floats. */
static void rope_row(float *x, int nh, int D, const float *c, const float *s) {
    const int half = D / 2;
    for (int h = 0; h < nh; h++) {
        float *r = x + (size_t)h * D;
        for (int j = 0; j < half; j++) {
            const float a = r[j], b = r[j + half];
            r[j] = a * c[j] - b * s[j];
            r[j + half] = b * c[j + half] + a * s[j + half];
        }
    }
}

/* exp(x) for 8 floats (Cephes' polynomial, as in avx_mathfun: within ~2 ulp of expf). */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f)), _mm256_set1_ps(88.3762626647949f));
    __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* act[b] = silu(gate[b]) * up[b], gu[b] = [gate | up] of I each; I % 32 == 0 (down is in blocks). */
static void silu_mul(const float *gu, float *act, int B, int I, int nt) {
    const int nv = I / 8;
    #pragma omp parallel for schedule(dynamic, 64) num_threads(nt)
    for (int t = 0; t < B * nv; t++) {
        const int b = t / nv, j = (t % nv) * 8;
        const float *g = gu + (size_t)b * 2 * I + j;
        const __m256 gv = _mm256_loadu_ps(g), uv = _mm256_loadu_ps(g + I);
        const __m256 den = _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv)));
        _mm256_storeu_ps(act + (size_t)b * I + j, _mm256_mul_ps(_mm256_div_ps(gv, den), uv));
    }
}

/* kv[b]: that sequence's buffer [n_layers, 2, n_kv, capacity, head_dim]; kv_strides[b] its
   (layer, K/V, head) strides in elements; slots[b] where the new token's K/V go (it attends
   to slots 0..slots[b]); pos[b] its RoPE position. logits: [B, vocab]. */
void decode_step(const Net *net, int B, const int64_t *tokens, const int64_t *pos, const int64_t *slots,
                 void *const *kv, const int64_t *kv_strides, float *logits, int nt) {
    const int H = net->hidden, D = net->head_dim, Hq = net->n_heads, Hkv = net->n_kv;
    const int qd = Hq * D, kvd = Hkv * D, nqkv = qd + 2 * kvd, I = net->inter;
    float *buf = (float *)malloc(sizeof(float) * (size_t)B * (2 * H + nqkv + qd + 3 * I));
    float *x = buf, *h = x + (size_t)B * H, *qkv = h + (size_t)B * H;   /* [B,H] [B,H] [B,nqkv] */
    float *att = qkv + (size_t)B * nqkv, *gu = att + (size_t)B * qd;    /* [B,qd] [B,2I] */
    float *act = gu + (size_t)B * 2 * I;                                /* [B,I] */
    for (int b = 0; b < B; b++)
        memcpy(x + (size_t)b * H, net->embed + (size_t)tokens[b] * H, sizeof(float) * H);
    for (int l = 0; l < net->n_layers; l++) {
        const Layer *L = net->layers + l;
        for (int b = 0; b < B; b++) rms_norm_row(x + (size_t)b * H, L->attn_norm, H, net->eps, h + (size_t)b * H);
        mat_mul(&L->qkv, h, B, qkv, nt);
        for (int b = 0; b < B; b++) {
            float *r = qkv + (size_t)b * nqkv;
            if (L->qkv_bias) for (int i = 0; i < nqkv; i++) r[i] += L->qkv_bias[i];
            rope_row(r, Hq + Hkv, D, net->cos + (size_t)pos[b] * D, net->sin + (size_t)pos[b] * D);
            const int64_t *st = kv_strides + 3 * b;
            const size_t kofs = (size_t)(l * st[0]), vofs = kofs + (size_t)st[1], slot = (size_t)slots[b] * D;
            for (int hh = 0; hh < Hkv; hh++) {
                const float *kr = r + qd + hh * D, *vr = r + qd + kvd + hh * D;
                const size_t o = (size_t)hh * st[2] + slot;
                if (net->kv_f16) {
                    uint16_t *k16 = (uint16_t *)kv[b];
                    for (int j = 0; j < D; j++) { k16[kofs + o + j] = _cvtss_sh(kr[j], 0); k16[vofs + o + j] = _cvtss_sh(vr[j], 0); }
                } else {
                    float *k32 = (float *)kv[b];
                    memcpy(k32 + kofs + o, kr, sizeof(float) * D);
                    memcpy(k32 + vofs + o, vr, sizeof(float) * D);
                }
            }
            if (net->kv_f16)
                attend_decode_f16(r, (const uint16_t *)kv[b] + kofs, (const uint16_t *)kv[b] + vofs, (long)st[2],
                                  Hkv, Hq / Hkv, (int)slots[b] + 1, D, net->scale, att + (size_t)b * qd, nt);
            else
                attend_decode_f32(r, (const float *)kv[b] + kofs, (const float *)kv[b] + vofs, (long)st[2],
                                  Hkv, Hq / Hkv, (int)slots[b] + 1, D, net->scale, att + (size_t)b * qd, nt);
        }
        mat_mul(&L->o, att, B, h, nt);
        for (size_t i = 0; i < (size_t)B * H; i++) x[i] += h[i];
        for (int b = 0; b < B; b++) rms_norm_row(x + (size_t)b * H, L->mlp_norm, H, net->eps, h + (size_t)b * H);
        mat_mul(&L->gate_up, h, B, gu, nt);
        silu_mul(gu, act, B, I, nt);
        mat_mul(&L->down, act, B, h, nt);
        for (size_t i = 0; i < (size_t)B * H; i++) x[i] += h[i];
    }
    for (int b = 0; b < B; b++) rms_norm_row(x + (size_t)b * H, net->norm, H, net->eps, h + (size_t)b * H);
    mat_mul(&net->head, h, B, logits, nt);
    free(buf);
}
"""
_C_SOURCE += _DECODE_C

_PREFILL_ATTEND_C = r"""
/* Attention of T new tokens after `start` stored slots (a short prefill): row r = g*T + t of
   KV head h is query head h*G+g of token t and sees slots 0 .. start+t. q, out [Hq, T, D]
   float32; K/V rows [S, D] per head (S = start+T), heads `hstride` elements apart, float32
   or float16 read as stored. Tasks are (KV head, PC slots); per task the chunk's keys are
   transposed to [D][PC] and its values widened to [PC][D] once, then every row of the head
   runs against them in register tiles of MR rows x 16 (scores: over d; output: over
   slots), as in block_gemm; each task keeps a softmax state per row (max, sum, output)
   and the states are merged by log-sum-exp at the end (slot chunks split evenly over
   threads whatever T is). */
#define PC 128
void PREFILL_NAME(const float *q, const KV_T *k, const KV_T *v, long hstride, int Hkv, int G,
                  int T, int start, int D, float scale, float *out, int nthreads) {
    const int S = start + T, R = G * T, W = D + 2;  /* W: a partial state (merge_states) */
    const int nchunk = (S + PC - 1) / PC, ntask = Hkv * nchunk;
    float *pm = (float *)malloc(sizeof(float) * (size_t)ntask * R * W);
    #pragma omp parallel num_threads(nthreads)
    {
        float *kt = (float *)aligned_alloc(32, sizeof(float) * ((size_t)D * PC + (size_t)PC * D + (size_t)R * PC));
        float *vc = kt + (size_t)D * PC, *sc = vc + (size_t)PC * D;
        #pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < ntask; task++) {
            const int h = task / nchunk, c0 = (task % nchunk) * PC;
            const int n = S - c0 < PC ? S - c0 : PC;
            const KV_T *kh = k + (size_t)h * hstride + (size_t)c0 * D, *vh = v + (size_t)h * hstride + (size_t)c0 * D;
            const float *qh = q + (size_t)h * R * D;
            float *part = pm + (size_t)task * R * W;
            /* keys: 8 slots x 8 dims at a time, transposed; slots past n are zeros */
            for (int j = 0; j < PC; j += 8)
                for (int d = 0; d < D; d += 8) {
                    __m256 r8[8];
                    for (int i = 0; i < 8; i++)
                        r8[i] = j + i < n ? LOAD8(kh + (size_t)(j + i) * D + d) : _mm256_setzero_ps();
                    transpose8(r8);
                    for (int i = 0; i < 8; i++) _mm256_store_ps(kt + (size_t)(d + i) * PC + j, r8[i]);
                }
            for (int j = 0; j < PC; j++)
                for (int d = 0; d < D; d += 8)
                    _mm256_store_ps(vc + (size_t)j * D + d, j < n ? LOAD8(vh + (size_t)j * D + d) : _mm256_setzero_ps());
            /* scores sc[r][j] = q_r . k_j (scale applied below) */
            for (int j = 0; j < (n + 15) / 16 * 16; j += 16) rows16(qh, D, R, kt + j, PC, D, sc + j, PC);
            /* per row: visible slots, max, exp (exactly 0 where not visible), sum */
            for (int r = 0; r < R; r++) {
                const int t = r % T, lim = start + t + 1 - c0;
                const int vis = lim < n ? lim : n;
                float *sr = sc + (size_t)r * PC, *st = part + (size_t)r * W;
                if (vis <= 0) {
                    st[0] = -INFINITY; st[1] = 0.f;
                    for (int j = 0; j < PC; j += 8) _mm256_store_ps(sr + j, _mm256_setzero_ps());
                    continue;
                }
                const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), vvis = _mm256_set1_epi32(vis);
                __m256 vmax = _mm256_set1_ps(-INFINITY);
                for (int j = 0; j < vis; j += 8) {
                    const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(vvis, _mm256_add_epi32(_mm256_set1_epi32(j), lanes)));
                    const __m256 sj = _mm256_mul_ps(_mm256_load_ps(sr + j), _mm256_set1_ps(scale));
                    _mm256_store_ps(sr + j, sj);
                    vmax = _mm256_max_ps(vmax, _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), sj, keep));
                }
                __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
                m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
                const float mx = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
                const __m256 vmx = _mm256_set1_ps(mx);
                __m256 lsum = _mm256_setzero_ps();
                for (int j = 0; j < PC; j += 8) {
                    const __m256 e = exp8(_mm256_sub_ps(_mm256_load_ps(sr + j), vmx));
                    const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(vvis, _mm256_add_epi32(_mm256_set1_epi32(j), lanes)));
                    const __m256 p = _mm256_and_ps(e, keep);
                    _mm256_store_ps(sr + j, p);
                    lsum = _mm256_add_ps(lsum, p);
                }
                st[0] = mx;
                st[1] = hsum8(lsum);
            }
            /* outputs part[r][2 + d] = sum_j p[r][j] v_j[d] */
            for (int d = 0; d < D; d += 16) rows16(sc, PC, R, vc + d, D, n, part + 2 + d, W);
        }
        free(kt);
    }
    merge_states(pm, Hkv, nchunk, R, D, out, nthreads);
    free(pm);
}
"""
_C_SOURCE += _per_kv_dtype(_PREFILL_ATTEND_C, "PREFILL_NAME", "attend_prefill")

_PREFILL_LAYERS_C = r"""
/* Layers l0 .. l1-1 of a prefill of T >= 2 tokens of one sequence, at slots start ..
   start+T-1 and RoPE positions pos[0..T-1], over the hidden states x [T, hidden] in place;
   writes each token's K/V into kv (strides as decode_step's). The arithmetic of
   LlamaModel._layer over the block weights with attend_prefill, without its ~20 torch ops
   a layer: every row is computed independently of the others (the GEMM for every
   projection, attend_prefill). */
void prefill_layers(const Net *net, int T, float *x, const int64_t *pos, int start, void *kv,
                    const int64_t *kv_strides, int l0, int l1, int nt) {
    const int H = net->hidden, D = net->head_dim, Hq = net->n_heads, Hkv = net->n_kv;
    const int qd = Hq * D, kvd = Hkv * D, nqkv = qd + 2 * kvd, I = net->inter, G = Hq / Hkv;
    float *buf = (float *)malloc(sizeof(float) * (size_t)T * (H + nqkv + 3 * qd + 3 * I));
    float *h = buf, *qkv = h + (size_t)T * H, *qh = qkv + (size_t)T * nqkv;  /* [T,H] [T,nqkv] [Hq,T,D] */
    float *oh = qh + (size_t)T * qd, *att = oh + (size_t)T * qd;             /* [Hq,T,D] [T,qd] */
    float *gu = att + (size_t)T * qd, *act = gu + (size_t)T * 2 * I;        /* [T,2I] [T,I] */
    for (int l = l0; l < l1; l++) {
        const Layer *L = net->layers + l;
        const size_t kofs = (size_t)l * kv_strides[0], vofs = kofs + (size_t)kv_strides[1];
        #pragma omp parallel for schedule(static) num_threads(nt) if (T >= 16)
        for (int t = 0; t < T; t++) rms_norm_row(x + (size_t)t * H, L->attn_norm, H, net->eps, h + (size_t)t * H);
        mat_mul_rows(&L->qkv, h, T, qkv, 1, nt);
        #pragma omp parallel for schedule(static) num_threads(nt) if (T >= 16)
        for (int t = 0; t < T; t++) {
            float *r = qkv + (size_t)t * nqkv;
            if (L->qkv_bias) for (int i = 0; i < nqkv; i++) r[i] += L->qkv_bias[i];
            rope_row(r, Hq + Hkv, D, net->cos + (size_t)pos[t] * D, net->sin + (size_t)pos[t] * D);
            for (int hh = 0; hh < Hq; hh++)
                memcpy(qh + ((size_t)hh * T + t) * D, r + (size_t)hh * D, sizeof(float) * D);
            const size_t slot = (size_t)(start + t) * D;
            for (int hh = 0; hh < Hkv; hh++) {
                const float *kr = r + qd + hh * D, *vr = r + qd + kvd + hh * D;
                const size_t o = (size_t)hh * kv_strides[2] + slot;
                if (net->kv_f16) {
                    uint16_t *k16 = (uint16_t *)kv;
                    for (int j = 0; j < D; j += 8) {
                        _mm_storeu_si128((__m128i *)(k16 + kofs + o + j), _mm256_cvtps_ph(_mm256_loadu_ps(kr + j), 0));
                        _mm_storeu_si128((__m128i *)(k16 + vofs + o + j), _mm256_cvtps_ph(_mm256_loadu_ps(vr + j), 0));
                    }
                } else {
                    float *k32 = (float *)kv;
                    memcpy(k32 + kofs + o, kr, sizeof(float) * D);
                    memcpy(k32 + vofs + o, vr, sizeof(float) * D);
                }
            }
        }
        if (net->kv_f16)
            attend_prefill_f16(qh, (const uint16_t *)kv + kofs, (const uint16_t *)kv + vofs, (long)kv_strides[2],
                               Hkv, G, T, start, D, net->scale, oh, nt);
        else
            attend_prefill_f32(qh, (const float *)kv + kofs, (const float *)kv + vofs, (long)kv_strides[2],
                               Hkv, G, T, start, D, net->scale, oh, nt);
        for (int t = 0; t < T; t++)
            for (int hh = 0; hh < Hq; hh++)
                memcpy(att + (size_t)t * qd + (size_t)hh * D, oh + ((size_t)hh * T + t) * D, sizeof(float) * D);
        mat_mul_rows(&L->o, att, T, h, 1, nt);
        for (size_t i = 0; i < (size_t)T * H; i++) x[i] += h[i];
        #pragma omp parallel for schedule(static) num_threads(nt) if (T >= 16)
        for (int t = 0; t < T; t++) rms_norm_row(x + (size_t)t * H, L->mlp_norm, H, net->eps, h + (size_t)t * H);
        mat_mul_rows(&L->gate_up, h, T, gu, 1, nt);
        silu_mul(gu, act, T, I, nt);
        mat_mul_rows(&L->down, act, T, h, 1, nt);
        for (size_t i = 0; i < (size_t)T * H; i++) x[i] += h[i];
    }
    free(buf);
}
"""
_C_SOURCE += _PREFILL_LAYERS_C

_CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]


class BlockKernels:
    """The compiled matvec kernels. ``matmul(x, w)`` = ``x @ w.dequantize().T``
    up to float32 summation order; x: [M, K] float32 -> [M, N] float32."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.path = path
        p, i = ctypes.c_void_p, ctypes.c_int
        self._q4_1 = lib.q4_1_matmul
        self._q4_1.argtypes = [p, i, i, p, p, p, p, p, p, p, i, i, i]
        self._q4_1.restype = None
        self._q8_0 = lib.q8_0_matmul
        self._q8_0.argtypes = [p, i, i, p, p, p, i, i, i]
        self._q8_0.restype = None
        self._lib = lib
        self._attend = {torch.float32: lib.attend_decode_f32, torch.float16: lib.attend_decode_f16}
        for fn in self._attend.values():
            fn.argtypes = [p, p, p, ctypes.c_long, i, i, i, i, ctypes.c_float, p, i]
            fn.restype = None
        self._attend_prefill = {torch.float32: lib.attend_prefill_f32, torch.float16: lib.attend_prefill_f16}
        for fn in self._attend_prefill.values():
            fn.argtypes = [p, p, p, ctypes.c_long, i, i, i, i, i, ctypes.c_float, p, i]
            fn.restype = None

    def matmul(self, x: torch.Tensor, w: BlockLinear, gemm_rows: int = 1) -> torch.Tensor:
        """``gemm_rows``: more rows than this take the GEMM (where the outputs are a multiple
        of 16), whose rows do not depend on each other; the default, 1, is the prefill's."""
        n, k = w.shape
        x = x.float().contiguous().view(-1, k)
        y = torch.empty(x.shape[0], n, dtype=torch.float32)
        nt = torch.get_num_threads()
        if w.kind == "q4_1":
            pq, pd, pm = (t.data_ptr() for t in w.panels()) if n % 16 == 0 else (None, None, None)
            self._q4_1(x.data_ptr(), x.shape[0], k, w.qs.data_ptr(), w.d.data_ptr(), w.m.data_ptr(),
                       pq, pd, pm, y.data_ptr(), n, gemm_rows, nt)
        else:
            self._q8_0(x.data_ptr(), x.shape[0], k, w.qs.data_ptr(), w.d.data_ptr(), y.data_ptr(), n,
                       gemm_rows, nt)
        return y


    def attend_decode(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      scale: float) -> torch.Tensor:
        """Attention of one new token to every slot: q [Hq, 1, D], keys/values
        [Hkv, S, D] float32 or float16 (rows contiguous, heads equally strided)
        -> [Hq, 1, D] float32."""
        hq, _, dim = q.shape
        hkv, slots, _ = keys.shape
        if (keys.dtype not in self._attend or keys.stride() != values.stride() or keys.stride(2) != 1
                or keys.stride(1) != dim or dim % 8 or dim > 256 or hq // hkv > MAX_GROUP):
            raise ValueError("attend_decode: unsupported layout")
        q = q.float().contiguous()
        out = torch.empty(hq, 1, dim, dtype=torch.float32)
        self._attend[keys.dtype](q.data_ptr(), keys.data_ptr(), values.data_ptr(), keys.stride(0), hkv, hq // hkv,
                     slots, dim, scale, out.data_ptr(), torch.get_num_threads())
        return out

    def attend_prefill(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int,
                       scale: float) -> torch.Tensor:
        """Causal attention of T new tokens after ``start`` slots: q [Hq, T, D], keys/values
        [Hkv, start+T, D] float32 or float16 as stored (rows contiguous, heads equally
        strided); token t sees slots 0..start+t -> [Hq, T, D] float32."""
        hq, t, dim = q.shape
        hkv, slots, _ = keys.shape
        if (keys.dtype not in self._attend_prefill or values.dtype != keys.dtype
                or keys.shape != (hkv, slots, dim) or values.shape != keys.shape
                or keys.stride() != values.stride() or keys.stride(2) != 1 or keys.stride(1) != dim
                or dim % 16 or slots != start + t or hq % hkv):
            raise ValueError("attend_prefill: unsupported layout")
        q = q.float().contiguous()
        out = torch.empty(hq, t, dim, dtype=torch.float32)
        self._attend_prefill[keys.dtype](q.data_ptr(), keys.data_ptr(), values.data_ptr(), keys.stride(0),
                                         hkv, hq // hkv, t, start, dim, scale, out.data_ptr(),
                                         torch.get_num_threads())
        return out

    def decoder(self, dims: dict[str, int], eps: float, scale: float, layers: list[DecodeLayer],
                embed: torch.Tensor, norm: torch.Tensor, head: BlockLinear, cos: torch.Tensor,
                sin: torch.Tensor, kv_dtype: torch.dtype) -> FusedDecoder:
        """The whole-model decode step over these weights (see ``FusedDecoder``). ``dims``:
        n_layers, hidden, inter, n_heads, n_kv, head_dim; ``cos``/``sin`` [max_position, head_dim]."""
        return FusedDecoder(self._lib, dims, eps, scale, layers, embed, norm, head, cos, sin, kv_dtype)


class _Mat(ctypes.Structure):
    _fields_ = [("qs", ctypes.c_void_p), ("d", ctypes.c_void_p), ("m", ctypes.c_void_p),
                ("kind", ctypes.c_int), ("n", ctypes.c_int), ("k", ctypes.c_int),
                ("pq", ctypes.c_void_p), ("pd", ctypes.c_void_p), ("pm", ctypes.c_void_p)]


class _Layer(ctypes.Structure):
    _fields_ = [("attn_norm", ctypes.c_void_p), ("qkv_bias", ctypes.c_void_p), ("mlp_norm", ctypes.c_void_p),
                ("qkv", _Mat), ("o", _Mat), ("gate_up", _Mat), ("down", _Mat)]


class _Net(ctypes.Structure):
    _fields_ = [("n_layers", ctypes.c_int), ("hidden", ctypes.c_int), ("inter", ctypes.c_int),
                ("n_heads", ctypes.c_int), ("n_kv", ctypes.c_int), ("head_dim", ctypes.c_int),
                ("kv_f16", ctypes.c_int), ("eps", ctypes.c_float), ("scale", ctypes.c_float),
                ("layers", ctypes.POINTER(_Layer)), ("embed", ctypes.c_void_p), ("norm", ctypes.c_void_p),
                ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p), ("head", _Mat)]


@dataclass
class DecodeLayer:
    """One layer's decode weights as ``decode_step`` takes them (norms float32 [hidden])."""

    attn_norm: torch.Tensor
    qkv: BlockLinear  # [q_dim + 2*kv_dim, hidden]
    qkv_bias: torch.Tensor | None  # float32 [q_dim + 2*kv_dim]
    o: BlockLinear  # [hidden, q_dim]
    mlp_norm: torch.Tensor
    gate_up: BlockLinear  # [2*intermediate, hidden]
    down: BlockLinear  # [hidden, intermediate]


class FusedDecoder:
    """A whole decode step (every layer and the LM head) in one C call: the arithmetic
    of ``LlamaModel.forward`` over ``PackedLinear`` weights with ``attend_decode``,
    minus the ~300 small torch ops and their Python. Holds the tensors it points to.

    ``__call__(tokens, positions, slots, kvs)``: ``tokens``/``positions``/``slots``
    [B] long, ``kvs`` B buffers [n_layers, 2, n_kv_heads, capacity, head_dim] of the
    KV dtype (float16 or float32); writes each token's K/V at its slot, attends to
    slots 0..slot, returns float32 logits [B, vocab]. Mutates ``kvs``."""

    def __init__(self, lib: ctypes.CDLL, dims: dict[str, int], eps: float, scale: float,
                 layers: list[DecodeLayer], embed: torch.Tensor, norm: torch.Tensor, head: BlockLinear,
                 cos: torch.Tensor, sin: torch.Tensor, kv_dtype: torch.dtype) -> None:
        f32 = [t.float().contiguous() for t in (embed, norm, cos, sin)]
        self._keep: list[torch.Tensor] = list(f32)
        self.kv_dtype = kv_dtype
        self.vocab, self.max_position = embed.shape[0], cos.shape[0]
        self._dims = dims
        c_layers = (_Layer * len(layers))()
        for c, lw in zip(c_layers, layers, strict=True):
            c.attn_norm, c.mlp_norm = self._ptr(lw.attn_norm), self._ptr(lw.mlp_norm)
            c.qkv_bias = self._ptr(lw.qkv_bias) if lw.qkv_bias is not None else None
            c.qkv, c.o, c.gate_up, c.down = (self._mat(w) for w in (lw.qkv, lw.o, lw.gate_up, lw.down))
        self._layers = c_layers
        if dims["n_layers"] != len(layers):
            raise ValueError("FusedDecoder: dims['n_layers'] != len(layers)")
        self._net = _Net(kv_f16=int(kv_dtype == torch.float16), eps=eps, scale=scale,
                         layers=c_layers, embed=f32[0].data_ptr(), norm=f32[1].data_ptr(),
                         cos=f32[2].data_ptr(), sin=f32[3].data_ptr(), head=self._mat(head), **dims)
        self._fn = lib.decode_step
        p = ctypes.c_void_p
        self._fn.argtypes = [p, ctypes.c_int, p, p, p, p, p, p, ctypes.c_int]
        self._fn.restype = None
        self._prefill = lib.prefill_layers
        i = ctypes.c_int
        self._prefill.argtypes = [p, i, p, p, i, p, p, i, i, i]
        self._prefill.restype = None

    def _ptr(self, t: torch.Tensor) -> int:
        t = t.float().contiguous()
        self._keep.append(t)
        return t.data_ptr()

    def _mat(self, w: BlockLinear) -> _Mat:
        self._keep += [t for t in (w.qs, w.d, w.m) if t is not None]
        n, k = w.shape
        panels = w.panels() if w.kind == "q4_1" and n % 16 == 0 else (None, None, None)
        self._keep += [t for t in panels if t is not None]
        return _Mat(w.qs.data_ptr(), w.d.data_ptr(), w.m.data_ptr() if w.m is not None else None,
                    0 if w.kind == "q4_1" else 1, n, k,
                    *(t.data_ptr() if t is not None else None for t in panels))

    def prefill_layers(self, x: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor, start: int,
                       l0: int, l1: int) -> torch.Tensor:
        """Layers ``l0..l1-1`` of a prefill of T >= 2 tokens at slots ``start..start+T-1``
        over the hidden states ``x`` [T, hidden] float32 (updated in place and returned),
        writing K/V into ``kv``: ``LlamaModel._layer`` over these weights with
        ``attend_prefill``, in one C call."""
        t = x.shape[0]
        if (t < 2 or x.dtype != torch.float32 or not x.is_contiguous() or x.shape[1] != self._dims["hidden"]
                or positions.shape != (t,) or not self.accepts(kv) or not 0 <= l0 <= l1 <= self._dims["n_layers"]
                or start < 0 or start + t > kv.shape[3]):
            raise ValueError("FusedDecoder.prefill_layers: unsupported arguments")
        pos = positions.to(torch.int64).contiguous()
        if int(pos.min()) < 0 or int(pos.max()) >= self.max_position:
            raise IndexError("FusedDecoder.prefill_layers: position out of range")
        strides = torch.tensor(kv.stride()[:3], dtype=torch.int64)
        self._prefill(ctypes.byref(self._net), t, x.data_ptr(), pos.data_ptr(), start, kv.data_ptr(),
                      strides.data_ptr(), l0, l1, torch.get_num_threads())
        return x

    def accepts(self, kv: torch.Tensor) -> bool:
        """Whether ``kv`` has the layout the C step indexes (rows of head_dim contiguous)."""
        d = self._dims
        return (kv.dtype == self.kv_dtype and kv.dim() == 5 and kv.shape[0] == d["n_layers"]
                and kv.shape[2] == d["n_kv"] and kv.shape[4] == d["head_dim"]
                and kv.stride(4) == 1 and kv.stride(3) == d["head_dim"] and kv.device.type == "cpu")

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                 kvs: list[torch.Tensor]) -> torch.Tensor:
        n = len(kvs)
        tokens, positions, slots = (t.to(torch.int64).contiguous() for t in (tokens, positions, slots))
        if not (tokens.shape == positions.shape == slots.shape == (n,)) or not all(map(self.accepts, kvs)):
            raise ValueError("FusedDecoder: unsupported arguments")
        if n and not (0 <= int(tokens.min()) and int(tokens.max()) < self.vocab
                      and 0 <= int(positions.min()) and int(positions.max()) < self.max_position
                      and all(0 <= int(s) < kv.shape[3] for s, kv in zip(slots, kvs, strict=True))):
            raise IndexError("FusedDecoder: token, position or slot out of range")
        ptrs = (ctypes.c_void_p * n)(*(kv.data_ptr() for kv in kvs))
        strides = torch.tensor([kv.stride()[:3] for kv in kvs], dtype=torch.int64).reshape(n, 3)
        logits = torch.empty(n, self.vocab, dtype=torch.float32)
        self._fn(ctypes.byref(self._net), n, tokens.data_ptr(), positions.data_ptr(), slots.data_ptr(),
                 ptrs, strides.data_ptr(), logits.data_ptr(), torch.get_num_threads())
        return logits


def load_kernels(build_dir: Path) -> BlockKernels | None:
    """Build (once, cached by source digest) and load the kernels; None when this
    machine cannot run them (not x86-64 Linux with AVX2, or no C compiler)."""
    if not sys.platform.startswith("linux") or torch.backends.cpu.get_cpu_capability() not in (
        "AVX2", "AVX512"
    ):
        return None
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    key = hashlib.sha256((_C_SOURCE + " ".join(_CFLAGS)).encode()).hexdigest()[:16]
    so = build_dir / f"blockmm-{key}.so"
    if not so.is_file():
        build_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=build_dir) as tmp:
            src = Path(tmp) / "blockmm.c"
            src.write_text(_C_SOURCE)
            out = Path(tmp) / so.name
            res = subprocess.run([cc, *_CFLAGS, str(src), "-o", str(out), "-lm"], capture_output=True, text=True)
            if res.returncode != 0:
                return None
            out.replace(so)  # atomic: a concurrent builder writes the same bytes
    # torch (imported above) already loaded its libgomp.so.1, so the kernel shares
    # torch's OpenMP thread pool instead of starting a second one.
    return BlockKernels(ctypes.CDLL(str(so)), so)


class PackedLinear:
    """A block matrix bound to the kernel that multiplies by it: ``y = self(x)`` is
    ``x @ W.T`` in float32; x: [T, in_features] -> [T, out_features]."""

    def __init__(self, w: BlockLinear, kernels: BlockKernels) -> None:
        self.w = w
        self.kernels = kernels

    @property
    def shape(self) -> tuple[int, int]:
        return self.w.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.matmul(x, self.w)
