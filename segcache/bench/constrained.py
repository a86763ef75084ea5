"""``segcache bench constrained``: the cost of constrained decoding on decode
throughput, against unconstrained decoding in the same run.

HTTP only (the ``openai`` client, streaming). For each stream count (1 and 8 by
default) the same prompts run without and with a ``response_format`` JSON schema
(a list of short facts), alternating, ``--rounds`` times; the table gives the
median aggregate and steady decode rates of each (see ``segcache bench sweep``)
and the constrained run's overhead. The issue's target is < 10%.
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
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per stream (default: 64)")
    p.add_argument("--rounds", type=int, default=3,
                   help="unconstrained/constrained pairs per stream count (default: 3)")
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


def measure(client: OpenAI, model: str, n: int, max_tokens: int, rounds: int) -> dict:
    """Median rates of ``rounds`` alternating unconstrained/constrained runs of ``n`` streams."""
    rates: dict[str, dict[str, list[float]]] = {
        kind: {"decode_tok_s": [], "steady_tok_s": [], "tokens": []} for kind in ("plain", "json")}
    for r in range(rounds):
        for kind in ("plain", "json"):
            streams = run_streams(client, model, n, max_tokens, kind == "json", offset=100 * r)
            rates[kind]["decode_tok_s"].append(decode_rate(streams))
            rates[kind]["steady_tok_s"].append(steady_rate(streams))
            rates[kind]["tokens"].append(sum(s.tokens for s in streams))
    row: dict = {"streams": n}
    for kind, figures in rates.items():
        for name, values in figures.items():
            row[f"{kind}_{name}"] = statistics.median(values)
    plain = row["plain_decode_tok_s"]
    row["overhead"] = 1 - row["json_decode_tok_s"] / plain if plain else None
    return row


def run(args: argparse.Namespace) -> int:
    client = OpenAI(base_url=args.url, api_key=args.api_key, max_retries=0, timeout=600)
    model = args.model or client.models.list().data[0].id
    rows = [measure(client, model, int(n), args.max_tokens, args.rounds)
            for n in args.streams.split(",")]
    table = Table(title=f"constrained decoding overhead, {args.url} (medians of {args.rounds})")
    for col in ("streams", "plain tok/s", "json tok/s", "plain steady", "json steady", "overhead",
                "tokens plain/json"):
        table.add_column(col, justify="right")
    for r in rows:
        overhead = "n/a" if r["overhead"] is None else f"{100 * r['overhead']:.1f}%"
        table.add_row(str(r["streams"]), f"{r['plain_decode_tok_s']:.1f}",
                      f"{r['json_decode_tok_s']:.1f}", f"{r['plain_steady_tok_s']:.1f}",
                      f"{r['json_steady_tok_s']:.1f}", overhead,
                      f"{r['plain_tokens']:.0f}/{r['json_tokens']:.0f}")
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps({"constrained": rows}, indent=2))
    return 0
