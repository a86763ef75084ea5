"""``segcache`` command line: serve, generate, bench, prepare.

Most flags are generated from the fields of ``segcache.config`` that declare one
(``add_config_options``, ``config_from_args``); environment variables exist only where a
deployment needs them, are read by ``config.read_environment`` alone and are
listed in ``segcache --help`` (and by the flags they stand for).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
from pathlib import Path

from segcache.config import (
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


_READERS = {"size": _size, "positive": _positive, "int": int, "float": float, "path": Path, "str": str}


def _format_size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def _shown(spec, value) -> str:
    """A flag's default as ``--help`` says it."""
    if spec.shown is not None:
        return spec.shown
    if value is None:
        return "none"
    if spec.kind == "size":
        return _format_size(value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def add_config_options(group, cls: type, include: tuple[str, ...] | None = None,
                       exclude: tuple[str, ...] = (), choices: dict[str, tuple] | None = None) -> None:
    """One option per field of the config dataclass ``cls`` that declares a flag
    (``config.flag``), in declaration order (only ``include`` if given, never
    ``exclude``): its dest is the field's name, its default the field's (or the
    environment's, ``Flag.env``), its help the field's with "(default: ...)".
    ``choices``: field name -> allowed values known only above config (routing
    policies)."""
    env = read_environment()
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("flag")
        if spec is None or (include is not None and f.name not in include) or f.name in exclude:
            continue
        if spec.env is not None:
            value = getattr(env, spec.env)
        else:
            value = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if value is not None and spec.scale != 1:
            value = value * spec.scale
        reader = _READERS[spec.kind] if spec.kind else type(value)
        metavar = spec.metavar or ("BYTES" if spec.kind == "size" else
                                   None if spec.choices else spec.name.lstrip("-").upper().replace("-", "_"))
        kwargs = dict(dest=f.name, default=value, metavar=metavar,
                      choices=(choices or {}).get(f.name, spec.choices),
                      help=f"{spec.help} (default: {_shown(spec, value)})".replace("%", "%%"))
        if spec.many:
            kwargs["nargs"] = "+"
        group.add_argument(spec.name, type=reader, **kwargs)


def config_from_args(cls: type, args: argparse.Namespace, **given):
    """``cls`` built from the options ``add_config_options`` added (fields whose flag
    this command does not have keep their defaults), plus ``given``."""
    values = {}
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("flag")
        if spec is None or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if value is not None and spec.scale != 1:
            value = value / spec.scale
        values[f.name] = tuple(value) if spec.many else value
    return cls(**values, **given)


TIER_FIELDS = ("disk_cache_dir", "disk_bytes", "redis_url", "redis_ttl_s")


def add_model_args(p: argparse.ArgumentParser) -> None:
    add_config_options(p.add_argument_group("model"), ModelConfig)


def add_tier_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "cache tiers", "Below the RAM cache: KV evicted from RAM (and every node at insert) is "
        "written to disk and/or Redis, behind the request; a prompt missing from RAM is looked up "
        "there. At rest each entry is the KV of one segment in a safetensors file with a header of "
        "digests only (tenant namespace, model fingerprint, chain, token-id digest, checksum): no "
        "prompt text and no token ids are stored. An entry is served only under its own tenant and "
        "model fingerprint, with an intact checksum; anything else is deleted and recomputed.")
    add_config_options(g, CacheConfig, include=TIER_FIELDS)


def model_config(args: argparse.Namespace) -> ModelConfig:
    return config_from_args(ModelConfig, args)


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
    server = serve.add_argument_group("server")
    add_config_options(server, ServerConfig, exclude=("max_request_bytes",))
    server.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                        help="model id shown by /v1/models and in responses; further names are "
                             "aliases requests may use (default: the model's name; any other "
                             "'model' is a 404)")
    add_config_options(server, ServerConfig, include=("max_request_bytes",))
    add_config_options(serve.add_argument_group("cache"), CacheConfig, exclude=TIER_FIELDS)
    add_tier_args(serve)
    add_config_options(serve.add_argument_group("scheduler"), SchedulerConfig)
    scale = serve.add_argument_group("scale-out")
    add_config_options(scale, DeployConfig, include=("replicas", "ray_address", "routing"),
                       choices={"routing": POLICIES})
    scale.add_argument("--cpus-per-replica", type=float, default=1.0, metavar="N",
                       help="with --replicas: cores (and threads) each replica gets to itself "
                            "(default: %(default)s)")
    add_config_options(scale, DeployConfig, exclude=("replicas", "ray_address", "routing"))
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
    names = getattr(args, "served_model_name", None) or [None]
    server = config_from_args(ServerConfig, args, model_name=names[0], model_aliases=tuple(names[1:]))
    memo = getattr(args, "memo_bytes", CacheConfig.memo_bytes)
    cache = config_from_args(CacheConfig, args, tenant_memo_bytes=memo // 4)
    return Config(model=model_config(args), cache=cache,
                  scheduler=config_from_args(SchedulerConfig, args), server=server,
                  deploy=config_from_args(DeployConfig, args))


def cmd_generate(args: argparse.Namespace) -> int:
    from segcache.engine.engine import Engine
    from segcache.engine.types import ChatRequest, SamplingParams

    engine = Engine.load(_config(args))
    engine.hand_over_threads()  # the engine thread runs the model (see cmd_serve)
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

    model = model_config(args)
    resolved = resolve_model(model.path, model.cache_dir)
    print(f"model ready: {resolved.directory}")
    from segcache.model.kernels import probe_kernels

    probe = probe_kernels(Path(model.cache_dir) / "kernels")
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
    # The engine thread runs the model from here on: the main thread's OpenMP team, started
    # while loading, would make two, and libgomp then throttles every team's waits.
    engine.hand_over_threads()
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
