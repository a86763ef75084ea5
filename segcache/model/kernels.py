"""The block kernels: C sources in ``csrc/``, built once per machine with cffi, bound here.

The sources are real C files (``csrc/``): ``segkernels.h`` is the one interface, read by
the compiler and by cffi's ``cdef`` alike, so a struct layout is written once for both
languages. ``build_kernels`` compiles them into a CPython extension in the cache directory,
keyed by a digest of the sources, the flags and the compiler, so a change to any of them
builds anew; ``KERNEL_VERSION`` (part of the model fingerprint) is the digest of the sources
and flags, never typed by hand.

A failed build is loud: ``probe_kernels`` returns the compiler's own output, and the
runtime logs it and names the plan it falls back to. Where the kernels cannot run at all
(not x86-64 Linux with AVX2) the reason says so.

Shapes: ``matmul`` x [M, K] float32 -> [M, N]; attention q [Hq, T, D], keys/values
[Hkv, S, D]; KV buffers [n_layers, 2, n_kv_heads, capacity, head_dim].
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from segcache.config import read_environment
from segcache.model.quant import BlockLinear

log = logging.getLogger("segcache.kernels")

CSRC = Path(__file__).with_name("csrc")
_SOURCES = ("pool.c", "pool_check.c", "matmul.c", "attention.c", "layers.c")
CFLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-pthread")
MAX_GROUP = 8  # SEG_MAX_GROUP in segkernels.h: query heads per KV head the attention takes


def sources_digest(directory: Path, suffixes: tuple[str, ...], extra: str = "") -> str:
    """sha256 over every file of ``directory`` with one of ``suffixes`` (name and
    bytes, in name order) and ``extra``."""
    h = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        if path.suffix in suffixes:
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(extra.encode())
    return h.hexdigest()


def _source_digest() -> str:
    """The digest of csrc/ and the compile flags."""
    return sources_digest(CSRC, (".c", ".h"), " ".join(CFLAGS))


# Part of the model fingerprint: KV computed by other kernel sources or flags is never served.
KERNEL_VERSION = "csrc-" + _source_digest()[:16]


class KernelBuildError(RuntimeError):
    """The kernels should run here but did not build; ``log`` holds the compiler's output."""

    def __init__(self, message: str, log_text: str = "") -> None:
        super().__init__(message)
        self.log = log_text


def unsupported_reason() -> str | None:
    """Why the kernels cannot run on this machine at all, or None if they can."""
    if not sys.platform.startswith("linux"):
        return f"block kernels need Linux (this is {sys.platform})"
    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in ("AVX2", "AVX512"):
        return f"block kernels need AVX2 + FMA (torch reports CPU capability {cap})"
    return None


def _compiler_id() -> str:
    cc = read_environment().cc or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise KernelBuildError("no C compiler found (install gcc, or set CC)")
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except OSError as e:
        raise KernelBuildError(f"C compiler {cc} does not run: {e}") from e
    return f"{cc}:{out.splitlines()[0] if out else '?'}"


def build_kernels(build_dir: Path) -> Path:
    """The built extension for these sources in ``build_dir`` (compiled now if missing).
    Raises ``KernelBuildError`` with the compiler's output when the build fails."""
    key = hashlib.sha256((_source_digest() + _compiler_id()).encode()).hexdigest()[:16]
    name = f"_segkernels_{key}"
    so = build_dir / (name + sysconfig.get_config_var("EXT_SUFFIX"))
    if so.is_file():
        return so
    build_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=build_dir, prefix=".build-") as tmp:
        built = _compile(name, Path(tmp))
        built.replace(so)  # atomic: a concurrent builder writes the same bytes
    return so


def _compile(name: str, tmp: Path) -> Path:
    import cffi

    ffi = cffi.FFI()
    ffi.cdef((CSRC / "segkernels.h").read_text())
    ffi.set_source(name, '#include "kernels.h"', sources=[str(CSRC / s) for s in _SOURCES],
                   include_dirs=[str(CSRC)], extra_compile_args=list(CFLAGS), libraries=["m"])
    # the compiler writes to the process's stdout/stderr: capture them to report a failure
    out_log = tmp / "build.log"
    with open(out_log, "w+b") as sink:
        saved = [os.dup(1), os.dup(2)]
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            return Path(ffi.compile(tmpdir=str(tmp), verbose=True))
        except Exception as e:  # cffi raises VerificationError; setuptools its own errors
            sink.flush()
            sink.seek(0)
            text = sink.read().decode(errors="replace")
            raise KernelBuildError(f"building the block kernels failed: {e}", text[-8000:]) from e
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


@dataclass(frozen=True)
class KernelProbe:
    """What ``probe_kernels`` found: the kernels, or why there are none (and the build log)."""

    kernels: BlockKernels | None
    status: str  # "loaded", "unsupported" or "build-failed"
    reason: str = ""
    log: str = ""


def probe_kernels(build_dir: Path) -> KernelProbe:
    """Build (once) and load the kernels, saying why not where they cannot be had."""
    reason = unsupported_reason()
    if reason is not None:
        return KernelProbe(None, "unsupported", reason)
    try:
        so = build_kernels(build_dir)
        spec = importlib.util.spec_from_file_location(so.name.split(".")[0], so)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except KernelBuildError as e:
        return KernelProbe(None, "build-failed", str(e), e.log)
    except (ImportError, OSError) as e:
        return KernelProbe(None, "build-failed", f"loading the built kernels failed: {e}")
    return KernelProbe(BlockKernels(module.ffi, module.lib, so), "loaded", str(so))


def load_kernels(build_dir: Path) -> BlockKernels | None:
    """The kernels, or None; a failed build is logged with the compiler's output."""
    probe = probe_kernels(build_dir)
    if probe.status == "build-failed":
        log.error("%s\n%s", probe.reason, probe.log)
    return probe.kernels


class BlockKernels:
    """The compiled kernels. ``matmul(x, w)`` = ``x @ w.dequantize().T`` up to float32
    summation order; x: [M, K] float32 -> [M, N] float32."""

    def __init__(self, ffi, lib, path: Path) -> None:
        self.ffi, self.lib, self.path = ffi, lib, path
        self._attend = {torch.float32: (lib.attend_decode_f32, "float *"),
                        torch.float16: (lib.attend_decode_f16, "uint16_t *")}
        self._attend_prefill = {torch.float32: (lib.attend_prefill_f32, "float *"),
                                torch.float16: (lib.attend_prefill_f16, "uint16_t *")}

    def pool_stats(self) -> dict[str, int]:
        """The worker pool's counts since the process started (``seg_pool_stats``):
        programs, tasks redone by a thread that had not claimed them, programs whose caller
        waited at the end for a thread still inside a task, and sleeps of a waiting thread."""
        out = self.ffi.new("uint64_t[6]")
        self.lib.seg_pool_stats(out)
        return dict(zip(("programs", "redone", "final_waits", "sleeps", "final_wait_ns", "moves"),
                        map(int, out), strict=True))

    def ptr(self, ctype: str, t: torch.Tensor | None):
        """A C pointer to ``t``'s data (NULL for None); ``t`` must outlive its use."""
        return self.ffi.NULL if t is None else self.ffi.cast(ctype, t.data_ptr())

    def matmul(self, x: torch.Tensor, w: BlockLinear, gemm_rows: int = 1) -> torch.Tensor:
        """``gemm_rows``: more rows than this take the GEMM (where the outputs are a multiple
        of 16), whose rows do not depend on each other; the default, 1, is the prefill's."""
        n, k = w.shape
        x = x.float().contiguous().view(-1, k)
        y = torch.empty(x.shape[0], n, dtype=torch.float32)
        nt, f32, p = torch.get_num_threads(), "float *", self.ptr
        if w.kind == "q4_1":
            pq, pd, pm = w.panels() if n % 16 == 0 else (None, None, None)
            self.lib.q4_1_matmul(p(f32, x), x.shape[0], k, p("uint8_t *", w.qs), p(f32, w.d), p(f32, w.m),
                                 p("uint8_t *", pq), p(f32, pd), p(f32, pm), p(f32, y), n, gemm_rows, nt)
        else:
            self.lib.q8_0_matmul(p(f32, x), x.shape[0], k, p("int8_t *", w.qs), p(f32, w.d), p(f32, y), n,
                                 gemm_rows, nt)
        return y

    def attend_decode(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      scale: float) -> torch.Tensor:
        """Attention of one new token to every slot: q [Hq, 1, D], keys/values [Hkv, S, D]
        float32 or float16 (rows contiguous, heads equally strided) -> [Hq, 1, D] float32."""
        hq, _, dim = q.shape
        hkv, slots, _ = keys.shape
        if (keys.dtype not in self._attend or keys.stride() != values.stride() or keys.stride(2) != 1
                or keys.stride(1) != dim or dim % 8 or dim > 256 or hq // hkv > MAX_GROUP):
            raise ValueError("attend_decode: unsupported layout")
        q = q.float().contiguous()
        out = torch.empty(hq, 1, dim, dtype=torch.float32)
        fn, kv_t = self._attend[keys.dtype]
        fn(self.ptr("float *", q), self.ptr(kv_t, keys), self.ptr(kv_t, values), keys.stride(0), hkv,
           hq // hkv, slots, dim, scale, self.ptr("float *", out), torch.get_num_threads())
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
        fn, kv_t = self._attend_prefill[keys.dtype]
        fn(self.ptr("float *", q), self.ptr(kv_t, keys), self.ptr(kv_t, values), keys.stride(0), hkv,
           hq // hkv, t, start, dim, scale, self.ptr("float *", out), torch.get_num_threads())
        return out

    def decoder(self, dims: dict[str, int], eps: float, scale: float, layers: list[DecodeLayer],
                embed: torch.Tensor, norm: torch.Tensor, head: BlockLinear, cos: torch.Tensor,
                sin: torch.Tensor, kv_dtype: torch.dtype) -> FusedDecoder:
        """The whole-model decode step over these weights (see ``FusedDecoder``). ``dims``:
        n_layers, hidden, inter, n_heads, n_kv, head_dim; ``cos``/``sin`` [max_position, head_dim]."""
        return FusedDecoder(self, dims, eps, scale, layers, embed, norm, head, cos, sin, kv_dtype)


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
    """A whole decode step (every layer and the LM head) in one C call: the arithmetic of
    ``LlamaModel.forward`` over ``PackedLinear`` weights with ``attend_decode``, minus the
    ~300 small torch ops and their Python. Holds the tensors its C structs point to.

    ``__call__(tokens, positions, slots, kvs)``: ``tokens``/``positions``/``slots`` [B]
    long, ``kvs`` B buffers [n_layers, 2, n_kv_heads, capacity, head_dim] of the KV dtype
    (float16 or float32); writes each token's K/V at its slot, attends to slots 0..slot,
    returns float32 logits [B, vocab]. Mutates ``kvs``."""

    def __init__(self, kernels: BlockKernels, dims: dict[str, int], eps: float, scale: float,
                 layers: list[DecodeLayer], embed: torch.Tensor, norm: torch.Tensor, head: BlockLinear,
                 cos: torch.Tensor, sin: torch.Tensor, kv_dtype: torch.dtype) -> None:
        if dims["n_layers"] != len(layers):
            raise ValueError("FusedDecoder: dims['n_layers'] != len(layers)")
        self._k, ffi = kernels, kernels.ffi
        self._keep: list[torch.Tensor] = []
        self.kv_dtype = kv_dtype
        self.vocab, self.max_position = embed.shape[0], cos.shape[0]
        self._dims = dims
        self._layers = ffi.new("Layer[]", len(layers))
        for c, lw in zip(self._layers, layers, strict=True):
            c.attn_norm, c.mlp_norm = self._f32(lw.attn_norm), self._f32(lw.mlp_norm)
            c.qkv_bias = self._f32(lw.qkv_bias) if lw.qkv_bias is not None else ffi.NULL
            for field in ("qkv", "o", "gate_up", "down"):
                self._fill_mat(getattr(c, field), getattr(lw, field))
        self._net = ffi.new("Net *", {**dims, "kv_f16": int(kv_dtype == torch.float16), "eps": eps,
                                      "scale": scale})
        self._net.layers = self._layers
        self._net.embed, self._net.norm = self._f32(embed), self._f32(norm)
        self._net.cos, self._net.sin = self._f32(cos), self._f32(sin)
        self._fill_mat(self._net.head, head)

    def _f32(self, t: torch.Tensor):
        t = t.float().contiguous()
        self._keep.append(t)
        return self._k.ptr("float *", t)

    def _fill_mat(self, c, w: BlockLinear) -> None:
        n, k = w.shape
        panels = w.panels() if w.kind == "q4_1" and n % 16 == 0 else (None, None, None)
        self._keep += [t for t in (w.qs, w.d, w.m, *panels) if t is not None]
        p = self._k.ptr
        c.qs, c.d, c.m = p("void *", w.qs), p("float *", w.d), p("float *", w.m)
        c.kind, c.n, c.k = 0 if w.kind == "q4_1" else 1, n, k
        c.pq, c.pd, c.pm = p("uint8_t *", panels[0]), p("float *", panels[1]), p("float *", panels[2])

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
        p = self._k.ptr
        self._k.lib.prefill_layers(self._net, t, p("float *", x), p("int64_t *", pos), start, p("void *", kv),
                                   p("int64_t *", strides), l0, l1, torch.get_num_threads())
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
        ffi, p = self._k.ffi, self._k.ptr
        ptrs = ffi.new("void *[]", [p("void *", kv) for kv in kvs])
        strides = torch.tensor([kv.stride()[:3] for kv in kvs], dtype=torch.int64).reshape(n, 3)
        logits = torch.empty(n, self.vocab, dtype=torch.float32)
        self._k.lib.decode_step(self._net, n, p("int64_t *", tokens), p("int64_t *", positions),
                                p("int64_t *", slots), ptrs, p("int64_t *", strides), p("float *", logits),
                                torch.get_num_threads())
        return logits


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
