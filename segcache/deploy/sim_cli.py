"""``segcache route simulate``: arguments, the grid of runs, the table and the JSON.

The trace (a bench workload or a request log) is read by the CLI layer, which
hands this module ``(tenant, chat body)`` pairs in arrival order.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from segcache.deploy.chain import CHARS_PER_TOKEN, request_chain, simulated_namespace
from segcache.deploy.routing import POLICIES
from segcache.deploy.simulate import SimResult, simulate


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _policy_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in POLICIES]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"policies must be among {', '.join(POLICIES)}, got {text!r}")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("trace", metavar="TRACE[,TRACE...]",
                   help="bench workloads (multi-agent, agent-loop, fan-out, repo-docs) or JSONL request "
                        "logs ('serve --request-log', or what 'segcache lint' reads), comma-separated")
    p.add_argument("--replicas", type=_int_list, default=[4], metavar="N[,N...]",
                   help="replica counts to simulate (default: 4)")
    p.add_argument("--policy", type=_policy_list, default=["prefix"], metavar="P[,P...]",
                   help=f"routing policies among {', '.join(POLICIES)} (default: prefix)")
    p.add_argument("--cache-tokens", type=int, default=16384, metavar="N",
                   help="KV cache of one replica in tokens; 0 = unbounded (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=0, metavar="K",
                   help="requests in flight fleet-wide: a request completes when K later ones have "
                        "arrived; 0 = none completes, load is all work sent (default: 0)")
    p.add_argument("--balance", type=float, default=1.25,
                   help="prefix policy: a replica may take a request while its load stays within "
                        "BALANCE x the mean load (+ slack) (default: %(default)s)")
    p.add_argument("--slack-tokens", type=int, default=512,
                   help="prefix policy: tokens of load allowed above the bound (default: %(default)s)")
    p.add_argument("--idle-factor", type=float, default=2.0,
                   help="prefix policy: while a replica holding none of a request is idle, a replica "
                        "holding part of it keeps it if it finishes within IDLE_FACTOR x the idle "
                        "replica's time (default: %(default)s)")
    p.add_argument("--chars-per-token", type=float, default=CHARS_PER_TOKEN,
                   help="token estimate of the router (no tokenizer) (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="workload seed (default: 0)")
    p.add_argument("--turns", type=int, default=None, help="workload turns (default: the workload's)")
    p.add_argument("--agents", type=int, default=8, help="fan-out: agents (default: 8)")
    p.add_argument("--copies", type=int, default=1, metavar="K",
                   help="workload: K independent copies (seeds SEED..SEED+K-1, distinct tenants), "
                        "interleaved request by request: a fleet serving K teams (default: 1)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the results as JSON")


def run_grid(bodies: list[tuple[str, dict[str, Any]]], args: argparse.Namespace,
             trace: str = "") -> list[SimResult]:
    keys = [request_chain(body, simulated_namespace(tenant), args.chars_per_token) for tenant, body in bodies]
    cache = args.cache_tokens or None
    results = []
    for n in args.replicas:
        for policy in args.policy:
            params = ({"balance": args.balance, "slack_tokens": args.slack_tokens, "idle_factor": args.idle_factor}
                      if policy == "prefix" else {})
            results.append(simulate(keys, n, policy, cache, args.concurrency, trace=trace, **params))
    return results


def format_table(results: list[SimResult]) -> str:
    head = f"{'trace':<14} {'replicas':>8}  {'policy':<12} {'requests':>8} {'prompt tok':>11} " \
           f"{'hit rate':>8} {'1-replica':>9} {'vs 1':>6} {'max/mean':>8}"
    lines = [head, "-" * len(head)]
    for r in results:
        vs = "-" if r.hit_rate_vs_single is None else f"{r.hit_rate_vs_single:.1%}"
        mm = "-" if r.max_mean_load is None else f"{r.max_mean_load:.2f}"
        lines.append(f"{r.trace[:14]:<14} {r.replicas:>8}  {r.policy:<12} {r.requests:>8} {r.prompt_tokens:>11} "
                     f"{r.hit_rate:>8.1%} {r.single_hit_rate:>9.1%} {vs:>6} {mm:>8}")
    return "\n".join(lines)


def run(traces: list[tuple[str, str, list[tuple[str, dict[str, Any]]]]], args: argparse.Namespace) -> int:
    """``traces``: (name, description, (tenant, body) pairs) per trace, simulated in turn."""
    results = []
    for name, source, bodies in traces:
        if not bodies:
            print(f"segcache route simulate: no chat requests in {source}")
            return 2
        print(f"trace {name}: {source}, {len(bodies)} requests")
        results += run_grid(bodies, args, name)
    print(f"cache {args.cache_tokens or 'unbounded'} tokens per replica; load = tokens computed "
          f"(prefill misses + decode budget); 'vs 1' = hit rate / that of one replica with the "
          f"whole fleet's cache")
    print(format_table(results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = {"traces": {name: source for name, source, _ in traces}, "cache_tokens": args.cache_tokens,
               "concurrency": args.concurrency, "balance": args.balance, "slack_tokens": args.slack_tokens,
               "idle_factor": args.idle_factor, "copies": args.copies, "seed": args.seed,
               "results": [r.row() for r in results]}
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0
