"""``segcache bench constrained``: the cost of constrained decoding on decode
throughput, against unconstrained decoding in the same run.

HTTP only (the ``openai`` client, streaming). For each stream count (1 and 8 by
default) the same prompts run without and with a ``response_format`` JSON schema
(a list of short facts) as one round; ``--rounds`` rounds, after ``--warmup``
uncounted ones. Steadier on a noisy machine than one pair of runs:

- within a round the two kinds run back to back, in alternating order (plain
  first in even rounds, constrained first in odd ones), so drift in the machine's
  speed cancels instead of favouring one kind;
- the round's prompts are prefilled into the cache first (1 token each), so both
  kinds decode from a cached prompt and neither pays the prefill for the other;
- the overhead is taken per round (1 - constrained / plain, each pair measured
  within seconds) and reported as the median over rounds with its range.

Two rates, as ``segcache bench sweep``: aggregate (all tokens over first to last
chunk) and steady (while every stream decodes). The issue's target is < 10%.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

from openai import OpenAI
from rich.console import Console
from rich.table import Table

from segcache.bench.sweep import _Stream, decode_rate, steady_rate

# minItems keeps every constrained reply going to --max-tokens, as the plain one does: the
# two runs then decode the same number of tokens and their rates compare.
FACTS_SCHEMA = {
    "type": "object",
    "properties": {"facts": {"type": "array", "items": {"type": "string", "minLength": 20,
                                                        "maxLength": 120},
                             "minItems": 40, "maxItems": 100}},
    "required": ["facts"],
    "additionalProperties": False,
}
FACTS_FORMAT = {"type": "json_schema",
                "json_schema": {"name": "facts", "schema": FACTS_SCHEMA, "strict": True}}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000/v1", help="OpenAI base URL")
    p.add_argument("--api-key", default="local")
    p.add_argument("--model", default=None, help="model id (default: the first of GET /models)")
    p.add_argument("--streams", default="1,8", help="stream counts (default: 1,8)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per stream (default: 128)")
    p.add_argument("--rounds", type=int, default=5,
                   help="plain/constrained pairs per stream count (default: 5)")
    p.add_argument("--warmup", type=int, default=1,
                   help="uncounted rounds first, per stream count (default: 1)")
    p.add_argument("--json", type=Path, default=None, help="write the figures as JSON")


def _prompt(i: int) -> str:
    return (f"List {40 + i} distinct facts about the number {17 * i + 3} as JSON: "
            '{"facts": ["...", ...]}')


def _run_stream(client: OpenAI, model: str, prompt: str, max_tokens: int, constrained: bool,
                out: _Stream) -> None:
    extra = {"response_format": FACTS_FORMAT} if constrained else {}
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
        temperature=0, stream=True, stream_options={"include_usage": True}, **extra)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            out.times.append(time.perf_counter())
        if chunk.usage is not None:
            out.tokens = chunk.usage.completion_tokens


def run_streams(client: OpenAI, model: str, n: int, max_tokens: int, constrained: bool,
                offset: int) -> list[_Stream]:
    streams = [_Stream() for _ in range(n)]
    threads = [threading.Thread(target=_run_stream,
                                args=(client, model, _prompt(offset + i), max_tokens, constrained, s))
               for i, s in enumerate(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return streams


def _prefill(client: OpenAI, model: str, n: int, offset: int) -> None:
    """Put the round's prompts in the server's cache (one token each)."""
    for i in range(n):
        client.chat.completions.create(model=model, max_tokens=1, temperature=0,
                                       messages=[{"role": "user", "content": _prompt(offset + i)}])


def _round(client: OpenAI, model: str, n: int, max_tokens: int, r: int) -> dict:
    """One plain and one constrained run of the same ``n`` prompts (cached first),
    plain first in even rounds."""
    offset = 100 * r
    _prefill(client, model, n, offset)
    row: dict = {}
    for kind in ("plain", "json") if r % 2 == 0 else ("json", "plain"):
        streams = run_streams(client, model, n, max_tokens, kind == "json", offset)
        row[f"{kind}_decode_tok_s"] = decode_rate(streams)
        row[f"{kind}_steady_tok_s"] = steady_rate(streams)
        row[f"{kind}_tokens"] = sum(s.tokens for s in streams)
    row["overhead"] = _overhead(row["plain_decode_tok_s"], row["json_decode_tok_s"])
    row["steady_overhead"] = _overhead(row["plain_steady_tok_s"], row["json_steady_tok_s"])
    return row


def _overhead(plain: float, constrained: float) -> float | None:
    return 1 - constrained / plain if plain else None


def _median_and_range(values: list) -> tuple[float | None, list[float] | None]:
    known = [v for v in values if v is not None]
    return (statistics.median(known), [min(known), max(known)]) if known else (None, None)


def measure(client: OpenAI, model: str, n: int, max_tokens: int, rounds: int,
            warmup: int = 1) -> dict:
    """``warmup`` uncounted rounds, then ``rounds`` counted ones of ``n`` streams: the
    medians of each kind's rates and of the per-round overheads, with their ranges."""
    for r in range(warmup):
        _round(client, model, n, max_tokens, 1000 + r)
    per_round = [_round(client, model, n, max_tokens, r) for r in range(rounds)]
    row: dict = {"streams": n, "rounds": per_round}
    for key in per_round[0]:
        row[key], row[f"{key}_range"] = _median_and_range([p[key] for p in per_round])
    return row


def _percent(value: float | None, spread: list[float] | None) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}% [{100 * spread[0]:.1f}, {100 * spread[1]:.1f}]"


def run(args: argparse.Namespace) -> int:
    client = OpenAI(base_url=args.url, api_key=args.api_key, max_retries=0, timeout=600)
    model = args.model or client.models.list().data[0].id
    rows = [measure(client, model, int(n), args.max_tokens, args.rounds, args.warmup)
            for n in args.streams.split(",")]
    table = Table(title=f"constrained decoding overhead, {args.url}: medians of {args.rounds} "
                        f"rounds of {args.max_tokens} tokens a stream, overheads per round "
                        "[min, max]")
    for col in ("streams", "plain tok/s", "json tok/s", "overhead", "plain steady", "json steady",
                "steady overhead", "tokens plain/json"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["streams"]), f"{r['plain_decode_tok_s']:.1f}",
                      f"{r['json_decode_tok_s']:.1f}", _percent(r["overhead"], r["overhead_range"]),
                      f"{r['plain_steady_tok_s']:.1f}", f"{r['json_steady_tok_s']:.1f}",
                      _percent(r["steady_overhead"], r["steady_overhead_range"]),
                      f"{r['plain_tokens']:.0f}/{r['json_tokens']:.0f}")
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps({"constrained": rows}, indent=2))
    return 0
