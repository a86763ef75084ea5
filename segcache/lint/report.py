"""Showing a ``LintResult``: a rich terminal report, JSON, and a self-contained
HTML page with matplotlib plots embedded as base64 PNG."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from segcache.lint.analyze import LintResult
from segcache.lint.findings import Finding

_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def _where(f: Finding) -> str:
    if not f.evidence:
        return ""
    e = f.evidence[0]
    parts = [f"request {e.request}"]
    if e.message is not None:
        parts.append(f"message {e.message}")
    elif e.unit not in ("prefix", "route"):
        parts.append(e.unit)
    if e.char_offset is not None and (e.char_offset or e.token_offset):
        parts.append(f"char {e.char_offset} / token {e.token_offset}")
    return ", ".join(parts)


def print_report(result: LintResult, console: Console | None = None, evidence: int = 3) -> None:
    console = console or Console()
    console.print(f"[bold]segcache lint[/bold]: {result.requests} requests, tokenizer {result.tokenizer}")
    if not result.findings:
        console.print("[green]No findings: the trace's prompt shape is cache-friendly.[/green]")
    else:
        table = Table(title="Findings")
        for col in ("rule", "severity", "count", "requests", "tokens lost", "first at"):
            table.add_column(col, overflow="fold")
        for f in result.findings:
            table.add_row(f.rule, f"[{_STYLE.get(f.severity, '')}]{f.severity}[/]", str(f.count),
                          str(f.requests), str(f.tokens_lost), _where(f))
        console.print(table)
        for f in result.findings:
            console.print(f"[{_STYLE.get(f.severity, '')}]{f.rule}[/]: {f.explanation}\n"
                          f"  [bold]fix:[/bold] {f.fix}", highlight=False)
            for e in f.evidence[:evidence]:
                console.print(f"  [dim]{e.source}[/dim] ({e.unit}): {e.text}", highlight=False)
    sims = Table(title=f"Simulated prompt-token hit rate (segcache --blend {result.blend})")
    for col in ("scenario", "plain prefix cache", "segcache (auto segments)", "of which partial",
                "of which non-prefix"):
        sims.add_column(col)
    for s in [result.baseline, *result.fixes]:
        total = s.result.summary()["segcache_prompt_tokens"] or 1
        sims.add_row(s.name, f"{s.result.plain_rate:.1%}", f"{s.result.seg_rate:.1%}",
                     f"{s.result.partial_tokens / total:.1%}", f"{s.result.nonprefix_rate:.1%}")
    console.print(sims)


def write_json(result: LintResult, path: str | Path) -> None:
    Path(path).write_text(json.dumps(result.to_dict(), indent=2) + "\n")


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def plots(result: LintResult) -> list[tuple[str, str]]:
    """(title, base64 PNG): prefix stability over the trace, hit rate per fix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.baseline.result.per_request
    out = []
    fig, ax = plt.subplots(figsize=(9, 3.2))
    xs = range(len(rows))
    ax.plot(xs, [r[1] / r[0] if r[0] else 0 for r in rows], ".-", label="plain prefix cache", alpha=0.8)
    ax.plot(xs, [r[3] / r[2] if r[2] else 0 for r in rows], ".-", label="segcache", alpha=0.8)
    for f in result.findings:
        for e in f.evidence:
            ax.axvline(e.request, color="red" if f.severity == "error" else "orange", alpha=0.15)
    ax.set(xlabel="request", ylabel="cached fraction of prompt", ylim=(-0.02, 1.02),
           title="Prefix stability over the trace (red/orange: findings)")
    ax.legend(loc="lower right")
    out.append(("Prefix stability", _png(fig)))
    plt.close(fig)

    scenarios = [result.baseline, *result.fixes]
    fig, ax = plt.subplots(figsize=(9, 0.5 + 0.45 * len(scenarios)))
    ys = range(len(scenarios))
    ax.barh([y - 0.2 for y in ys], [s.result.plain_rate for s in scenarios], 0.4, label="plain prefix cache")
    ax.barh([y + 0.2 for y in ys], [s.result.seg_rate for s in scenarios], 0.4, label="segcache")
    ax.set_yticks(list(ys), [s.name for s in scenarios])
    ax.invert_yaxis()
    ax.set(xlim=(0, 1), xlabel="prompt-token hit rate", title="Hit rate before and after each fix")
    ax.legend(loc="lower right")
    out.append(("Hit rate before/after fixes", _png(fig)))
    plt.close(fig)
    return out


def write_html(result: LintResult, path: str | Path) -> None:
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>segcache lint</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}"
        ".error{color:#b00}.warning{color:#a60}code{font-size:90%}</style></head><body>",
        f"<h1>segcache lint</h1><p>{result.requests} requests; tokenizer: <code>{e(result.tokenizer)}</code></p>",
        f"<h2>Simulated hit rate (segcache --blend {e(result.blend)})</h2><table><tr><th>scenario</th>"
        "<th>plain prefix cache</th><th>segcache</th><th>of which non-prefix</th></tr>",
    ]
    for s in [result.baseline, *result.fixes]:
        parts.append(f"<tr><td>{e(s.name)}</td><td>{s.result.plain_rate:.1%}</td>"
                     f"<td>{s.result.seg_rate:.1%}</td><td>{s.result.nonprefix_rate:.1%}</td></tr>")
    parts.append("</table>")
    for title, png in plots(result):
        parts.append(f"<h2>{e(title)}</h2><img alt='{e(title)}' src='data:image/png;base64,{png}'>")
    parts.append("<h2>Findings</h2>" if result.findings else "<h2>No findings</h2>")
    for f in result.findings:
        parts.append(f"<h3 class='{f.severity}'>{e(f.rule)} ({f.severity}): {e(f.title)}</h3>"
                     f"<p>{e(f.explanation)}<br><b>Fix:</b> {e(f.fix)}<br>{f.count} occurrence(s) "
                     f"in {f.requests} request(s), ~{f.tokens_lost} cacheable tokens lost.</p>"
                     "<table><tr><th>request</th><th>source</th><th>where</th><th>char</th>"
                     "<th>token</th><th>evidence</th></tr>")
        for ev in f.evidence:
            parts.append(f"<tr><td>{ev.request}</td><td>{e(ev.source)}</td><td>{e(ev.unit)}</td>"
                         f"<td>{'' if ev.char_offset is None else ev.char_offset}</td>"
                         f"<td>{'' if ev.token_offset is None else ev.token_offset}</td>"
                         f"<td><code>{e(ev.text)}</code></td></tr>")
        parts.append("</table>")
    parts.append("</body></html>\n")
    Path(path).write_text("".join(parts))
