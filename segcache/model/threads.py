"""Sharing the cores with other processes: torch's thread count for each bfloat16 prefill slice.

The bfloat16 prefill (AMX and AVX512-BF16 hosts) runs in torch, whose parallel regions
(OpenMP) end in a barrier that waits for every thread of the team. When another process
holds one of two cores, the thread the OS parks stalls every region until it runs again:
measured on the 2-core Intel host, ``segcache bench engine --contend 1`` kept 18% of the
quiet prefill rate at 512 tokens and 7% at 2,048. One torch thread gets a core to itself
beside one busy process and keeps 63-76% of the quiet two-thread rate.

So ``CoreShare`` measures, around every slice of a prefill, how much CPU *other* processes
use (the machine's busy time in ``/proc/stat`` less this process's own); while they keep
the cores torch's threads need busy, the slice runs torch at one thread, and at the
configured count again once they stop. (A count of runnable threads, ``procs_running``
less this process's own, was tried first: the two reads race with this process's own
threads going to sleep, and a quiet machine read as busy in 2 of 10 samples. It serves
only to see at once that a neighbour has stopped.) A reading costs ~15 us against a slice
of tens of milliseconds.

Bits: a prefill's KV must not depend on that choice (cached == cold, whatever the load
was when each was computed). torch's elementwise ops, norms and flash attention compute
each output in one fixed loop whatever the thread count, but oneDNN's GEMM picks its
blocking by thread count for some shapes (on the Intel host: 256 x 1536 -> 576, the MLP's
down projection of a full 256-token chunk, and many products of more rows).
``unstable_gemm_shapes`` finds them, for the model's projections and every row count the
slices can have, by computing each at both thread counts (once per machine: the result is
kept in the cache directory), and ``LlamaModel`` computes those as two row halves instead.

One team: ``leave_openmp_to_other_threads`` lets the thread that loaded the model give up
its OpenMP threads to the engine thread that runs it (two teams on two cores make libgomp
throttle both).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Generator, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger("segcache.model")

# (rows M, inputs K, outputs N) of one product x [M, K] @ w.T [K, N].
Shape = tuple[int, int, int]


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def busy_cpu_seconds() -> float | None:
    """CPU seconds every core of the machine has spent busy since boot (``/proc/stat``,
    in clock ticks: 10 ms here), or None where ``/proc`` does not say (not Linux)."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if len(fields) < 8 or fields[0] != b"cpu":
        return None
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[1:8])
    return (user + nice + system + irq + softirq) / _CLK_TCK


def procs_running() -> int | None:
    """Threads of the whole machine running or runnable now (``/proc/stat``), this one
    included; None where ``/proc`` does not say."""
    try:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"procs_running"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def others_cpu_seconds() -> float:
    """CPU seconds the machine's other processes have used (busy time less this
    process's own); only differences mean anything. 0 where ``/proc`` does not say."""
    busy = busy_cpu_seconds()
    return 0.0 if busy is None else busy - time.process_time()


class CoreShare:
    """Chooses torch's thread count for each prefill slice of up to ``max_rows`` tokens:
    ``threads``, or 1 while other processes keep more than ``cpus - threads`` cores busy.

    ``meter`` gives the other processes' CPU seconds (``others_cpu_seconds``; tests pass
    their own); their rate is taken over windows of at least ``window_s`` (the counters
    tick every 10 ms: over 50 ms a quiet machine reads within +-0.16 of a core, one busy
    process beside a two-thread prefill 0.1-1.2, ~0.7 on average, and one beside a
    one-thread prefill ~1.0), at every slice's start and end, and averaged with the last
    window's. Above ``cpus - threads + 0.3`` cores the next slice runs at one thread. The
    way back is quicker: a slice that starts at one thread while ``runnable`` (the
    machine's runnable threads, ``procs_running``) counts only the thread asking runs at
    the full count again (a busy neighbour is always runnable, so that count never
    misses one; it may read more than is there, as this process's threads come and go,
    which only delays the return to the next window).

    Only for ``threads`` <= ``MAX_THREADS``: measured on 2 cores; a wider team dropped to
    one thread would give up more than it saves."""

    MAX_THREADS = 2
    MARGIN = 0.3  # cores of other processes' use, above the spare ones, that count as busy

    def __init__(self, threads: int, max_rows: int, cpus: int | None = None,
                 meter: Callable[[], float] = others_cpu_seconds, clock: Callable[[], float] = time.monotonic,
                 runnable: Callable[[], int | None] = procs_running, window_s: float = 0.05) -> None:
        self.threads = threads
        self.max_rows = max_rows  # prefills of more rows keep ``threads`` (not checked beyond)
        self.cpus = cpus if cpus is not None else len(os.sched_getaffinity(0))
        self.meter, self.clock, self.runnable, self.window_s = meter, clock, runnable, window_s
        self.busy = 0.0  # other processes' cores in use, recently
        self._t0, self._m0 = clock(), meter()
        self._shared = False  # the last slice ran at one thread
        self.shared_slices = 0  # slices run at one thread (for logs and tests)

    def observe(self) -> None:
        """Take a window's rate if at least ``window_s`` has passed since the last."""
        now = self.clock()
        if now - self._t0 < self.window_s:
            return
        used = self.meter()
        rate = max(0.0, (used - self._m0) / (now - self._t0))
        self.busy = (self.busy + rate) / 2
        self._t0, self._m0 = now, used

    def threads_now(self) -> int:
        """The thread count for the slice about to run."""
        self.observe()
        if self._shared and self.runnable() == 1:
            self.busy = 0.0  # this thread is all that runs: the neighbour has stopped
        self._shared = 1 < self.threads <= self.MAX_THREADS and self.busy > self.cpus - self.threads + self.MARGIN
        if self._shared:
            self.shared_slices += 1
            return 1
        return self.threads

    def run(self, steps: Generator[int, None, torch.Tensor]) -> Generator[int, None, torch.Tensor]:
        """``steps`` with each resume at ``threads_now()`` torch threads, the count put
        back at every yield (the caller may decode between slices, at full width)."""
        before = torch.get_num_threads()
        try:
            while True:
                n = self.threads_now()
                if n != before:
                    torch.set_num_threads(n)
                try:
                    value = next(steps)
                except StopIteration as stop:
                    return stop.value
                finally:
                    if n != before:
                        torch.set_num_threads(before)
                    self.observe()
                yield value
        finally:
            steps.close()


def _machine_key() -> str:
    """What oneDNN's choices depend on: the CPU (model and flags) and torch's build."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = "".join(sorted({line for line in f if line.startswith(("model name", "flags"))}))
    except OSError:
        pass
    return f"{torch.__version__}|{torch.backends.mkldnn.is_available()}|{cpu}"


def unstable_gemm_shapes(products: Iterable[tuple[int, int]], max_rows: int, threads: int,
                         dtype: torch.dtype, cache_dir: Path | None = None) -> frozenset[Shape]:
    """The (M, K, N) with 1 <= M <= ``max_rows`` for which ``F.linear`` of an [M, K]
    ``dtype`` matrix by an [N, K] one gives other bits at 1 and at ``threads`` threads,
    for each (K, N) of ``products``. Found by computing every one of them at both counts
    (~3 s for the default model); kept in ``cache_dir`` per machine, torch and shapes."""
    products = sorted(set(products))
    key = json.dumps([_machine_key(), str(dtype), threads, max_rows, products])
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / "kernels" / f"gemm-threads-{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"
        try:
            return frozenset(tuple(s) for s in json.loads(path.read_text())["unstable"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    log.info("checking which of %d x %d products of torch's %s GEMM give other bits at 1 and %d "
             "threads (once per machine and torch version, a few seconds)", len(products), max_rows,
             str(dtype).removeprefix("torch."), threads)
    g = torch.Generator().manual_seed(0)
    inputs = {k: torch.randn(max_rows, k, generator=g).to(dtype) for k in {k for k, _ in products}}
    weights = {(k, n): (torch.randn(n, k, generator=g) * k ** -0.5).to(dtype) for k, n in products}
    before = torch.get_num_threads()
    unstable = []
    try:
        for k, n in products:
            for lo in range(1, max_rows + 1, 32):  # 32 row counts at a time: bounded memory
                rows = range(lo, min(max_rows, lo + 31) + 1)
                results = {}
                for t in (threads, 1):
                    torch.set_num_threads(t)
                    with torch.inference_mode():
                        results[t] = [F.linear(inputs[k][:m], weights[(k, n)]) for m in rows]
                unstable += [(m, k, n) for m, a, b in zip(rows, results[threads], results[1], strict=True)
                             if not torch.equal(a, b)]
    finally:
        torch.set_num_threads(before)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"key": key, "unstable": unstable}))
            tmp.replace(path)
        except OSError as e:
            log.warning("could not keep the GEMM thread check in %s: %s", path, e)
    return frozenset(unstable)


def halves_suffice(unstable: frozenset[Shape]) -> bool:
    """Whether computing each product of ``unstable`` as two row halves (recursively, as
    ``LlamaModel`` does) ends in products whose bits do not depend on the thread count."""

    def ok(m: int, k: int, n: int) -> bool:
        return (m, k, n) not in unstable or (m >= 2 and ok(m // 2, k, n) and ok(m - m // 2, k, n))

    return all(ok(*shape) for shape in unstable)


def _openmp_runtime():
    """The OpenMP runtime loaded in this process (libgomp, LLVM's or Intel's), or None."""
    import ctypes

    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if ".so" in line})
    except OSError:
        return None
    for path in paths:
        if Path(path).name.startswith(("libgomp", "libomp", "libiomp")):
            try:
                return ctypes.CDLL(path)
            except OSError:
                continue
    return None


def leave_openmp_to_other_threads() -> bool:
    """The calling thread ends its team of OpenMP threads and runs its own parallel regions
    on one thread from now on (its ``omp_set_num_threads``; other threads keep theirs).
    Returns whether the OpenMP runtime did. ``Engine.hand_over_threads`` calls it on the
    thread that built the engine (``segcache serve`` and ``generate``, Ray replicas).

    Why: the main thread starts a team while it loads the model, and the engine thread,
    which runs the model from then on, starts its own. libgomp counts the threads of every
    team, and once they outnumber the cores it throttles every wait to ~100 spins before a
    thread sleeps, so each of the thousands of parallel regions of a prefill wakes its
    workers from sleep. On the 2-core Intel host a cold 1,583-token prompt through the
    server took 1.37-1.68 s to its first token with both teams and 0.84-1.00 s without the
    main thread's (a bfloat16 multiply of 256 x 1536 on a second thread: 112 against 38 us)."""
    omp = _openmp_runtime()
    if omp is None or not hasattr(omp, "omp_pause_resource_all"):
        return False
    omp.omp_set_num_threads(1)
    return omp.omp_pause_resource_all(2) == 0  # omp_pause_hard: the team's threads end
