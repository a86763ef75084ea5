"""``segcache bench tiers``: one full hit served from RAM, from disk after a restart,
and from Redis on a second server, against the cold TTFT of the same request.

The bench starts its own servers (``segcache serve`` subprocesses, so it can
restart them; ``--serve-args`` are passed through) and talks to them over HTTP
only. The request: a ~``--prompt-tokens`` compliance guide cut into
``--segments`` segments, then one user message, generating ``--max-tokens`` at
temperature 0. Each figure is the median of ``--repeat`` runs:

    cold    server A (--disk-cache DIR_A, --redis-url), its tenant purged on
            every tier before each run (DELETE /v1/cache): a full prefill
    ram     the same request again on A: every segment a RAM hit
    disk    A restarted on DIR_A (RAM empty, page cache as it falls): every
            segment loaded from disk
    redis   server B (no disk, the same Redis), restarted before each run:
            every segment loaded from Redis

Also reported: the speed-ups against cold, the disk hit against the RAM hit, and
the KV load rate of each lower tier (payload bytes it served over the seconds
its loads took: ``load_bytes / load_s`` of ``GET /v1/cache``).

With ``--multi-agent`` also seed 000's multi-agent workload (``segcache bench
multi-agent``'s requests, default sizes) on a server restarted on the warm disk
of an earlier run of it, against a server restarted on an empty disk: TTFT sum
and median of each. Redis: ``--redis-url``, or a
``redis-server`` from PATH started on a free port in a temporary folder.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from segcache.bench.cli import add_field_options
from segcache.bench.metrics import RequestRecord
from segcache.bench.runner import Runner, Target, run_requests
from segcache.bench.workloads import (
    CHARS_PER_TOKEN,
    BenchRequest,
    MultiAgentSizes,
    WorkloadOptions,
    multi_agent,
)

PHASES = ("cold", "ram", "disk", "redis")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-tokens", type=int, default=3600, help="prompt size (default: %(default)s)")
    p.add_argument("--segments", type=int, default=4, help="segments the prompt is cut into (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=8, help="tokens generated (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=3, help="runs per phase, the median reported (default: %(default)s)")
    p.add_argument("--serve-args", default="", metavar="ARGS",
                   help='extra flags for every segcache serve, e.g. "--dtype bfloat16" (default: none)')
    p.add_argument("--redis-url", default=None,
                   help="a Redis to use (default: start redis-server from PATH on a free port)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="disk caches and logs here (default: a temporary folder, deleted after)")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds a server may take to start")
    p.add_argument("--multi-agent", action="store_true",
                   help="also the multi-agent workload after a restart: warm disk against empty disk")
    p.add_argument("--turns", type=int, default=3, help="--multi-agent: turns per agent (default: %(default)s)")
    add_field_options(p, MultiAgentSizes, {
        "global_tokens": "--multi-agent: block A, global rules + tool schemas",
        "agent_tokens": "--multi-agent: blocks B/C, agent skills",
        "task_tokens": "--multi-agent: blocks D/E, task context",
    })
    p.add_argument("--json", type=Path, default=None, help="write the figures and every run here")


@dataclass
class Phase:
    name: str
    runs: list[RequestRecord] = field(default_factory=list)
    load_bytes: int = 0  # KV bytes the phase's tier served
    load_s: float = 0.0  # seconds its loads took

    @property
    def ttft_s(self) -> float | None:
        values = [r.ttft_s for r in self.runs if r.ttft_s is not None]
        return statistics.median(values) if values else None

    @property
    def tiers(self) -> list[str]:
        """The tiers the segments of the runs came from (None: computed)."""
        return sorted({str(s.get("tier")) for r in self.runs for s in (r.segments or [])
                       if s.get("kind") == "segment"})

    @property
    def load_gb_s(self) -> float | None:
        return self.load_bytes / self.load_s / 1e9 if self.load_s > 0 else None


def bench_request(prompt_tokens: int, n_segments: int, max_tokens: int) -> BenchRequest:
    """The one request every phase sends: a deterministic guide cut into segments."""
    lines, i = [], 0
    while sum(len(x) + 1 for x in lines) < prompt_tokens * CHARS_PER_TOKEN:
        lines.append(f"Rule {i}: changes under service_{i % 41} need a review by team {i % 13} and a "
                     f"note in release {i % 7}.")
        i += 1
    per = -(-len(lines) // max(1, n_segments))
    segments = [(f"guide-{k}", "\n".join(lines[k * per:(k + 1) * per])) for k in range(n_segments)
                if lines[k * per:(k + 1) * per]]
    return BenchRequest("tiers", 0, 0, segments,
                        [{"role": "user", "content": "Which rule covers service_7? One line."}], max_tokens)


class Server:
    """One ``segcache serve`` subprocess on a free port."""

    def __init__(self, args: list[str], log: Path, startup_timeout_s: float) -> None:
        self.args, self.log, self.timeout_s = args, log, startup_timeout_s
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> Server:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "segcache.cli", "serve", "--port",
                                          str(self.port), *self.args], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"segcache serve exited ({self.proc.returncode}); see {self.log}")
            try:
                if httpx.get(self.url.removesuffix("/v1") + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"segcache serve did not start in {self.timeout_s:.0f} s; see {self.log}")

    def stop(self) -> None:
        """SIGTERM: running requests finish and queued tier writes are drained."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def tiers(self) -> dict:
        return httpx.get(self.url + "/cache", timeout=30).json().get("tiers", {})

    def settle(self, timeout_s: float = 300.0) -> None:
        """Wait until the write-through of every inserted node has reached every tier."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            t = self.tiers()
            store = t.get("store", {})
            done = [s["puts"] + s["dropped"] + s["errors"] for n, s in t.items() if n != "store"]
            if all(d >= store.get("publishes", 0) - store.get("dropped", 0) for d in done):
                return
            time.sleep(0.1)
        raise RuntimeError("the tier writes did not land")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisProcess:
    """A ``redis-server`` from PATH on a free port (no persistence)."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("no redis-server on PATH: install it (Debian package redis-server) "
                               "or pass --redis-url")
        self.port = free_port()
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
                                      str(workdir), "--save", "", "--appendonly", "no"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def _send(server: Server, req: BenchRequest, phase: str, index: int) -> RequestRecord:
    runner = Runner(Target(url=server.url))
    try:
        rec = runner.send(req, index, phase)
    finally:
        runner.close()
    if rec.error:
        raise RuntimeError(f"{phase} request failed: {rec.error}")
    return rec


def _measure_load(phase: Phase, before: dict, after: dict, tier: str) -> None:
    """Add the bytes and seconds of the loads ``tier`` served between two stats."""
    a, b = before.get(tier, {}), after.get(tier, {})
    phase.load_s += b.get("load_s", 0.0) - a.get("load_s", 0.0)
    phase.load_bytes += b.get("load_bytes", 0) - a.get("load_bytes", 0)


def run_phases(req: BenchRequest, repeat: int, serve_args: list[str], redis_url: str, workdir: Path,
               startup_timeout_s: float) -> dict[str, Phase]:
    phases = {name: Phase(name) for name in PHASES}
    a = Server([*serve_args, "--disk-cache", str(workdir / "disk-a"), "--redis-url", redis_url],
               workdir / "server-a.log", startup_timeout_s).start()
    b = Server([*serve_args, "--redis-url", redis_url], workdir / "server-b.log", startup_timeout_s)
    try:
        for i in range(repeat):
            httpx.delete(a.url + "/cache", timeout=120).raise_for_status()  # every tier of the tenant
            phases["cold"].runs.append(_send(a, req, "cold", i))
            a.settle()
            phases["ram"].runs.append(_send(a, req, "ram", i))
        for i in range(repeat):
            a.restart()
            before = a.tiers()
            phases["disk"].runs.append(_send(a, req, "disk", i))
            _measure_load(phases["disk"], before, a.tiers(), "disk")
        a.stop()
        for i in range(repeat):
            b.restart() if i else b.start()
            before = b.tiers()
            phases["redis"].runs.append(_send(b, req, "redis", i))
            _measure_load(phases["redis"], before, b.tiers(), "redis")
    finally:
        a.stop()
        b.stop()
    return phases


def run_restarts(requests: list[BenchRequest], serve_args: list[str], workdir: Path,
                 startup_timeout_s: float) -> dict[str, list[RequestRecord]]:
    """The workload on a restarted server: over the disk a first run filled ("warm
    disk"), then over an empty disk ("cold restart")."""
    out = {}
    for name, disk in (("warm disk", workdir / "disk-w"), ("cold restart", workdir / "disk-empty")):
        server = Server([*serve_args, "--disk-cache", str(disk)], workdir / "server-w.log",
                        startup_timeout_s).start()
        try:
            if name == "warm disk":
                _run_all(server, requests)
                server.settle()
                server.restart()
            out[name] = _run_all(server, requests)
        finally:
            server.stop()
    return out


def _run_all(server: Server, requests: list[BenchRequest]) -> list[RequestRecord]:
    runner = Runner(Target(url=server.url))
    try:
        records, _ = run_requests(runner, requests)
    finally:
        runner.close()
    failed = [r.error for r in records if r.error]
    if failed:
        raise RuntimeError(f"{len(failed)} request(s) failed: {failed[0]}")
    return records


def restart_summary(runs: dict[str, list[RequestRecord]]) -> dict[str, dict]:
    out = {}
    for name, records in runs.items():
        ttfts = [r.ttft_s for r in records if r.ttft_s is not None]
        out[name] = {"requests": len(records), "ttft_sum_s": sum(ttfts),
                     "ttft_median_s": statistics.median(ttfts) if ttfts else None,
                     "cached_tokens": sum(r.cached_tokens or 0 for r in records),
                     "prompt_tokens": sum(r.prompt_tokens or 0 for r in records)}
    return out


def print_restart_table(figures: dict[str, dict], console: Console) -> None:
    table = Table(title="multi-agent workload after a restart")
    for col in ("restart", "requests", "TTFT sum s", "TTFT median ms", "cached/prompt"):
        table.add_column(col, justify="right")
    for name, f in figures.items():
        table.add_row(name, str(f["requests"]), f"{f['ttft_sum_s']:.2f}", _fmt(f["ttft_median_s"], 1000, "{:.0f}"),
                      f"{f['cached_tokens']}/{f['prompt_tokens']}")
    console.print(table)


def summary(phases: dict[str, Phase]) -> dict[str, dict]:
    cold, ram = phases["cold"].ttft_s, phases["ram"].ttft_s
    out = {}
    for name, p in phases.items():
        ttft = p.ttft_s
        out[name] = {
            "ttft_s": ttft, "runs": len(p.runs), "tiers": p.tiers,
            "cached_tokens": statistics.median([r.cached_tokens or 0 for r in p.runs]) if p.runs else None,
            "prompt_tokens": p.runs[0].prompt_tokens if p.runs else None,
            "speedup_vs_cold": cold / ttft if cold and ttft else None,
            "vs_ram": ttft / ram if ram and ttft else None,
            "load_gb_s": p.load_gb_s,
        }
    return out


def print_table(figures: dict[str, dict], console: Console) -> None:
    table = Table(title="one full hit by tier (TTFT, median of the runs)")
    for col in ("from", "TTFT ms", "cold/this", "this/RAM", "cached/prompt", "tiers", "load GB/s"):
        table.add_column(col, justify="right")
    for name, f in figures.items():
        table.add_row(name, _fmt(f["ttft_s"], 1000, "{:.0f}"), _fmt(f["speedup_vs_cold"], 1, "{:.1f}"),
                      _fmt(f["vs_ram"], 1, "{:.2f}"), f"{f['cached_tokens']}/{f['prompt_tokens']}",
                      ",".join(f["tiers"]), _fmt(f["load_gb_s"], 1, "{:.2f}"))
    console.print(table)


def _fmt(value: float | None, scale: float, pattern: str) -> str:
    return "-" if value is None else pattern.format(value * scale)


def run(args: argparse.Namespace) -> int:
    console = Console()
    req = bench_request(args.prompt_tokens, args.segments, args.max_tokens)
    with ExitStack() as stack:
        workdir = args.workdir
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="segcache-bench-tiers-")))
        workdir.mkdir(parents=True, exist_ok=True)
        redis_url = args.redis_url
        if redis_url is None:
            redis = RedisProcess(workdir)
            stack.callback(redis.stop)
            redis_url = redis.url
        phases = run_phases(req, args.repeat, shlex.split(args.serve_args), redis_url, workdir,
                            args.startup_timeout)
        restarts = {}
        if args.multi_agent:
            sizes = MultiAgentSizes(args.global_tokens, args.agent_tokens, args.task_tokens)
            requests = multi_agent(WorkloadOptions(turns=args.turns, max_tokens=args.max_tokens, sizes=sizes))
            restarts = run_restarts(requests, shlex.split(args.serve_args), workdir, args.startup_timeout)
    figures = summary(phases)
    print_table(figures, console)
    restart_figures = restart_summary(restarts)
    if restarts:
        print_restart_table(restart_figures, console)
    if args.json:
        result = {"meta": _meta(args), "figures": figures, "restarts": restart_figures,
                  "runs": {name: [asdict(r) for r in p.runs] for name, p in phases.items()},
                  "restart_runs": {name: [asdict(r) for r in rs] for name, rs in restarts.items()}}
        args.json.write_text(json.dumps(result, indent=2))
        console.print(f"wrote {args.json}")
    return 0


def _meta(args: argparse.Namespace) -> dict:
    return {"bench": "tiers", "prompt_tokens": args.prompt_tokens, "segments": args.segments,
            "max_tokens": args.max_tokens, "repeat": args.repeat, "serve_args": args.serve_args,
            "multi_agent": args.multi_agent, "turns": args.turns,
            "sizes_tokens": [args.global_tokens, args.agent_tokens, args.task_tokens],
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {platform.system()} {platform.release()}, {os.cpu_count()} cpus",
            "python": platform.python_version(), "argv": sys.argv}
