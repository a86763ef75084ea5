"""Show and store benchmark results: rich tables, JSON files, comparisons, plots.

A result file (``--json``) is ``{"meta": {...}, "summary": {phase: {...}},
"records": [...]}``; ``compare`` reads two of them. Plots need matplotlib,
which is optional: without it ``plot`` says so and returns.

Blending figures (blended / recomputed tokens, reused fraction) are shown only
where a result has them: servers without non-prefix reuse do not report them.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from segcache.bench.metrics import RequestRecord, agreement


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:,.0f}"


def _int(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _segment_marks(rec: RequestRecord) -> str:
    if not rec.segments:
        return ""
    return " ".join(f"{s.get('id')}:{_status(s)}" for s in rec.segments)


def _status(seg: dict) -> str:
    status = seg.get("status")
    if status == "blended":
        return "blend" if seg.get("recomputed") is None else f"blend(r{seg['recomputed']})"
    if status == "partial":
        return f"partial({seg.get('reused')})"
    return str(status)


def records_table(records: list[RequestRecord], title: str = "requests") -> Table:
    """One row per request; blended / reused columns where the server reports blending."""
    blend = any(r.blended_tokens is not None for r in records)
    table = Table(title=title)
    cols = ["#", "request", "phase", "prompt", "cached", "hit"]
    cols += ["blended", "recomp", "reused"] if blend else []
    cols += ["TTFT ms", "ITL ms", "E2E ms", "segments"]
    for col in cols:
        table.add_column(col, justify="left" if col in ("request", "phase", "segments") else "right")
    for r in records:
        cells = [str(r.index + 1), r.label, r.phase, _int(r.prompt_tokens), _int(r.cached_tokens),
                 _pct(r.hit_rate)]
        if blend:
            cells += [_int(r.blended_tokens), _int(r.recomputed_tokens), _pct(r.reused_rate)]
        cells += [_ms(r.ttft_s), _ms(r.itl_s), _ms(r.e2e_s), _short(r.error) if r.error else _segment_marks(r)]
        table.add_row(*cells)
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
    ("token hit rate (prefix)", lambda s: _pct(s["token_hit_rate"])),
    ("blended / recomputed tokens",
     lambda s: f"{_int(s.get('blended_tokens'))} / {_int(s.get('recomputed_tokens'))}"),
    ("reused fraction (prefix + blend)", lambda s: _pct(s.get("reused_fraction"))),
    ("output tok/s, req/s", lambda s: "-" if not s["output_tokens_per_s"] else
     f"{s['output_tokens_per_s']:.1f}, {s['requests_per_s']:.2f}"),
    ("cost $ (no cache $)", lambda s: f"{s['cost_usd']:.4f} ({s['cost_no_cache_usd']:.4f})"),
)


BLEND_ROWS = ("blended / recomputed tokens", "reused fraction (prefix + blend)")


def _blends(summaries) -> bool:
    return any(s.get("blended_tokens") is not None for s in summaries)


def summary_table(summary: dict[str, dict]) -> Table:
    """Aggregates, one column per phase (blend rows only where a phase has blending)."""
    table = Table(title="aggregates")
    table.add_column("metric")
    for phase in summary:
        table.add_column(phase, justify="right")
    blend = _blends(summary.values())
    for name, fmt in SUMMARY_ROWS:
        if blend or name not in BLEND_ROWS:
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
    share = result["meta"].get("reusable_share")
    if share and share.get("prefix") is not None:
        console.print(f"reusable prompt text, at best (characters): {share['prefix']:.0%} as a prefix, "
                      f"{share['anywhere']:.0%} with the segments marked reuse anywhere blended")


def _title(meta: dict) -> str:
    return f"{meta.get('workload')} · {meta.get('mode')} · {meta.get('url')} · {meta.get('model')}"


def result_dict(meta: dict, summary: dict, records: list[RequestRecord]) -> dict:
    return {"meta": meta, "summary": summary, "records": [asdict(r) for r in records]}


def write_json(path: str | Path, result: dict) -> None:
    Path(path).write_text(json.dumps(result, indent=2) + "\n")


class UnreadableResult(ValueError):
    """A result file that is missing or not JSON; the message names it."""


def load_json(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except OSError as exc:
        raise UnreadableResult(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise UnreadableResult(f"cannot read {path}: {exc}") from None


COMPARED = ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "ttft_sum_s", "itl_mean_s", "e2e_sum_s",
            "token_hit_rate", "reused_fraction", "computed_tokens", "cost_usd")


def _phase_pairs(a: dict, b: dict) -> list[tuple[str, str]]:
    """Phases both results have, or, with none in common, A's last against B's last."""
    pairs = [(p, p) for p in a["summary"] if p in b["summary"]]
    return pairs or [(list(a["summary"])[-1], list(b["summary"])[-1])]


def _phase_name(pa: str, pb: str) -> str:
    return pa if pa == pb else f"{pa} vs {pb}"


def compare(a_path: str | Path, b_path: str | Path, console: Console | None = None) -> dict[str, dict]:
    """Print B/A for every aggregate of every phase both files have (or, with no
    phase in common, A's last phase against B's last, e.g. warm vs run), then
    the output agreement of B with A (``agreement_between``); returns
    ``{phase: {metric: ratio or None}}``. With A = segcache and B = a peer, a
    ratio of 5 on ``ttft_sum_s`` reads "the peer's TTFT sum is 5x segcache's"."""
    a, b = load_json(a_path), load_json(b_path)
    console = console or Console()
    ratios: dict[str, dict] = {}
    for pa, pb in _phase_pairs(a, b):
        phase = _phase_name(pa, pb)
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
    print_agreement(a, b, console)
    return ratios


# Meta fields that must be equal for two runs to have sent the same requests.
SAME_REQUESTS = ("workload", "seed", "turns", "max_tokens", "objects", "code_tokens", "sizes_tokens",
                 "chars_per_token", "layout")


def _nonce_cold(meta: dict) -> bool:
    return bool(meta.get("repeat_cold")) and (meta.get("cold") == "nonce" or (meta.get("concurrency") or 1) > 1)


def text_pairs(a: dict, b: dict, pa: str, pb: str) -> list[tuple[str, str]]:
    """``(A's text, B's text)`` of the requests of phase ``pa`` of A and ``pb`` of B,
    matched by index and label, both without error."""
    texts = {(r["index"], r["label"]): r.get("text") or "" for r in a["records"]
             if r["phase"] == pa and not r.get("error")}
    return [(texts[(r["index"], r["label"])], r.get("text") or "") for r in b["records"]
            if r["phase"] == pb and not r.get("error") and (r["index"], r["label"]) in texts]


def agreement_between(a: dict, b: dict) -> dict[str, dict]:
    """Output agreement of result B with result A, the reference (e.g. A: the
    cache purged before every request, B: blending), per phase pair as in
    ``compare``: ``{phase: metrics.agreement(...)}``."""
    return {_phase_name(pa, pb): agreement(text_pairs(a, b, pa, pb)) for pa, pb in _phase_pairs(a, b)}


def print_agreement(a: dict, b: dict, console: Console | None = None) -> dict[str, dict]:
    console = console or Console()
    ma, mb = a.get("meta", {}), b.get("meta", {})
    differ = [k for k in SAME_REQUESTS if k in ma and k in mb and ma[k] != mb[k]]  # older files lack some
    if differ:
        console.print(f"[yellow]A and B did not send the same requests ({', '.join(differ)} differ): "
                      "their outputs cannot be expected to agree[/yellow]")
    if _nonce_cold(ma) or _nonce_cold(mb):
        console.print("[yellow]a --repeat-cold run with a nonce changed its prompts: its outputs may differ "
                      "for that reason alone (sequential --repeat-cold purges instead)[/yellow]")
    found = agreement_between(a, b)
    table = Table(title="output agreement of B with A (A the reference), per request")
    for col in ("phase", "requests", "same text", "leading chars", "leading words"):
        table.add_column(col, justify="left" if col == "phase" else "right")
    for phase, ag in found.items():
        table.add_row(phase, str(ag["pairs"]), _pct(ag["exact_match"]), _pct(ag["leading_chars"]),
                      _pct(ag["leading_words"]))
    console.print(table)
    return found


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
    blend = any(r.get("blended_tokens") is not None for r in result["records"])
    for keys, ylabel, scale, name in ((("ttft_s",), "TTFT (ms)", 1000, "ttft.png"),
                                      (("hit_rate", "reused") if blend else ("hit_rate",),
                                       "token hit rate" + (" / reused fraction" if blend else ""), 1,
                                       "hit_rate.png")):
        fig, ax = plt.subplots(figsize=(8, 4))
        for phase, key in ((p, k) for p in dict.fromkeys(r["phase"] for r in result["records"]) for k in keys):
            rows = [r for r in result["records"] if r["phase"] == phase]
            values = [_record_value(r, key) for r in rows]
            ax.plot([r["label"] for r in rows], [v * scale if v is not None else float("nan")
                                                 for v in values], marker="o",
                    linestyle="--" if key == "reused" else "-",
                    label=phase if len(keys) == 1 else f"{phase} {key.replace('_', ' ')}")
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
    if key == "reused":
        if not row.get("prompt_tokens") or row.get("blended_tokens") is None:
            return None
        return ((row.get("cached_tokens") or 0) + row["blended_tokens"]) / row["prompt_tokens"]
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
    ("token hit rate (prefix)", "token_hit_rate", lambda v: f"{v:.0%}", False),
    ("blended tokens", "blended_tokens", lambda v: f"{v:,}", False),
    ("recomputed tokens", "recomputed_tokens", lambda v: f"{v:,}", False),
    ("reused fraction (prefix + blend)", "reused_fraction", lambda v: f"{v:.0%}", False),
    ("cost $ (seed 000 pricing)", "cost_usd", lambda v: f"{v:.4f}", True),
    ("errors", "errors", lambda v: f"{v}", False),
)


USAGE_KEYS = ("prompt_tokens", "token_hit_rate", "cost_usd", "blended_tokens", "recomputed_tokens",
              "reused_fraction")
BLEND_KEYS = ("blended_tokens", "recomputed_tokens", "reused_fraction")


def results_rows(results: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one column per result, then ``label / first`` ratio columns
    (how many times the first result's figure the other one is). Blend rows only
    where a result reports blending; with two results or more, a last row gives
    each one's output agreement with the first (same text / leading characters)."""
    labels = list(results)
    summaries = [r["summary"][main_phase(r)] for r in results.values()]
    header = ["metric", *labels, *(f"{lb} / {labels[0]}" for lb in labels[1:])]
    rows = []
    blend = _blends(summaries)
    for name, key, fmt, with_ratio in TABLE_ROWS:
        if key in BLEND_KEYS and not blend:
            continue
        # A server that reports no usage (prompt tokens 0) has no token figures.
        values = [None if key in USAGE_KEYS and not s.get("prompt_tokens") else s.get(key) for s in summaries]
        cells = ["-" if v is None else fmt(v) for v in values]
        first = values[0]
        for v in values[1:]:
            ok = with_ratio and first and v is not None
            cells.append(f"{v / first:.2f}x" if ok else "")
        rows.append([name, *cells])
    if len(results) > 1:
        rows.append(_agreement_row(labels[0], list(results.values())))
    return header, rows


def _agreement_row(first_label: str, results: list[dict]) -> list[str]:
    ref = results[0]
    cells = ["(reference)"]
    for other in results[1:]:
        ag = agreement(text_pairs(ref, other, main_phase(ref), main_phase(other)))
        cells.append("-" if not ag["pairs"] else f"{ag['exact_match']:.0%} / {ag['leading_chars']:.0%}")
    return [f"outputs = {first_label}'s (same text / leading chars)", *cells, *([""] * (len(results) - 1))]


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
