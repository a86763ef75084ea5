"""``segcache lint FILE...``: argument parsing and the run. Exit status 1 when
an error-severity finding exists (for CI), 2 on bad input, else 0."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from segcache.config import BLEND_MODES
from segcache.lint.analyze import RULE_IDS, lint
from segcache.lint.findings import LintOptions
from segcache.lint.report import print_report, write_html, write_json
from segcache.lint.tokens import TokenCounter, find_tokenizer
from segcache.lint.trace import ReadStats, Request, read_requests

PROGRESS_MIN_BYTES = 1 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE",
                        help="JSONL trace: OpenAI chat request bodies, or request-log records "
                             "{'request': body, 'timestamp', 'replica'|'route', 'tenant', 'agent', "
                             "'response'} (see segcache.lint.trace)")
    parser.add_argument("--tokenizer", default=None, metavar="PATH",
                        help="tokenizer.json, or a directory holding one (default: the newest under "
                             "$SEGCACHE_CACHE_DIR/models/*/, else ~/.cache/segcache/models/*/; without "
                             "one, counts are approximate: 4 chars per token)")
    parser.add_argument("--json", dest="json_path", type=Path, metavar="PATH", help="write findings and simulation as JSON")
    parser.add_argument("--html", dest="html_path", type=Path, metavar="PATH", help="write an HTML report with plots")
    parser.add_argument("--rules", default=None, metavar="IDS",
                        help=f"comma-separated rule ids to run (default: all of {', '.join(RULE_IDS)})")
    parser.add_argument("--warm-delay", type=float, default=LintOptions.warm_delay_s, metavar="S",
                        help="seconds after its timestamp before a prompt counts as cached (default: %(default)s)")
    parser.add_argument("--min-lost-tokens", type=int, default=LintOptions.min_lost_tokens, metavar="N",
                        help="ignore occurrences that cost fewer cacheable tokens (default: %(default)s)")
    parser.add_argument("--blend", choices=BLEND_MODES, default=LintOptions.blend,
                        help="simulate `segcache serve --blend`: off, marked (segments sent with reuse: "
                             "anywhere) or auto (also every segment, and message text cut into "
                             "content-defined chunks, reused at any position) (default: %(default)s)")
    parser.add_argument("--prefill-chunk", type=int, default=LintOptions.prefill_chunk, metavar="N",
                        help="the server's prefill chunk: a partial hit on a changed message reuses its "
                             "shared head rounded down to it (default: %(default)s)")
    parser.add_argument("--independent-rows", type=int, default=LintOptions.independent_rows, metavar="N",
                        help="the server's model plan computes the rows of 2..N-token prefill calls "
                             "independently (ExecPlan.independent_rows): partial hits then need no "
                             "rounding (default: %(default)s, the safe assumption)")
    parser.add_argument("--evidence", type=int, default=3, metavar="N",
                        help="evidence lines printed per rule (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    console = Console()
    err = Console(stderr=True)
    missing = [str(f) for f in args.files if not f.is_file()]
    if missing:
        err.print(f"[red]segcache lint: no such file: {', '.join(missing)}[/red]")
        return 2
    try:
        tokenizer = find_tokenizer(args.tokenizer)
        options = LintOptions(warm_delay_s=args.warm_delay, min_lost_tokens=args.min_lost_tokens,
                              blend=args.blend, prefill_chunk=args.prefill_chunk,
                              independent_rows=args.independent_rows)
    except (FileNotFoundError, ValueError) as e:
        err.print(f"[red]segcache lint: {e}[/red]")
        return 2
    if tokenizer is None:
        err.print("[yellow]warning: no tokenizer.json found (pass --tokenizer, or run `segcache prepare`); "
                  "token counts are approximate (4 chars per token)[/yellow]")
    counter = TokenCounter(tokenizer)
    rules = None if args.rules is None else [r.strip() for r in args.rules.split(",") if r.strip()]
    stats = ReadStats()
    passes = iter(("rules + simulation", "replaying fixes"))
    try:
        result = lint(lambda: _open(args.files, stats, next(passes, "reading"), err), counter, options, rules)
    except ValueError as e:
        err.print(f"[red]segcache lint: {e}[/red]")
        return 2
    if stats.skipped:
        err.print(f"[yellow]warning: skipped {stats.skipped} line(s) that are not chat requests "
                  f"(first: {', '.join(stats.first_skipped)})[/yellow]")
    print_report(result, console, evidence=args.evidence)
    if args.json_path:
        write_json(result, args.json_path)
        console.print(f"wrote {args.json_path}")
    if args.html_path:
        write_html(result, args.html_path)
        console.print(f"wrote {args.html_path}")
    return 1 if result.errors else 0


def _open(files: list[Path], stats: ReadStats, label: str, console: Console) -> Iterator[Request]:
    """Stream the files once; a progress bar on stderr when they are big."""
    total = sum(f.stat().st_size for f in files)
    if stats.lines:  # second pass: count lines and skips once
        stats = ReadStats()
    if total < PROGRESS_MIN_BYTES:
        yield from read_requests(files, stats)
        return
    columns = (TextColumn(label), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(label, total=total)
        yield from read_requests(files, stats, on_bytes=lambda n: progress.advance(task, n))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="segcache lint", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
