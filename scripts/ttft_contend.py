#!/usr/bin/env python
"""Time to first token of cold prompts quiet and beside busy processes, through a server.

Sends ``--rounds`` pairs of requests, each a fresh ~``--chars``-character prompt (a cache
miss: the whole prompt is prefilled) with ``max_tokens`` 1: one with the machine quiet,
one with ``--contenders`` processes running ``while True: pass`` beside the server.
Prints each TTFT and the median contended / quiet ratio. Compare servers started with
``--share-cores on`` and ``off`` (issue 15: a bfloat16 prefill slice drops to one torch
thread while another process holds a core):

    segcache serve --port 8000 --share-cores on &
    .venv/bin/python scripts/ttft_contend.py --url http://127.0.0.1:8000/v1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from openai import OpenAI

from segcache.bench.corpus import Corpus


def ttft(client: OpenAI, model: str, text: str) -> float:
    t0 = time.perf_counter()
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text + "\n\nSummarise the above in one line."}],
        max_tokens=1, temperature=0.0, stream=True)
    first = None
    for _ in stream:
        if first is None:
            first = time.perf_counter() - t0
    return first if first is not None else time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--chars", type=int, default=6000, help="prompt length (~4.5 characters a token)")
    ap.add_argument("--contenders", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0, help="corpus seed: use another one per server run")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    client = OpenAI(base_url=args.url, api_key="none")
    model = client.models.list().data[0].id
    corpus = Corpus(args.seed)
    ttft(client, model, corpus.prose(args.chars))  # warm-up
    rows = []
    for r in range(args.rounds):
        for busy in (0, args.contenders):
            procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
            try:
                time.sleep(0.3 if busy else 0.1)
                t = ttft(client, model, f"Round {r}, {'busy' if busy else 'quiet'}.\n\n{corpus.prose(args.chars)}")
            finally:
                for p in procs:
                    p.kill()
                    p.wait()
            rows.append({"round": r, "contenders": busy, "ttft_s": t})
            print(f"round {r} {'beside ' + str(busy) if busy else 'quiet':>9}: TTFT {t * 1000:7.0f} ms", flush=True)
    quiet = statistics.median(x["ttft_s"] for x in rows if not x["contenders"])
    busy = statistics.median(x["ttft_s"] for x in rows if x["contenders"])
    print(f"median TTFT quiet {quiet * 1000:.0f} ms, beside {args.contenders}: {busy * 1000:.0f} ms "
          f"(prefill rate kept: {quiet / busy:.0%})")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "quiet_s": quiet, "busy_s": busy}, indent=2))


if __name__ == "__main__":
    main()
