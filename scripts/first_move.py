#!/usr/bin/env python
"""The first move of a block (issue 16): a request whose documents were used by
the request just before, in another order, against the same request cold.

Each round: purge the tenant's cache; send request A (four ~500-token documents in
one order); right after its answer, send request B (the same documents reordered)
and time its first token (the first move); purge; send B again (cold). Rounds
alternate nothing else, so the two TTFTs of a round see the same machine. Prints
the medians and their ratio.

    segcache serve --port 8000 &                       # --mode segments: marked blocks
    segcache serve --port 8000 --blend auto &          # --mode flat: plain text, chunked
    .venv/bin/python scripts/first_move.py --mode segments --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import httpx
from openai import OpenAI

from segcache.bench.corpus import Corpus
from segcache.kv.hashing import segment_digest

QUESTION = "Which of the documents above mentions a file? Answer in one sentence."


def documents(n: int, chars: int, seed: int) -> list[str]:
    corpus = Corpus(seed)
    return [f"## Document {i + 1}\n\n{corpus.prose(chars)}" for i in range(n)]


def body(docs: list[str], mode: str) -> tuple[list[dict], dict]:
    if mode == "segments":
        segs = [{"id": f"doc{i}", "hash": segment_digest(d), "content": d, "reuse": "anywhere"}
                for i, d in enumerate(docs)]
        return [{"role": "user", "content": QUESTION}], {"segments": segs}
    system = "Answer from these documents.\n\n" + "\n\n".join(docs)
    return [{"role": "system", "content": system}, {"role": "user", "content": QUESTION}], {}


def ttft(client: OpenAI, model: str, docs: list[str], mode: str) -> tuple[float, dict]:
    messages, extra = body(docs, mode)
    t0 = time.perf_counter()
    first = None
    usage: dict = {}
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body=extra)
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - t0
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
    return (first if first is not None else time.perf_counter() - t0), usage


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000/v1", help="OpenAI base URL (default: %(default)s)")
    p.add_argument("--api-key", default="local")
    p.add_argument("--mode", choices=("segments", "flat"), default="segments",
                   help="segments: documents as segments marked reuse anywhere; flat: one system "
                        "message of plain text (the server needs --blend auto) (default: %(default)s)")
    p.add_argument("--docs", type=int, default=4, help="documents (default: %(default)s)")
    p.add_argument("--doc-chars", type=int, default=2000, help="characters each (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="rounds (default: %(default)s)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    client = OpenAI(base_url=args.url, api_key=args.api_key, max_retries=0)
    model = client.models.list().data[0].id
    purge_url = args.url.rstrip("/") + "/cache"
    headers = {"Authorization": f"Bearer {args.api_key}"}
    moved, cold, rows = [], [], []
    for r in range(args.rounds):
        docs = documents(args.docs, args.doc_chars, seed=r)
        order = list(reversed(docs))
        httpx.delete(purge_url, headers=headers, timeout=60).raise_for_status()
        ttft(client, model, docs, args.mode)
        t_moved, u_moved = ttft(client, model, order, args.mode)
        httpx.delete(purge_url, headers=headers, timeout=60).raise_for_status()
        t_cold, u_cold = ttft(client, model, order, args.mode)
        blended = (u_moved.get("segcache") or {}).get("blended_tokens")
        moved.append(t_moved)
        cold.append(t_cold)
        rows.append({"round": r, "prompt_tokens": u_moved.get("prompt_tokens"), "blended_tokens": blended,
                     "first_move_ms": round(t_moved * 1000, 1), "cold_ms": round(t_cold * 1000, 1)})
        print(f"round {r + 1}: {u_moved.get('prompt_tokens')} prompt tokens, {blended} blended; "
              f"first move {t_moved * 1000:.0f} ms, cold {t_cold * 1000:.0f} ms", file=sys.stderr)
    m, c = statistics.median(moved), statistics.median(cold)
    print(f"| mode | first move TTFT (median) | cold TTFT (median) | cold / first move |\n"
          f"| --- | --- | --- | --- |\n| {args.mode} | {m * 1000:.0f} ms | {c * 1000:.0f} ms | {c / m:.2f}x |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "mode": args.mode,
                                         "rows": rows, "ratio": c / m}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
