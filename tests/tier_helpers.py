"""What the cache-tier tests share: keys, KV arrays, payloads and a real redis-server."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np

from segcache.kv.hashing import namespace_digest, segment_digest
from segcache.kv.tiers import CacheKey, Expected, KVData, encode, token_digest

LAYOUT = "kv1:[layers,2,kv_heads,tokens,head_dim]:k-after-rope"
FP = "sha256:" + "f" * 64  # a model fingerprint
FP_OTHER = "sha256:" + "e" * 64  # another model fingerprint (changed weights, dtype, kernels...)


def kv_array(n_tokens: int, seed: int = 0, n_layers: int = 2, heads: int = 3, head_dim: int = 8) -> np.ndarray:
    """Random KV ``[n_layers, 2, n_kv_heads, n_tokens, head_dim]`` in float32."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n_layers, 2, heads, n_tokens, head_dim), dtype=np.float32)


def ids_for(n_tokens: int, seed: int = 0) -> list[int]:
    return [(seed * 7919 + i * 31) % 49152 for i in range(n_tokens)]


class Node:
    """One cache entry as the engine would describe it: key, ids, KV, payload."""

    def __init__(self, tenant: str, text: str, parent: Node | None = None, fp: str = FP,
                 n_tokens: int = 4, seed: int = 0, **shape) -> None:
        self.ns = namespace_digest(tenant, fp)
        parent_chain = parent.key.chain if parent is not None else self.ns
        self.key = CacheKey.child(self.ns, fp, parent_chain, segment_digest(text))
        self.ids = ids_for(n_tokens, seed)
        self.array = kv_array(n_tokens, seed, **shape)
        self.kv = KVData.from_array(self.array)
        self.tokens = token_digest(self.ids)
        self.payload = encode(self.key, self.kv, self.tokens, LAYOUT)

    @property
    def expect(self) -> Expected:
        return Expected(self.key, LAYOUT, self.tokens)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A real redis-server on a free port, data in ``workdir`` (RDB saved on ``stop``)."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH: run `make system-deps` (Debian package "
                               "redis-server)")
        self.binary, self.workdir, self.port = binary, workdir, free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
             "--save", "", "--appendonly", "no", "--protected-mode", "no", "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        """SHUTDOWN SAVE: the data comes back on ``start`` (the RDB is in ``workdir``)."""
        if self.proc is None:
            return
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                s.sendall(b"SHUTDOWN SAVE\r\n")
                s.recv(16)
        except OSError:
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
