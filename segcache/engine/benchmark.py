"""``segcache bench engine``: prefill and decode tokens/s of the model runtime next
to Hugging Face transformers' ``LlamaForCausalLM`` on the same weights, dtype and
thread count, in the same process, so the ratio holds on whatever CPU runs it.

Prefill: one sequence of N random token ids from an empty cache (median of
``--repeats``); segcache's in chunks of ``--prefill-chunk`` tokens, as the server
prefills (``SchedulerConfig.prefill_chunk``), or in one call with 0. Decode: ``--decode-tokens`` single-token steps after a prefill of
``--decode-context`` tokens (each repeat restarts at the same position).
Imports torch and transformers only inside ``run`` (the CLI imports this module
to build its parser).

``--contend N`` starts N busy processes (a pure-Python spin each, at normal priority) and
measures every figure twice per repeat, quiet and with them running (resumed with SIGCONT,
paused with SIGSTOP, so both conditions alternate within one run); the table then gives the
contended rate as a share of the quiet one. On 2 cores a kernel whose parallel regions wait
for every thread collapses here: one busy neighbour parks a worker in most regions.
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from segcache.config import DTYPES, SWITCH, default_cache_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="GGUF file or HF directory (default: SmolLM2-135M)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="converted weights and kernels (env SEGCACHE_CACHE_DIR; default: ~/.cache/segcache)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="segcache dtype; the transformers side runs bfloat16 for 'auto' where the "
                             "CPU multiplies bfloat16 natively, else float32")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for both engines")
    parser.add_argument("--sizes", default="512,2048,4096", help="prefill lengths, comma-separated")
    parser.add_argument("--prefill-chunk", type=_chunk, default=_server_chunk(),
                        help="segcache prefills in chunks of this many tokens, as the server does "
                             "(default: the server's); 0: the whole prompt in one call")
    parser.add_argument("--decode-context", type=int, default=2048, help="context before decoding")
    parser.add_argument("--decode-tokens", type=int, default=32, help="decode steps per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure (median reported)")
    parser.add_argument("--no-reference", action="store_true", help="skip transformers")
    parser.add_argument("--contend", type=int, default=0, metavar="N",
                        help="also measure every figure with N busy processes beside it (quiet and "
                             "contended alternate in each repeat); reports contended/quiet")
    parser.add_argument("--share-cores", choices=SWITCH, default="on",
                        help="segcache's --share-cores: on, a bfloat16 prefill slice runs torch at one "
                             "thread while other processes hold the cores (default: on)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here too")


def _chunk(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0: one call), got {value}")
    return value


def _server_chunk() -> int:
    from segcache.config import SchedulerConfig

    return SchedulerConfig().prefill_chunk


def _seconds(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class _Segcache:
    name = "segcache"

    def __init__(self, resolved, dtype: str, cache_dir: Path, threads: int, chunk: int = 0,
                 share_cores: str = "on") -> None:
        from segcache.config import ModelConfig
        from segcache.model.runtime import ModelRuntime

        cfg = ModelConfig(path=str(resolved.source), dtype=dtype, cache_dir=cache_dir, threads=threads,
                          share_cores=share_cores)
        self.rt = ModelRuntime.load(resolved, cfg)
        self.chunk = chunk
        plan = self.rt.plan
        weights = f"{self.rt.block_formats} block" if plan.uses_kernels else "dense"
        self.describe = (f"plan {plan.name}: prefill {_short(plan.prefill_dtype)}"
                         f"{f' in {chunk}-token chunks' if chunk else ' in one call'}, decode "
                         f"{_short(plan.decode_dtype)} activations with {weights} weights "
                         f"({plan.decode_route().value}), KV {_short(plan.kv_dtype)}"
                         f"{', prefill slices at 1 thread under load' if self.rt.core_share else ''}")

    def prefill(self, ids) -> Callable[[], None]:
        import torch

        n = len(ids)
        kv = self.rt.new_kv(n)
        step = self.chunk or n

        def run() -> None:
            for a in range(0, n, step):
                b = min(n, a + step)
                last = torch.tensor([b - a - 1]) if b == n else torch.empty(0, dtype=torch.long)
                self.rt.prefill(ids[a:b], torch.arange(a, b), kv, a, last)

        return run

    def decode(self, ids, steps: int) -> Callable[[], None]:
        import torch

        from segcache.engine.sampling import argmax

        n = len(ids)
        kv = self.rt.new_kv(n + steps)
        self.rt.prefill(ids, torch.arange(n), kv, 0)

        def run() -> None:  # the server's greedy step: the runtime's decode, then sampling.argmax
            tok = torch.tensor([int(ids[-1])])
            for i in range(steps):
                logits = self.rt.decode(tok, torch.tensor([n + i]), kv, n + i)
                tok = torch.tensor([argmax(logits[0])])

        return run


class _Transformers:
    name = "transformers"

    def __init__(self, directory: Path, dtype) -> None:
        import transformers

        self.model = transformers.LlamaForCausalLM.from_pretrained(str(directory), dtype=dtype).eval()
        attn = getattr(self.model.config, "_attn_implementation", "?")
        self.describe = f"transformers {transformers.__version__} {_short(dtype)}, attention {attn}"

    def prefill(self, ids) -> Callable[[], None]:
        return lambda: self.model(ids[None], use_cache=True, logits_to_keep=1)

    def decode(self, ids, steps: int) -> Callable[[], None]:
        n = len(ids)
        out = self.model(ids[None], use_cache=True, logits_to_keep=1)
        cache = out.past_key_values

        def run() -> None:
            extra = cache.get_seq_length() - n
            if extra:
                cache.crop(-extra)  # transformers 5: a negative count removes that many tokens
            tok = ids[-1:].view(1, 1)
            for _ in range(steps):
                step = self.model(tok, past_key_values=cache, use_cache=True)
                tok = step.logits[:, -1].argmax(-1, keepdim=True)

        return run


def _short(dtype) -> str:
    return str(dtype).removeprefix("torch.")


class Contenders:
    """N busy processes (``python -c 'while True: pass'``), created stopped; ``running()``
    lets them run for the length of a ``with`` block. Killed on ``close``."""

    def __init__(self, n: int) -> None:
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
        self._signal(signal.SIGSTOP)

    def _signal(self, sig: int) -> None:
        for p in self.procs:
            p.send_signal(sig)

    def running(self):
        outer = self

        class _Running:
            def __enter__(self):
                outer._signal(signal.SIGCONT)
                time.sleep(0.05)  # let the scheduler see them before timing starts

            def __exit__(self, *exc):
                outer._signal(signal.SIGSTOP)

        return _Running()

    def close(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


def _conditions(contenders: Contenders | None) -> list[tuple[str, object]]:
    """(figure suffix, context manager) per condition measured in each repeat."""
    import contextlib

    quiet = ("", contextlib.nullcontext)
    if contenders is None:
        return [quiet]
    return [quiet, (f"+contend{len(contenders.procs)}", contenders.running)]


def _measure(engines: list, sizes: list[int], args, vocab: int,
             contenders: Contenders | None = None) -> dict[str, dict[str, float]]:
    """tokens/s per engine and figure. The engines take turns within every repeat,
    so a load that drifts during the run (a shared host) weighs on both alike."""
    import torch

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (max(sizes + [args.decode_context]),), generator=gen)
    out: dict[str, dict[str, float]] = {e.name: {} for e in engines}
    with torch.inference_mode():
        for e in engines:
            e.prefill(ids[:64])()  # warm-up: allocator, kernels, thread pool
        figures = [(f"prefill@{n}", n, [e.prefill(ids[:n]) for e in engines]) for n in sizes]
        decodes = [e.decode(ids[:args.decode_context], args.decode_tokens) for e in engines]
        for run in decodes:
            run()  # warm-up
        figures.append((f"decode@{args.decode_context}", args.decode_tokens, decodes))
        conditions = _conditions(contenders)
        for key, tokens, runs in figures:
            times = {(suffix, i): [] for suffix, _ in conditions for i in range(len(engines))}
            for _ in range(args.repeats):
                for suffix, condition in conditions:
                    with condition():
                        for i, run in enumerate(runs):
                            times[suffix, i].append(_seconds(run))
            for suffix, _ in conditions:
                for i, e in enumerate(engines):
                    out[e.name][key + suffix] = tokens / statistics.median(times[suffix, i])
                print("  " + key + suffix + ": " + ", ".join(f"{e.name} {out[e.name][key + suffix]:.1f} tok/s"
                                                            for e in engines), flush=True)
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from segcache.model.plan import cpu_has_bf16_gemm
    from segcache.model.weights import load_arch, resolve_model

    torch.set_num_threads(args.threads)
    cache_dir = args.cache_dir or default_cache_dir()
    sizes = [int(s) for s in str(args.sizes).split(",") if s.strip()]
    resolved = resolve_model(args.model, cache_dir)
    vocab = load_arch(resolved.directory).vocab_size
    console = Console()

    t0 = time.perf_counter()
    engines = [_Segcache(resolved, args.dtype, cache_dir, args.threads, args.prefill_chunk, args.share_cores)]
    console.print(f"segcache: {engines[0].describe} (loaded in {time.perf_counter() - t0:.1f} s)")
    if not args.no_reference:
        ref_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
            args.dtype, torch.bfloat16 if cpu_has_bf16_gemm() else torch.float32)
        engines.append(_Transformers(resolved.directory, ref_dtype))
        console.print(f"reference: {engines[1].describe}")
    contenders = Contenders(args.contend) if args.contend > 0 else None
    try:
        results = _measure(engines, sizes, args, vocab, contenders)
    finally:
        if contenders is not None:
            contenders.close()
    ours_desc = engines[0].describe
    ref_desc = engines[1].describe if len(engines) > 1 else None

    table = Table(title=f"segcache bench engine: {resolved.name}, --dtype {args.dtype}, "
                        f"{args.threads} threads, {_cpu_name()}")
    table.add_column("figure")
    table.add_column("segcache tok/s", justify="right")
    if ref_desc:
        table.add_column("transformers tok/s", justify="right")
        table.add_column("ratio", justify="right")
    if contenders is not None:
        table.add_column("segcache contended / quiet", justify="right")
    for key, value in results["segcache"].items():
        row = [key.replace("@", " @"), f"{value:.1f}"]
        if ref_desc:
            other = results["transformers"][key]
            row += [f"{other:.1f}", f"{value / other:.2f}x"]
        if contenders is not None:
            quiet = results["segcache"].get(key.split("+contend")[0])
            row.append(f"{value / quiet:.0%}" if "+contend" in key and quiet else "")
        table.add_row(*row)
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps({
            "model": resolved.name, "dtype": args.dtype, "threads": args.threads, "cpu": _cpu_name(),
            "torch": torch.__version__, "segcache": ours_desc, "reference": ref_desc,
            "repeats": args.repeats, "decode_tokens": args.decode_tokens, "tokens_per_s": results,
            "prefill_chunk": args.prefill_chunk, "contend": args.contend, "share_cores": args.share_cores,
        }, indent=2))
    return 0
