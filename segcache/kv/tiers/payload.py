"""The one payload format of every lower tier: a safetensors blob that names itself.

One tensor, ``kv``, shape ``[n_layers, 2, n_kv_heads, n_tokens, head_dim]`` in
the engine's KV dtype (``F32``, ``F16`` or ``BF16`` in the safetensors header;
bfloat16 travels as raw bytes, numpy has no such dtype). The header's
``__metadata__`` (strings only) holds:

    format          "segcache-kv"
    version         FORMAT_VERSION
    namespace       tenant namespace digest H(tenant, fingerprint)
    fingerprint     model fingerprint (everything that changes KV bits)
    parent_chain    chain digest of the parent node (the namespace for a first segment)
    segment_digest  digest of this node's unit
    chain           H(parent_chain, segment_digest)
    n_tokens        tokens whose KV this is (== shape[3])
    token_digest    sha256 of the token ids (``token_digest``), never the ids
    dtype           float32 | float16 | bfloat16
    layout          the engine's KV layout string (e.g. runtime.KV_LAYOUT_VERSION)
    checksum        "xxh3_64:<16 hex>" of the tensor bytes

No prompt text and no token ids are stored: only digests and KV. ``decode``
serves a payload only if every field matches what the caller expects; it
raises ``PayloadRejected(reason)`` otherwise (the tier deletes and counts it).

XXH3-64, not SHA-256 or CRC32, guards the tensor bytes: it catches torn and
flipped bytes at ~25 GB/s on the 2-core Xeon host (4+ GB/s from memory with the
cores shared), and it releases the GIL. zlib's CRC32 (format 1) ran at 2.5 GB/s
there, about a third of a disk load's time; SHA-256 at 1.2 GB/s.
The *identity* of a payload is bound by the key fields, which are compared exactly.

``decode`` returns the tensor as a view of the bytes it was given, never a
copy: a tier that reads into a writable buffer hands the engine KV it can wrap
as a tensor as is. So it reads the safetensors header itself, and requires
what the library requires of a file with one tensor (offsets from 0 covering
the data exactly, nothing after it) and what this format adds (the one tensor
``kv``, 5-d, its dtype and token count those of ``__metadata__``).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import safetensors
import xxhash
from safetensors import TensorSpec

if TYPE_CHECKING:
    from segcache.kv.tiers.keys import CacheKey

FORMAT = "segcache-kv"
FORMAT_VERSION = "2"  # 2: the checksum is XXH3-64 (1: CRC32)
TENSOR = "kv"
# engine dtype name -> (safetensors code, numpy dtype the bytes are viewed as)
DTYPES = {
    "float32": ("F32", np.float32),
    "float16": ("F16", np.float16),
    "bfloat16": ("BF16", np.uint16),  # bit pattern only: convert with torch .view(torch.bfloat16)
}
_CODE_TO_DTYPE = {code: name for name, (code, _) in DTYPES.items()}
_KEY_FIELDS = ("namespace", "fingerprint", "parent_chain", "segment_digest", "chain")
MAX_HEADER_BYTES = 1 << 20  # a payload header is ~1 KB; anything bigger is not ours


class PayloadRejected(Exception):
    """A payload that must not be served; ``reason`` is a short counter name."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class KVData:
    """KV bytes with their dtype and shape ``[n_layers, 2, n_kv_heads, n_tokens, head_dim]``.

    ``data`` is C-contiguous little-endian bytes. From torch:
    ``KVData(t.contiguous().view(torch.uint8).numpy().data, str(t.dtype)[6:], tuple(t.shape))``;
    back: ``torch.frombuffer(bytearray(kv.data), dtype=getattr(torch, kv.dtype)).view(kv.shape)``.
    """

    data: bytes | memoryview
    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if len(self.shape) != 5 or self.shape[1] != 2:
            raise ValueError(f"KV shape must be [n_layers, 2, n_kv_heads, n_tokens, head_dim], got {self.shape}")
        itemsize = np.dtype(DTYPES[self.dtype][1]).itemsize
        if memoryview(self.data).nbytes != itemsize * int(np.prod(self.shape)):
            raise ValueError("KV data size does not match its dtype and shape")

    @classmethod
    def from_array(cls, arr: np.ndarray) -> KVData:
        """From a float32/float16 array (a copy is made only if it is not contiguous)."""
        name = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}.get(arr.dtype)
        if name is None:
            raise ValueError(f"unsupported array dtype {arr.dtype} (use raw bytes for bfloat16)")
        arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
        return cls(arr.data.cast("B"), name, tuple(arr.shape))

    @property
    def n_tokens(self) -> int:
        return self.shape[3]

    @property
    def nbytes(self) -> int:
        return memoryview(self.data).nbytes

    def array(self) -> np.ndarray:
        """A read-only numpy view (bfloat16 as its uint16 bit patterns)."""
        return np.frombuffer(self.data, dtype=DTYPES[self.dtype][1]).reshape(self.shape)


@dataclass(frozen=True)
class Expected:
    """What a reader requires of a payload. ``token_digest`` None: not checked
    (a kept reply, whose ids the next prompt does not have); ``n_tokens`` then
    comes from the payload."""

    key: CacheKey
    layout: str
    token_digest: str | None = None


def token_digest(token_ids: Sequence[int]) -> str:
    """``sha256:`` of the ids as little-endian int64s: names them without storing them."""
    a = array("q", token_ids)
    if a.itemsize != 8:  # pragma: no cover - every CPython platform has an 8-byte "q"
        raise RuntimeError("array('q') is not 8 bytes here")
    return "sha256:" + hashlib.sha256(a.tobytes()).hexdigest()


def checksum(data: bytes | memoryview) -> str:
    return f"xxh3_64:{xxhash.xxh3_64_hexdigest(data)}"


def encode(key: CacheKey, kv: KVData, tokens_digest: str, layout: str) -> bytes:
    """The payload of one node: ``kv`` plus the self-describing header."""
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        **{f: getattr(key, f) for f in _KEY_FIELDS},
        "n_tokens": str(kv.n_tokens),
        "token_digest": tokens_digest,
        "dtype": kv.dtype,
        "layout": layout,
        "checksum": checksum(kv.data),
    }
    view = memoryview(kv.data)
    buf = np.frombuffer(view, dtype=np.uint8) if view.nbytes else np.zeros(1, np.uint8)
    spec = TensorSpec(dtype=kv.dtype, shape=list(kv.shape),
                      data_ptr=buf.ctypes.data, data_len=view.nbytes)
    return bytes(safetensors.serialize({TENSOR: spec}, metadata=meta))


def read_metadata(data: bytes | memoryview) -> dict[str, str]:
    """The ``__metadata__`` of a payload from its header alone (tensors not touched),
    plus ``"_size"``: the payload's full length as the header states it.
    ``data`` may be just the first bytes (a file's header). Raises
    PayloadRejected("truncated"/"malformed"/"version")."""
    header, n = _header(memoryview(data))
    try:
        end = max(int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__")
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise PayloadRejected("malformed", f"header: {e}") from None
    meta = dict(header["__metadata__"])
    meta["_size"] = str(8 + n + end)
    return meta


def _header(view: memoryview) -> tuple[dict, int]:
    """A payload's parsed safetensors header and its length in bytes (format and
    version checked)."""
    if view.nbytes < 8:
        raise PayloadRejected("truncated", "shorter than the header length")
    (n,) = struct.unpack("<Q", view[:8])
    if n > MAX_HEADER_BYTES:
        raise PayloadRejected("malformed", "header length out of range")
    if view.nbytes < 8 + n:
        raise PayloadRejected("truncated", "header cut short")
    try:
        header = json.loads(bytes(view[8:8 + n]))
        meta = header["__metadata__"]
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise PayloadRejected("malformed", f"header: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise PayloadRejected("malformed", "not a segcache KV payload")
    if meta.get("version") != FORMAT_VERSION:
        raise PayloadRejected("version", f"format version {meta.get('version')!r}")
    return header, n


def check_metadata(meta: dict[str, str], expect: Expected) -> None:
    """Raise PayloadRejected unless the header names exactly the entry expected."""
    key = expect.key
    if meta.get("namespace") != key.namespace:
        raise PayloadRejected("namespace", "payload belongs to another namespace")
    if meta.get("fingerprint") != key.fingerprint:
        raise PayloadRejected("fingerprint", "payload computed by another model fingerprint")
    for f in ("parent_chain", "segment_digest", "chain"):
        if meta.get(f) != getattr(key, f):
            raise PayloadRejected("key", f"{f} differs")
    if meta.get("layout") != expect.layout:
        raise PayloadRejected("layout", f"layout {meta.get('layout')!r}")
    if expect.token_digest is not None and meta.get("token_digest") != expect.token_digest:
        raise PayloadRejected("token_digest", "token ids differ")


def decode(data: bytes | memoryview, expect: Expected) -> KVData:
    """The KV of a payload that matches ``expect`` in every field, with intact bytes,
    as a view of ``data`` (no copy: writable if ``data`` is). Raises
    PayloadRejected(reason) otherwise; never returns unchecked bytes."""
    view = memoryview(data).cast("B")
    header, n = _header(view)
    meta = header["__metadata__"]
    check_metadata(meta, expect)
    dtype, shape, nbytes = _tensor(header)
    if dtype != meta.get("dtype"):
        raise PayloadRejected("malformed", f"tensor dtype {dtype} vs header {meta.get('dtype')}")
    if str(shape[3]) != meta.get("n_tokens"):
        raise PayloadRejected("malformed", f"shape {shape} vs n_tokens {meta.get('n_tokens')}")
    size = 8 + n + nbytes
    if view.nbytes < size:
        raise PayloadRejected("truncated", f"{view.nbytes} of {size} bytes")
    if view.nbytes > size:
        raise PayloadRejected("malformed", f"{view.nbytes - size} bytes after the tensor")
    body = view[8 + n:]
    if checksum(body) != meta.get("checksum"):
        raise PayloadRejected("checksum", "tensor bytes do not match the checksum")
    return KVData(body, dtype, shape)


def _tensor(header: dict) -> tuple[str, tuple[int, ...], int]:
    """(dtype, shape, bytes) of the one tensor ``kv``, which must start the data
    section and fill it: what safetensors requires of a file with one tensor."""
    if set(header) != {"__metadata__", TENSOR} or not isinstance(header[TENSOR], dict):
        raise PayloadRejected("malformed", "expected exactly one tensor 'kv'")
    t = header[TENSOR]
    code, shape, offsets = t.get("dtype"), t.get("shape"), t.get("data_offsets")
    dtype = _CODE_TO_DTYPE.get(code) if isinstance(code, str) else None
    if dtype is None:
        raise PayloadRejected("malformed", f"tensor dtype {code!r}")
    if (not isinstance(shape, list) or len(shape) != 5 or shape[1] != 2
            or not all(type(d) is int and d >= 0 for d in shape)):
        raise PayloadRejected("malformed", f"tensor shape {shape!r}")
    nbytes = math.prod(shape) * np.dtype(DTYPES[dtype][1]).itemsize
    if offsets != [0, nbytes]:
        raise PayloadRejected("malformed", f"data offsets {offsets!r} for {nbytes} bytes")
    return dtype, tuple(shape), nbytes
