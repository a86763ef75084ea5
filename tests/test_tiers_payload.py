"""The lower tiers' payload: a safetensors blob that names its entry, and every refusal."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import safetensors
from hypothesis import given, settings
from hypothesis import strategies as st

from segcache.kv.hashing import segment_digest
from segcache.kv.tiers import (
    CacheKey,
    Expected,
    KVData,
    PayloadRejected,
    decode,
    encode,
    token_digest,
)
from segcache.kv.tiers.payload import FORMAT_VERSION, read_metadata
from tests.tier_helpers import FP_OTHER, LAYOUT, Node


def _reason(data: bytes, expect: Expected) -> str:
    with pytest.raises(PayloadRejected) as e:
        decode(data, expect)
    return e.value.reason


def test_round_trip_float32_and_float16():
    node = Node("t", "system prompt", n_tokens=5)
    assert np.array_equal(decode(node.payload, node.expect).array(), node.array)
    half = node.array.astype(np.float16)
    data = encode(node.key, KVData.from_array(half), node.tokens, LAYOUT)
    back = decode(data, node.expect)
    assert back.dtype == "float16" and np.array_equal(back.array(), half)


def test_bfloat16_travels_as_raw_bytes_and_is_named_bf16_in_the_header():
    node = Node("t", "x", n_tokens=3)
    bits = np.arange(np.prod(node.array.shape), dtype=np.uint16).reshape(node.array.shape)
    data = encode(node.key, KVData(bits.tobytes(), "bfloat16", bits.shape), node.tokens, LAYOUT)
    (name, tensor), = safetensors.deserialize(data)
    assert (name, tensor["dtype"], tensor["shape"]) == ("kv", "BF16", list(bits.shape))
    back = decode(data, node.expect)
    assert back.dtype == "bfloat16" and np.array_equal(back.array(), bits)


def test_header_holds_the_key_and_digests_and_never_the_ids():
    node = Node("t", "secret document text", n_tokens=6)
    meta = read_metadata(node.payload)
    meta.pop("_size")
    assert set(meta) == {"format", "version", "namespace", "fingerprint", "parent_chain",
                         "segment_digest", "chain", "n_tokens", "token_digest", "dtype", "layout",
                         "checksum"}
    assert meta["chain"] == node.key.chain and meta["namespace"] == node.key.namespace
    assert meta["token_digest"] == token_digest(node.ids) and meta["n_tokens"] == "6"
    # Every value is a digest, a number of tokens or a fixed name: no text, no ids.
    for name in ("namespace", "fingerprint", "parent_chain", "segment_digest", "chain", "token_digest"):
        assert meta[name].startswith("sha256:") and len(meta[name]) == 71
    assert b"secret" not in node.payload
    for dtype in ("<i8", "<i4"):
        assert np.asarray(node.ids, dtype=dtype).tobytes() not in node.payload


def test_a_flipped_tensor_byte_is_a_checksum_rejection():
    node = Node("t", "x", n_tokens=8)
    bad = bytearray(node.payload)
    bad[-5] ^= 0x40
    assert _reason(bytes(bad), node.expect) == "checksum"


@pytest.mark.parametrize("cut", [0, 5, 40, -1, -100])
def test_a_truncated_payload_is_rejected(cut):
    node = Node("t", "x", n_tokens=8)
    assert _reason(node.payload[:cut], node.expect) == "truncated"


def test_garbage_is_malformed_and_an_old_version_is_refused():
    node = Node("t", "x")
    assert _reason(b"\x10" + bytes(40), node.expect) == "malformed"
    # Format 1 (a CRC32 checksum) is refused as such, not checked against XXH3.
    assert FORMAT_VERSION == "2" and read_metadata(node.payload)["checksum"].startswith("xxh3_64:")
    old = node.payload.replace(b'"version":"2"', b'"version":"1"')
    assert old != node.payload and _reason(old, node.expect) == "version"


def test_a_payload_is_served_only_under_its_own_key():
    a = Node("tenant-a", "doc")
    other_tenant = Node("tenant-b", "doc")  # same text, same parent position, other tenant
    other_segment = Node("tenant-a", "another doc")
    child = Node("tenant-a", "doc", parent=other_segment)  # same segment after another parent
    assert _reason(a.payload, other_tenant.expect) == "namespace"
    assert _reason(a.payload, other_segment.expect) == "key"
    assert _reason(a.payload, child.expect) == "key"


def test_another_fingerprint_or_layout_or_token_ids_are_refused():
    node = Node("t", "doc")
    same_ns_other_fp = CacheKey(node.key.namespace, FP_OTHER, node.key.parent_chain,
                                node.key.segment_digest, node.key.chain)
    assert _reason(node.payload, Expected(same_ns_other_fp, LAYOUT, node.tokens)) == "fingerprint"
    other_model = Node("t", "doc", fp=FP_OTHER)  # its namespace differs too
    assert _reason(node.payload, other_model.expect) == "namespace"
    assert _reason(node.payload, Expected(node.key, "kv2:other", node.tokens)) == "layout"
    assert _reason(node.payload, Expected(node.key, LAYOUT, token_digest([1, 2, 3]))) == "token_digest"
    # A kept reply's ids are not in the next prompt: no token digest to compare, n_tokens from the payload.
    assert decode(node.payload, Expected(node.key, LAYOUT, None)).n_tokens == len(node.ids)


def test_another_nodes_kv_relabelled_with_this_key_is_refused_by_its_token_digest():
    a, b = Node("t", "doc a"), Node("t", "doc b", seed=1)
    forged = encode(b.key, a.kv, a.tokens, LAYOUT)  # a's KV relabelled as b: only b's token digest can stop it
    assert _reason(forged, b.expect) == "token_digest"


def test_cache_key_must_follow_from_its_parts():
    node = Node("t", "doc")
    with pytest.raises(ValueError, match="chain"):
        CacheKey(node.key.namespace, node.key.fingerprint, node.key.parent_chain,
                 segment_digest("other"), node.key.chain)
    with pytest.raises(ValueError, match="digest"):
        CacheKey("tenant-a", node.key.fingerprint, node.key.parent_chain,
                 node.key.segment_digest, node.key.chain)


def test_kv_data_checks_its_shape_and_size():
    with pytest.raises(ValueError, match="shape"):
        KVData(bytes(16), "float32", (4,))
    with pytest.raises(ValueError, match="size"):
        KVData(bytes(15), "float32", (1, 2, 1, 1, 2))
    with pytest.raises(ValueError, match="dtype"):
        KVData.from_array(np.zeros((1, 2, 1, 1, 2), dtype=np.float64))


def test_the_tiers_import_no_torch():
    code = ("import sys, segcache.kv.tiers, segcache.kv.tiers.redis_tier\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.replace("'", '"')) == []


def test_fingerprint_with_engine_settings_names_another_namespace():
    from segcache.kv.hashing import namespace_digest
    from segcache.kv.tiers.keys import fingerprint_with

    base = Node("t", "x").key.fingerprint
    a = fingerprint_with(base, prefill_chunk=256)
    assert a == fingerprint_with(base, prefill_chunk=256)
    assert len({a, fingerprint_with(base, prefill_chunk=128), fingerprint_with(FP_OTHER, prefill_chunk=256),
                fingerprint_with(base)}) == 4
    assert namespace_digest("t", a) != namespace_digest("t", fingerprint_with(base, prefill_chunk=128))
    with pytest.raises(ValueError):
        fingerprint_with("not a digest", prefill_chunk=256)


def _rebuilt(payload: bytes, edit) -> bytes:
    """``payload`` with its safetensors header passed through ``edit(header) -> header``
    (the tensor bytes kept), re-padded to 8 bytes as safetensors writes it."""
    n = int.from_bytes(payload[:8], "little")
    header = edit(json.loads(payload[8:8 + n]))
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + payload[8 + n:]


def _tensor_edit(**fields):
    def edit(header):
        header["kv"].update(fields)
        return header
    return edit


@pytest.mark.parametrize("name, edit, tail", [
    ("bytes after the tensor", None, b"\0" * 8),
    ("a second tensor", lambda h: h | {"extra": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}, b""),
    ("no tensor", lambda h: {"__metadata__": h["__metadata__"]}, b""),
    ("offsets not from 0", _tensor_edit(data_offsets=[8, 8 + 1536]), b"\0" * 8),
    ("offsets short of the shape", _tensor_edit(data_offsets=[0, 8]), b""),
    ("a float in the shape", _tensor_edit(shape=[2, 2, 3, 4.0, 8]), b""),
    ("a 4-d shape", _tensor_edit(shape=[4, 3, 4, 8]), b""),
    ("n_tokens differing from the shape", _tensor_edit(shape=[2, 2, 3, 2, 16]), b""),
    ("a dtype the header does not name", _tensor_edit(dtype="F16", shape=[2, 2, 3, 4, 16]), b""),
    ("an unknown dtype", _tensor_edit(dtype="I64"), b""),
    ("a list as dtype", _tensor_edit(dtype=["F32"]), b""),
])
def test_a_header_safetensors_would_refuse_or_that_misdescribes_the_kv_is_malformed(name, edit, tail):
    """``decode`` reads the tensor in place (no ``safetensors.deserialize``): it refuses
    every header that library refuses and every one that does not describe our one tensor."""
    node = Node("t", "x", n_tokens=4)  # [2, 2, 3, 4, 8] float32: 1536 bytes
    data = (node.payload if edit is None else _rebuilt(node.payload, edit)) + tail
    assert _reason(data, node.expect) == "malformed", name
    try:
        tensors = dict(safetensors.deserialize(data))
    except Exception:  # refused by safetensors too
        return
    t = tensors.get("kv")  # read by safetensors, but not as the one KV tensor the header names
    assert len(tensors) != 1 or t is None or t["dtype"] != "F32" or t["shape"] != [2, 2, 3, 4, 8]


def test_the_kv_is_a_view_of_the_buffer_it_was_read_into_and_readable_by_safetensors():
    node = Node("t", "x", n_tokens=6)
    buffer = bytearray(node.payload)
    kv = decode(buffer, node.expect)
    view = memoryview(kv.data)
    assert not view.readonly and np.array_equal(kv.array(), node.array)
    view[0] ^= 1  # the same memory: no copy was made
    n = int.from_bytes(node.payload[:8], "little")
    assert buffer[8 + n] == node.payload[8 + n] ^ 1
    (name, tensor), = safetensors.deserialize(node.payload)  # still a plain safetensors file
    assert name == "kv" and tensor["data"] == node.kv.array().tobytes()


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_a_damaged_payload_is_refused_or_yields_exactly_the_original_kv(data):
    """Any flipped bytes, anywhere (header, key, checksum, tensor), or a cut: ``decode``
    raises PayloadRejected (never another error) or returns the original KV bit for
    bit (a flip in the header's padding changes nothing that is read)."""
    node = _DAMAGE_NODE
    payload = bytearray(node.payload)
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(payload) - 1))
        payload[i] ^= data.draw(st.integers(1, 255))
    if data.draw(st.booleans()):
        payload = payload[:data.draw(st.integers(0, len(payload)))]
    try:
        kv = decode(payload, node.expect)
    except PayloadRejected:
        return
    assert kv.dtype == "float32" and np.array_equal(kv.array(), node.array)


_DAMAGE_NODE = Node("t", "damage", n_tokens=3)
