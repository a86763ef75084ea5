"""``segcache bench sweep``: decode throughput at 1, 2, 4, 8 concurrent streams,
and the inter-token gaps of running streams while a long cold prefill is admitted.

HTTP only (the ``openai`` client, streaming); works against any OpenAI-compatible
server. Each stream asks for a long answer at temperature 0 with a distinct
prompt (so nothing is shared). Two throughputs per stream count:

- aggregate: completion tokens over the time from the first stream's first token
  to the last stream's last token (the other streams' prefills fall inside it);
- steady decode: tokens that arrive while *all* streams are decoding (after the
  last stream's first token, until the first stream's last token) over that
  window, i.e. the decode rate of N running streams. With one stream it is that
  stream's rate after its first token.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

from openai import OpenAI
from rich.console import Console
from rich.table import Table

from segcache.bench.metrics import percentile


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000/v1", help="OpenAI base URL")
    p.add_argument("--api-key", default="local")
    p.add_argument("--model", default=None, help="model id (default: the first of GET /models)")
    p.add_argument("--streams", default="1,2,4,8", help="stream counts to sweep (default: 1,2,4,8)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per stream (default: 64)")
    p.add_argument("--prefill-tokens", type=int, default=4000,
                   help="size of the cold prompt sent while streams decode (0: skip; default: 4000)")
    p.add_argument("--json", type=Path, default=None, help="write the figures as JSON")


class _Stream:
    def __init__(self) -> None:
        self.times: list[float] = []  # arrival time of every content chunk
        self.tokens = 0


def _run_stream(client: OpenAI, model: str, prompt: str, max_tokens: int, out: _Stream) -> None:
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
        temperature=0, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            out.times.append(time.perf_counter())
        if chunk.usage is not None:
            out.tokens = chunk.usage.completion_tokens


def _prompt(i: int) -> str:
    return f"Write a long numbered list of {40 + i} distinct facts about the number {17 * i + 3}."


def run_streams(client: OpenAI, model: str, n: int, max_tokens: int, offset: int = 0) -> list[_Stream]:
    """Run ``n`` streams at once and wait for all of them."""
    streams = [_Stream() for _ in range(n)]
    threads = [threading.Thread(target=_run_stream, args=(client, model, _prompt(offset + i),
                                                          max_tokens, s)) for i, s in enumerate(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return streams


def decode_rate(streams: list[_Stream]) -> float:
    firsts = [s.times[0] for s in streams if s.times]
    lasts = [s.times[-1] for s in streams if s.times]
    span = max(lasts) - min(firsts) if firsts else 0.0
    return sum(s.tokens for s in streams) / span if span > 0 else 0.0


def steady_rate(streams: list[_Stream]) -> float:
    """Tokens/s while every stream is decoding; chunks are scaled to tokens by the
    streams' own tokens-per-chunk. 0.0 when the streams never all ran at once."""
    live = [s for s in streams if s.times]
    if not live:
        return 0.0
    start, end = max(s.times[0] for s in live), min(s.times[-1] for s in live)
    if end <= start:
        return 0.0
    chunks = sum(1 for s in live for t in s.times if start < t <= end)
    per_chunk = sum(s.tokens for s in live) / sum(len(s.times) for s in live)
    return chunks * per_chunk / (end - start)


def gaps_during_prefill(client: OpenAI, model: str, n: int, max_tokens: int,
                        prefill_tokens: int) -> dict:
    """``n`` streams decode; once all have started, a cold prompt of about
    ``prefill_tokens`` tokens arrives. Returns the running streams' gaps from
    then until the cold request's first token."""
    streams = [_Stream() for _ in range(n)]
    threads = [threading.Thread(target=_run_stream, args=(client, model, _prompt(100 + i),
                                                          max_tokens, s)) for i, s in enumerate(streams)]
    for t in threads:
        t.start()
    while not all(s.times for s in streams):
        time.sleep(0.01)
    # A fresh nonce in front: the prompt is cold however often the sweep runs.
    text = f"Run {time.time_ns()}. " + " ".join(
        f"Entry {i}: item {i} weighs {i * 13 % 101} grams." for i in range(prefill_tokens // 12))
    cold = _Stream()
    t0 = time.perf_counter()
    _run_stream(client, model, text, 1, cold)
    t1 = cold.times[0] if cold.times else time.perf_counter()
    for t in threads:
        t.join()
    gaps = [b - a for s in streams for a, b in zip(s.times, s.times[1:], strict=False) if t0 <= b <= t1]
    return {"cold_ttft_s": t1 - t0, "gaps": len(gaps), "p50_gap_s": percentile(gaps, 50),
            "p99_gap_s": percentile(gaps, 99), "max_gap_s": max(gaps, default=None)}


def run(args: argparse.Namespace) -> int:
    client = OpenAI(base_url=args.url, api_key=args.api_key, max_retries=0, timeout=600)
    if args.model is None:
        args.model = client.models.list().data[0].id
    counts = [int(x) for x in args.streams.split(",")]
    console = Console()
    rows = []
    for n in counts:
        streams = run_streams(client, args.model, n, args.max_tokens, offset=10 * n)
        rows.append({"streams": n, "tokens": sum(s.tokens for s in streams),
                     "decode_tok_s": decode_rate(streams), "steady_tok_s": steady_rate(streams)})
    base = rows[0]["decode_tok_s"] or 1.0
    steady_base = rows[0]["steady_tok_s"] or 1.0
    table = Table(title=f"decode throughput, {args.url}")
    for col in ("streams", "tokens", "aggregate tok/s", f"vs {counts[0]} stream(s)",
                "steady decode tok/s", f"vs {counts[0]} stream(s) "):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["streams"]), str(r["tokens"]), f"{r['decode_tok_s']:.1f}",
                      f"{r['decode_tok_s'] / base:.2f}x", f"{r['steady_tok_s']:.1f}",
                      f"{r['steady_tok_s'] / steady_base:.2f}x")
    console.print(table)
    result: dict = {"sweep": rows}
    if args.prefill_tokens:
        g = gaps_during_prefill(client, args.model, 4, 4 * args.max_tokens, args.prefill_tokens)
        result["prefill_interference"] = g
        console.print(f"4 streams decoding while a ~{args.prefill_tokens}-token cold prompt is admitted: "
                      f"cold TTFT {g['cold_ttft_s']:.1f} s; stream gaps in that window: "
                      f"n={g['gaps']}, p50 {_ms(g['p50_gap_s'])}, p99 {_ms(g['p99_gap_s'])}, "
                      f"max {_ms(g['max_gap_s'])}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v * 1000:.0f} ms"
