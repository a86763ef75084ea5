"""Arguments and entry points of ``segcache bench WORKLOAD`` and ``segcache bench compare``.

The top-level CLI wires these in with::

    add_workload_parsers(bench_subparsers)   # one sub-command per workload + compare
    ...
    return run(args)                          # dispatches on args.bench_action

``python -m segcache.bench ...`` runs the same commands on their own.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import os
import platform
import sys
from dataclasses import asdict

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from segcache.bench import report
from segcache.bench.metrics import Pricing, RequestRecord, summarize
from segcache.bench.repo_docs import LAYOUTS
from segcache.bench.runner import (
    COLD_STRATEGIES,
    MODES,
    Runner,
    Target,
    run_cold_vs_warm,
    run_requests,
)
from segcache.bench.workloads import (
    CHARS_PER_TOKEN,
    DEFAULT_TURNS,
    REUSE,
    WORKLOADS,
    MultiAgentSizes,
    WorkloadOptions,
    default_concurrency,
    reusable_share,
)


def add_field_options(group, defaults: type, helps: dict[str, str]) -> None:
    """One ``--field-name`` option per entry of ``helps`` (field name -> help text), whose
    default and type are those of the field's default in the dataclass ``defaults`` (int,
    float or str fields); the dest is the field name, the help ends in "(default: ...)"."""
    for name, text in helps.items():
        default = getattr(defaults, name)
        group.add_argument("--" + name.replace("_", "-"), type=type(default), default=default,
                           help=f"{text} (default: %(default)s)")


def add_workload_arguments(parser: argparse.ArgumentParser, workload: str | None = None) -> None:
    """Flags of a workload run; ``workload`` becomes ``args.workload`` when given."""
    if workload is not None:
        parser.set_defaults(workload=workload, bench_action="workload")
    g = parser.add_argument_group("server")
    g.add_argument("--url", default="http://127.0.0.1:8000/v1", help="OpenAI base URL (default: %(default)s)")
    g.add_argument("--api-key", default=None, help="bearer key, if the server wants one")
    g.add_argument("--model", default=None, help="model id (default: the first of GET /models)")
    g.add_argument("--mode", choices=MODES, default="segments",
                   help="segments: send segments[]; flat: segments joined into the system message, "
                        "for servers without the extension (default: %(default)s)")
    g.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default: %(default)s)")
    g = parser.add_argument_group("workload")
    g.add_argument("--seed", type=int, default=0, help="picks the text (default: %(default)s)")
    g.add_argument("--turns", type=int, default=None,
                   help="turns per agent (default: multi-agent 3, agent-loop 10, repo-docs and fan-out 1)")
    g.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request (default: %(default)s)")
    add_field_options(g, MultiAgentSizes, {
        "global_tokens": "block A: global rules + tool schemas",
        "agent_tokens": "blocks B/C: agent skills, project memory",
        "task_tokens": "blocks D/E: task context",
    })
    add_field_options(g, WorkloadOptions, {
        "agents": "fan-out: agents sent at once",
        "objects": "repo-docs: functions documented",
        "code_tokens": "repo-docs: most tokens of one code block",
    })
    g.add_argument("--layout", choices=LAYOUTS, default=WorkloadOptions.layout,
                   help="repo-docs: repoagent = RepoAgent's template, a short fixed instruction then the "
                        "object's parts, so little is a shared prefix and the structure and code blocks "
                        "recur at other positions; careful = instructions and project structure first "
                        "(~1,150 tokens), the layout a prefix cache likes (default: %(default)s)")
    g.add_argument("--reuse", choices=REUSE, default=WorkloadOptions.reuse,
                   help='repo-docs, --mode segments: send the recurring blocks (code, project structure) '
                        'with "reuse": "anywhere", for a server that blends them where they stand; none: '
                        "no marker (default: %(default)s)")
    g.add_argument("--chars-per-token", type=float, default=CHARS_PER_TOKEN,
                   help="turns token sizes into text lengths (default: %(default)s, SmolLM2 on this text)")
    g = parser.add_argument_group("run")
    g.add_argument("--concurrency", type=int, default=None,
                   help="requests in flight (default: fan-out --agents, others 1)")
    g.add_argument("--cold-vs-warm", action="store_true",
                   help="send each request cold (nothing cached), then again warm; TTFT side by side")
    g.add_argument("--cold", choices=COLD_STRATEGIES, default="auto",
                   help="how to make a request cold: purge (DELETE /v1/cache), nonce (a fresh marker "
                        "in front of the prompt, any server), auto (purge where allowed) (default: auto)")
    g.add_argument("--repeat-cold", action="store_true",
                   help="every request cold: the workload with the cache disabled in effect. Sequential "
                        "runs purge before each request (--cold nonce: a fresh nonce instead); "
                        "concurrent runs put a fresh nonce in front of each request")
    g.add_argument("--keep-cache", action="store_true",
                   help="do not purge the server's cache before the run (default: purge where allowed)")
    g = parser.add_argument_group("output and cost (seed 000's pricing model)")
    g.add_argument("--json", metavar="PATH", default=None, help="write every record and aggregate here")
    g.add_argument("--plot", metavar="DIR", default=None, help="PNG plots here (needs matplotlib)")
    g.add_argument("--price-input", type=float, default=Pricing.input_per_mtok,
                   help="$ per 1M input tokens (default: %(default)s)")
    add_field_options(g, Pricing, {
        "cached_discount": "fraction of the price cached tokens save",
        "cache_write_premium": "extra fraction paid on computed (cache-written) tokens",
    })


COMPARE_DESCRIPTION = """\
Ratios B/A of the aggregates of two --json results, phase by phase (with no phase
in common, A's last phase against B's last: e.g. a run against a --repeat-cold run).

Then the output agreement of B with A, request by request (same index and label,
both without error): "same text" is the fraction of requests whose generated
texts are identical; "leading chars" and "leading words" are the mean fraction of
the longer text that the two texts share from their start, in characters and in
whitespace-separated words (a tokenizer-free stand-in for tokens). With A a run
whose cache was purged before each request (--repeat-cold, i.e. full prefill) and
B a run that reused KV (prefix hits, blending), it says how far reuse changed the
outputs (at temperature 0, which the runner always uses)."""


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(bench_action="compare")
    parser.add_argument("a", help="result JSON, the reference for agreement (e.g. --repeat-cold)")
    parser.add_argument("b", help="result JSON (e.g. blending, or a peer server); ratios are B/A")


def add_table_arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(bench_action="table")
    parser.add_argument("results", nargs="+", metavar="LABEL=PATH",
                        help="--json results; ratios, and output agreement (same text / leading "
                             "characters, as in 'compare'), are against the first")
    parser.add_argument("--title", default=None, help="table title")
    parser.add_argument("--markdown", action="store_true", help="a Markdown table instead")
    parser.add_argument("--plot", metavar="DIR", default=None,
                        help="TTFT per request of every result on one PNG here")


def add_workload_parsers(subparsers) -> None:
    """One sub-command per workload (``multi-agent``, ``agent-loop``, ``repo-docs``,
    ``fan-out``), ``compare`` and ``table``."""
    for name, build in WORKLOADS.items():
        doc = inspect.cleandoc(build.__doc__ or "")
        p = subparsers.add_parser(name, help=doc.split("\n")[0], description=doc,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        add_workload_arguments(p, name)
    add_compare_arguments(subparsers.add_parser(
        "compare", help="ratios between two --json results and the agreement of their outputs",
        description=COMPARE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter))
    add_table_arguments(subparsers.add_parser(
        "table", help="several --json results side by side, with ratios against the first"))


def run(args: argparse.Namespace) -> int:
    action = getattr(args, "bench_action", None)
    if action == "compare":
        return run_compare(args)
    if action == "table":
        return run_table(args)
    return run_workload(args)


def _unreadable(exc: report.UnreadableResult) -> int:
    print(f"segcache bench: {exc} (a --json file of segcache bench)", file=sys.stderr)
    return 2


def run_compare(args: argparse.Namespace) -> int:
    try:
        report.compare(args.a, args.b)
    except report.UnreadableResult as exc:
        return _unreadable(exc)
    return 0


def run_table(args: argparse.Namespace) -> int:
    results = {}
    for item in args.results:
        label, sep, path = item.rpartition("=")  # the label may hold "=", a path rarely does
        if not sep:
            label, path = item, item
        try:
            results[label] = report.load_json(path)
        except report.UnreadableResult as exc:
            return _unreadable(exc)
    report.results_table(results, args.title, args.markdown)
    if args.plot:
        for path in report.plot_results(results, args.plot, args.title or "TTFT per request"):
            Console().print(f"wrote {path}")
    return 0


def workload_options(args: argparse.Namespace) -> WorkloadOptions:
    """Options from the flags, with the workload's own defaults where a flag is unset
    (``args.turns`` and ``args.concurrency`` are filled in)."""
    sizes = MultiAgentSizes(args.global_tokens, args.agent_tokens, args.task_tokens)
    if args.turns is None:
        args.turns = DEFAULT_TURNS.get(args.workload, 3)
    opts = WorkloadOptions(seed=args.seed, turns=args.turns, max_tokens=args.max_tokens,
                           chars_per_token=args.chars_per_token, sizes=sizes, agents=args.agents,
                           objects=args.objects, code_tokens=args.code_tokens, layout=args.layout,
                           reuse=args.reuse)
    if args.concurrency is None:
        args.concurrency = default_concurrency(args.workload, opts)
    return opts


def run_workload(args: argparse.Namespace) -> int:
    """Build the workload, run it, print the tables; 1 if any request failed."""
    console, err = Console(), Console(stderr=True)
    requests = WORKLOADS[args.workload](workload_options(args))
    args.reusable_share = reusable_share(requests)
    pricing = Pricing(args.price_input, args.cached_discount, args.cache_write_premium)
    runner = Runner(Target(url=args.url, api_key=args.api_key, model=args.model, mode=args.mode,
                           timeout_s=args.timeout))
    try:
        records, wall_s = _execute(runner, requests, args, err)
    finally:
        runner.close()
    summary = {phase: summarize(rs, _phase_wall(rs, wall_s, args), pricing)
               for phase, rs in _by_phase(records).items()}
    result = report.result_dict(_meta(args, runner, pricing), summary, records)
    report.print_run(result, records, console)
    warm = [r for r in records if r.phase == "cold" and (r.cached_tokens or r.blended_tokens)]
    if warm:
        err.print(f"[yellow]{len(warm)} cold request(s) still reused KV (cached or blended tokens > 0): "
                  "the purge or nonce did not make them cold[/yellow]")
    if args.json:
        report.write_json(args.json, result)
        console.print(f"wrote {args.json}")
    if args.plot:
        for path in report.plot(result, args.plot, console):
            console.print(f"wrote {path}")
    return 1 if any(r.error for r in records) else 0


def _execute(runner: Runner, requests, args: argparse.Namespace, err: Console):
    sends = len(requests) * (2 if args.cold_vs_warm else 1)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, transient=True) as progress:
        task = progress.add_task(f"{args.workload} ({args.mode})", total=sends)

        def on_done(rec: RequestRecord) -> None:
            progress.update(task, advance=1, description=f"{rec.label} {rec.phase}")

        if args.cold_vs_warm:
            return run_cold_vs_warm(runner, requests, args.cold, on_done)
        if not args.keep_cache and not args.repeat_cold and not runner.purge():
            err.print("[yellow]server has no DELETE /cache: the run starts with whatever it holds[/yellow]")
        cold_each = None
        if args.repeat_cold:
            cold_each = "nonce" if args.concurrency > 1 or args.cold == "nonce" else "purge"
        return run_requests(runner, requests, args.concurrency, on_done, cold_each=cold_each)


def _by_phase(records: list[RequestRecord]) -> dict[str, list[RequestRecord]]:
    phases: dict[str, list[RequestRecord]] = {}
    for r in records:
        phases.setdefault(r.phase, []).append(r)
    return phases


def _phase_wall(records: list[RequestRecord], wall_s: float, args: argparse.Namespace) -> float:
    # Interleaved cold/warm phases share the wall clock; each is charged its own requests' time.
    return sum(r.e2e_s or 0 for r in records) if args.cold_vs_warm else wall_s


def _meta(args: argparse.Namespace, runner: Runner, pricing: Pricing) -> dict:
    return {
        "workload": args.workload, "mode": args.mode, "url": args.url, "model": runner.model,
        "seed": args.seed, "turns": args.turns, "max_tokens": args.max_tokens,
        "agents": args.agents, "objects": args.objects, "code_tokens": args.code_tokens,
        "layout": args.layout, "reuse": args.reuse, "reusable_share": args.reusable_share,
        "sizes_tokens": [args.global_tokens, args.agent_tokens, args.task_tokens],
        "chars_per_token": args.chars_per_token, "concurrency": args.concurrency,
        "cold_vs_warm": args.cold_vs_warm, "cold": args.cold, "repeat_cold": args.repeat_cold,
        "pricing": asdict(pricing),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.system()} {platform.release()}, {os.cpu_count()} cpus",
        "python": platform.python_version(),
        "argv": sys.argv,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m segcache.bench",
                                     description="Workloads against an OpenAI-compatible server.")
    add_workload_parsers(parser.add_subparsers(dest="bench_command", metavar="WORKLOAD", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))
