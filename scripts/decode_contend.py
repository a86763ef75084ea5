"""Decode speed quiet and beside busy processes, with the CPU share the process got.

    .venv/bin/python scripts/decode_contend.py [--contenders N] [--rounds R] [--steps S]

Loads the default model (``--dtype auto``, 2 threads), prefills ``--context`` random
tokens, then per round decodes ``--steps`` tokens quiet and again with N processes
running ``while True: pass`` beside it, as the server decodes (``ModelRuntime.decode``,
then ``sampling.argmax``). Prints tok/s and process CPU time / wall time for each. For
an A/B of two trees, run it alternately with ``PYTHONPATH`` set to each tree.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch

from segcache.config import ModelConfig, read_environment
from segcache.engine.sampling import argmax
from segcache.model.runtime import ModelRuntime
from segcache.model.weights import resolve_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contenders", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--context", type=int, default=2048)
    args = ap.parse_args()
    cache_dir = read_environment().cache_dir
    resolved = resolve_model(None, cache_dir, progress=False)
    rt = ModelRuntime.load(resolved, ModelConfig(dtype="auto", cache_dir=cache_dir, threads=2))
    n = args.context
    kv = rt.new_kv(n + args.steps)
    ids = torch.randint(0, 49000, (n,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        rt.prefill(ids, torch.arange(n), kv, 0)

        def decode(steps: int) -> None:
            tok = torch.tensor([int(ids[-1])])
            for i in range(steps):
                logits = rt.decode(tok, torch.tensor([n + i]), kv, n + i)
                tok = torch.tensor([argmax(logits[0])])

        decode(20)  # warm-up
        for _ in range(args.rounds):
            for busy in (0, args.contenders):
                procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
                time.sleep(0.3 if busy else 0)
                c0, w0 = time.process_time(), time.perf_counter()
                decode(args.steps)
                wall, cpu = time.perf_counter() - w0, time.process_time() - c0
                for p in procs:
                    p.kill()
                    p.wait()
                print(f"{'quiet' if not busy else f'beside {busy}':>9}: {args.steps / wall:6.1f} tok/s, "
                      f"cpu/wall {cpu / wall:.2f}", flush=True)


if __name__ == "__main__":
    main()
