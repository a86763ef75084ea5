"""Show and store benchmark results: rich tables, JSON files, comparisons, plots.

A result file (``--json``) is ``{"meta": {...}, "summary": {phase: {...}},
"records": [...]}``; ``compare`` reads two of them. Plots need matplotlib,
which is optional: without it ``plot`` says so and returns.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from segcache.bench.metrics import RequestRecord


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:,.0f}"


def _int(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _segment_marks(rec: RequestRecord) -> str:
    if not rec.segments:
        return ""
    marks = {"hit": "hit", "miss": "miss", "blended": "blend"}
    return " ".join(f"{s.get('id')}:{marks.get(s.get('status'), s.get('status'))}" for s in rec.segments)


def records_table(records: list[RequestRecord], title: str = "requests") -> Table:
    table = Table(title=title)
    for col in ("#", "request", "phase", "prompt", "cached", "hit", "TTFT ms", "ITL ms", "E2E ms", "segments"):
        table.add_column(col, justify="left" if col in ("request", "phase", "segments") else "right")
    for r in records:
        table.add_row(str(r.index + 1), r.label, r.phase, _int(r.prompt_tokens), _int(r.cached_tokens),
                      _pct(r.hit_rate), _ms(r.ttft_s), _ms(r.itl_s), _ms(r.e2e_s),
                      _short(r.error) if r.error else _segment_marks(r))
    return table


def _short(error: str, width: int = 60) -> str:
    return error if len(error) <= width else error[: width - 1] + "…"


def cold_warm_table(records: list[RequestRecord]) -> Table:
    """One row per request: cold TTFT, warm TTFT and their ratio."""
    table = Table(title="cold vs warm (same request, back to back)")
    for col in ("request", "prompt", "cold TTFT ms", "warm cached", "warm TTFT ms", "cold/warm"):
        table.add_column(col, justify="left" if col == "request" else "right")
    by_index: dict[int, dict[str, RequestRecord]] = {}
    for r in records:
        by_index.setdefault(r.index, {})[r.phase] = r
    for pair in by_index.values():
        cold, warm = pair.get("cold"), pair.get("warm")
        if cold is None or warm is None:
            continue
        ratio = cold.ttft_s / warm.ttft_s if cold.ttft_s and warm.ttft_s else None
        table.add_row(cold.label, _int(cold.prompt_tokens), _ms(cold.ttft_s), _int(warm.cached_tokens),
                      _ms(warm.ttft_s), "-" if ratio is None else f"{ratio:.1f}x")
    return table


SUMMARY_ROWS = (
    ("requests (errors)", lambda s: f"{s['requests']} ({s['errors']})"),
    ("TTFT p50 / p90 / p99 ms",
     lambda s: " / ".join(_ms(s[k]) for k in ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s"))),
    ("TTFT sum ms", lambda s: _ms(s["ttft_sum_s"])),
    ("ITL mean ms", lambda s: "-" if s["itl_mean_s"] is None else f"{s['itl_mean_s'] * 1000:.1f}"),
    ("E2E p50 / sum ms", lambda s: f"{_ms(s['e2e_p50_s'])} / {_ms(s['e2e_sum_s'])}"),
    ("prompt / cached / computed tokens",
     lambda s: f"{s['prompt_tokens']:,} / {s['cached_tokens']:,} / {s['computed_tokens']:,}"),
    ("token hit rate", lambda s: _pct(s["token_hit_rate"])),
    ("output tok/s, req/s", lambda s: "-" if not s["output_tokens_per_s"] else
     f"{s['output_tokens_per_s']:.1f}, {s['requests_per_s']:.2f}"),
    ("cost $ (no cache $)", lambda s: f"{s['cost_usd']:.4f} ({s['cost_no_cache_usd']:.4f})"),
)


def summary_table(summary: dict[str, dict]) -> Table:
    """Aggregates, one column per phase."""
    table = Table(title="aggregates")
    table.add_column("metric")
    for phase in summary:
        table.add_column(phase, justify="right")
    for name, fmt in SUMMARY_ROWS:
        table.add_row(name, *(fmt(s) for s in summary.values()))
    return table


def print_run(result: dict, records: list[RequestRecord], console: Console | None = None) -> None:
    console = console or Console()
    console.print(records_table(records, title=_title(result["meta"])))
    for error in dict.fromkeys(r.error for r in records if r.error):
        console.print(f"[red]error:[/red] {error}")
    if any(r.phase == "warm" for r in records):
        console.print(cold_warm_table(records))
    console.print(summary_table(result["summary"]))


def _title(meta: dict) -> str:
    return f"{meta.get('workload')} · {meta.get('mode')} · {meta.get('url')} · {meta.get('model')}"


def result_dict(meta: dict, summary: dict, records: list[RequestRecord]) -> dict:
    return {"meta": meta, "summary": summary, "records": [asdict(r) for r in records]}


def write_json(path: str | Path, result: dict) -> None:
    Path(path).write_text(json.dumps(result, indent=2) + "\n")


def load_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


COMPARED = ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "ttft_sum_s", "itl_mean_s", "e2e_sum_s",
            "token_hit_rate", "computed_tokens", "cost_usd")


def compare(a_path: str | Path, b_path: str | Path, console: Console | None = None) -> dict[str, dict]:
    """Print B/A for every aggregate of every phase both files have (or, with no
    phase in common, A's last phase against B's last, e.g. warm vs run); returns
    ``{phase: {metric: ratio or None}}``. With A = segcache and B = a peer, a
    ratio of 5 on ``ttft_sum_s`` reads "the peer's TTFT sum is 5x segcache's"."""
    a, b = load_json(a_path), load_json(b_path)
    console = console or Console()
    ratios: dict[str, dict] = {}
    pairs = [(p, p) for p in a["summary"] if p in b["summary"]]
    if not pairs:
        pairs = [(list(a["summary"])[-1], list(b["summary"])[-1])]
    for pa, pb in pairs:
        phase = pa if pa == pb else f"{pa} vs {pb}"
        sa, sb = a["summary"][pa], b["summary"][pb]
        table = Table(title=f"{phase}: A = {_title(a['meta'])}\nB = {_title(b['meta'])}")
        for col in ("metric", "A", "B", "B/A"):
            table.add_column(col, justify="left" if col == "metric" else "right")
        ratios[phase] = {}
        for key in COMPARED:
            va, vb = sa.get(key), sb.get(key)
            ratio = vb / va if va and vb is not None else None
            ratios[phase][key] = ratio
            table.add_row(key, _value(va), _value(vb), "-" if ratio is None else f"{ratio:.2f}")
        console.print(table)
    return ratios


def _value(v: float | int | None) -> str:
    if v is None:
        return "-"
    return f"{v:,}" if isinstance(v, int) else f"{v:.4g}"


def plot(result: dict, out_dir: str | Path, console: Console | None = None) -> list[Path]:
    """TTFT per request and hit rate per request, as PNGs in ``out_dir``."""
    plt = _pyplot(console)
    if plt is None:
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for key, ylabel, scale, name in (("ttft_s", "TTFT (ms)", 1000, "ttft.png"),
                                     ("hit_rate", "token hit rate", 1, "hit_rate.png")):
        fig, ax = plt.subplots(figsize=(8, 4))
        for phase in dict.fromkeys(r["phase"] for r in result["records"]):
            rows = [r for r in result["records"] if r["phase"] == phase]
            values = [_record_value(r, key) for r in rows]
            ax.plot([r["label"] for r in rows], [v * scale if v is not None else float("nan")
                                                 for v in values], marker="o", label=phase)
        ax.set_ylabel(ylabel)
        ax.set_title(_title(result["meta"]))
        ax.tick_params(axis="x", rotation=45)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
        written.append(out / name)
    return written


def _pyplot(console: Console | None = None):
    """matplotlib's pyplot on the file-only backend, or None (said) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        (console or Console()).print("[yellow]plots skipped: matplotlib is not installed[/yellow]")
        return None
    return plt


def _record_value(row: dict, key: str) -> float | None:
    if key == "hit_rate":
        return row["cached_tokens"] / row["prompt_tokens"] if row.get("prompt_tokens") else None
    return row.get(key)


def main_phase(result: dict) -> str:
    """The phase a result stands for in a side-by-side table: "run" (a normal
    run), else "warm" (cold-vs-warm), else the last one ("cold" of --repeat-cold)."""
    phases = list(result["summary"])
    for phase in ("run", "warm"):
        if phase in phases:
            return phase
    return phases[-1]


# (label, summary key, format, ratio shown)
TABLE_ROWS = (
    ("TTFT sum s", "ttft_sum_s", lambda v: f"{v:.2f}", True),
    ("TTFT p50 ms", "ttft_p50_s", lambda v: f"{v * 1000:,.0f}", True),
    ("TTFT p90 ms", "ttft_p90_s", lambda v: f"{v * 1000:,.0f}", True),
    ("TTFT p99 ms", "ttft_p99_s", lambda v: f"{v * 1000:,.0f}", True),
    ("E2E sum s", "e2e_sum_s", lambda v: f"{v:.2f}", True),
    ("wall s", "wall_s", lambda v: f"{v:.2f}", True),
    ("ITL mean ms", "itl_mean_s", lambda v: f"{v * 1000:.1f}", True),
    ("prompt tokens", "prompt_tokens", lambda v: f"{v:,}", False),
    ("token hit rate", "token_hit_rate", lambda v: f"{v:.0%}", False),
    ("cost $ (seed 000 pricing)", "cost_usd", lambda v: f"{v:.4f}", True),
    ("errors", "errors", lambda v: f"{v}", False),
)


USAGE_KEYS = ("prompt_tokens", "token_hit_rate", "cost_usd")


def results_rows(results: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one column per result, then ``label / first`` ratio columns
    (how many times the first result's figure the other one is)."""
    labels = list(results)
    summaries = [r["summary"][main_phase(r)] for r in results.values()]
    header = ["metric", *labels, *(f"{lb} / {labels[0]}" for lb in labels[1:])]
    rows = []
    for name, key, fmt, with_ratio in TABLE_ROWS:
        # A server that reports no usage (prompt tokens 0) has no token figures.
        values = [None if key in USAGE_KEYS and not s.get("prompt_tokens") else s.get(key) for s in summaries]
        cells = ["-" if v is None else fmt(v) for v in values]
        first = values[0]
        for v in values[1:]:
            ok = with_ratio and first and v is not None
            cells.append(f"{v / first:.2f}x" if ok else "")
        rows.append([name, *cells])
    return header, rows


def results_table(results: dict[str, dict], title: str | None = None, markdown: bool = False,
                  console: Console | None = None) -> tuple[list[str], list[list[str]]]:
    """Print ``results_rows`` as a rich table or as Markdown; returns them."""
    header, rows = results_rows(results)
    console = console or Console()
    if markdown:
        lines = [f"| {' | '.join(header)} |", "| --- |" + " ---: |" * (len(header) - 1)]
        lines += [f"| {' | '.join(row)} |" for row in rows]
        print("\n".join(lines))  # plain, so that it can be pasted
        return header, rows
    table = Table(title=title)
    for i, col in enumerate(header):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    return header, rows


def plot_results(results: dict[str, dict], out_dir: str | Path, title: str) -> list[Path]:
    """TTFT per request of several results on one PNG (``ttft_compare.png``)."""
    plt = _pyplot()
    if plt is None:
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for label, result in results.items():
        rows = [r for r in result["records"] if r["phase"] == main_phase(result)]
        ax.plot(range(1, len(rows) + 1), [r["ttft_s"] * 1000 if r.get("ttft_s") is not None else float("nan")
                                          for r in rows], marker="o", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("request")
    ax.set_ylabel("TTFT (ms, log scale)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path = out / "ttft_compare.png"
    fig.savefig(path)
    plt.close(fig)
    return [path]
