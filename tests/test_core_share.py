"""Sharing the cores (``segcache.model.threads``): a bfloat16 prefill slice runs torch at one
thread while other processes keep the cores busy, and its KV and logits are the same bits
as at the configured count (the products whose bits depend on it run as row halves)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from segcache.config import read_environment
from segcache.model import threads
from segcache.model.llama import LlamaModel
from segcache.model.plan import PREFILL_ATTENTION_TOKENS, ExecPlan
from segcache.model.runtime import ModelRuntime, _products
from segcache.model.threads import (
    CoreShare,
    halves_suffice,
    others_cpu_seconds,
    unstable_gemm_shapes,
)
from tests.test_model_fast_paths import ARCH, auto_plan, prompt


class Machine:
    """A fake clock and other processes' CPU-seconds meter."""

    def __init__(self) -> None:
        self.now = 0.0
        self.used = 0.0

    def run(self, seconds: float, cores: float) -> None:
        """``seconds`` pass with the other processes using ``cores``."""
        self.now += seconds
        self.used += seconds * cores

    def share(self, threads: int = 2, cpus: int = 2) -> CoreShare:
        return CoreShare(threads, 256, cpus=cpus, meter=lambda: self.used, clock=lambda: self.now,
                         runnable=lambda: self.runnable)

    runnable = 2  # what procs_running reads


def test_a_busy_neighbour_takes_the_prefill_to_one_thread_and_back():
    m = Machine()
    cs = m.share()
    counts = []
    for cores in (0.0, 0.15, 0.0, 1.0, 1.0, 0.7, 1.0, 0.0, 0.0, 0.1):
        m.run(0.1, cores)
        counts.append(cs.threads_now())
    # quiet and noise (0.15 of a core) keep 2; one busy process -> 1 within a window, and
    # 2 again a window after it stops (the average of two windows falls under 0.3)
    assert counts == [2, 2, 2, 1, 1, 1, 1, 1, 2, 2]
    assert cs.shared_slices == 5
    m.run(0.01, 2.0)  # a window under 50 ms is not read: the last decision stands
    assert cs.threads_now() == 2
    for _ in range(2):
        m.run(0.1, 1.0)
        cs.threads_now()
    assert cs.threads_now() == 1
    m.run(0.01, 0.0)  # the neighbour stops; too short a window to read
    assert cs.threads_now() == 1
    m.runnable = 1  # only the asking thread runs: back at once
    assert cs.threads_now() == 2
    m.run(0.2, 0.0)
    assert cs.threads_now() == 2


def test_spare_cores_and_wide_teams_keep_their_threads():
    m = Machine()
    spare, wide, crowded = m.share(2, cpus=4), m.share(4, cpus=4), m.share(2, cpus=4)
    m.run(0.2, 1.0)
    assert spare.threads_now() == 2  # one busy process leaves two of four cores free
    assert wide.threads_now() == 4  # only measured on 2 cores: wider teams are left alone
    counts = []
    for _ in range(3):
        m.run(0.2, 3.0)  # three busy processes leave one of four cores
        counts.append(crowded.threads_now())
    assert counts == [2, 2, 1]  # the average of two windows: (1 + 3) / 2, (2 + 3) / 2 > 2.3


def test_each_slice_runs_at_the_chosen_count_and_the_count_comes_back():
    before = torch.get_num_threads()
    seen = []

    def slices():
        for i in range(3):
            seen.append(torch.get_num_threads())
            yield i
        seen.append(torch.get_num_threads())
        return "logits"

    m = Machine()
    cs = m.share(threads=max(2, before))
    choices = iter([1, max(2, before), 1, 1])
    cs.threads_now = lambda: next(choices)
    steps = cs.run(slices())
    between = []
    for _ in steps:
        between.append(torch.get_num_threads())
    assert seen == [1, max(2, before), 1, 1]
    assert between == [before] * 3
    cs.threads_now = lambda: 1
    with pytest.raises(StopIteration) as stop:
        next(cs.run(iter_return("logits")))
    assert stop.value.value == "logits"
    assert torch.get_num_threads() == before


def iter_return(value):
    return value
    yield  # a generator that returns at once


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_other_processes_cpu_is_measured_and_this_ones_is_not():
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)
        t0, m0 = time.monotonic(), others_cpu_seconds()
        end = time.process_time() + 0.5
        while time.process_time() < end:  # this process busy too: not counted
            pass
        rate = (others_cpu_seconds() - m0) / (time.monotonic() - t0)
    finally:
        child.kill()
        child.wait()
    # the child had a core of its own or half of one (2 cores, this loop beside it)
    assert 0.35 < rate < 1.5


def test_the_products_whose_bits_depend_on_the_thread_count_are_kept_per_machine(tmp_path, monkeypatch):
    found = unstable_gemm_shapes([(64, 48), (96, 64)], 40, 2, torch.bfloat16, tmp_path)
    assert all(1 <= m <= 40 and (k, n) in ((64, 48), (96, 64)) for m, k, n in found)
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(48, 64, generator=g) * 0.1).bfloat16()
    before = torch.get_num_threads()
    try:
        for m in (1, 17, 40):
            x = torch.randn(m, 64, generator=g).bfloat16()
            torch.set_num_threads(2)
            a = F.linear(x, w)
            torch.set_num_threads(1)
            b = F.linear(x, w)
            if (m, 64, 48) not in found:
                assert torch.equal(a, b)
    finally:
        torch.set_num_threads(before)
    assert len(list((tmp_path / "kernels").glob("gemm-threads-*.json"))) == 1

    def no_gemm(*a, **k):
        raise AssertionError("the kept result is read, not computed again")

    monkeypatch.setattr(threads.F, "linear", no_gemm)
    assert unstable_gemm_shapes([(96, 64), (64, 48)], 40, 2, torch.bfloat16, tmp_path) == found


def test_split_products_run_as_two_row_halves(monkeypatch):
    from segcache.model import llama

    rows = []
    real = llama.linear
    monkeypatch.setattr(llama, "linear", lambda x, w, b=None: rows.append(x.shape[0]) or real(x, w, b))
    k, n = ARCH.intermediate_size, ARCH.hidden_size
    x, w = torch.randn(21, k), torch.randn(n, k)
    out = LlamaModel(ARCH, split_products=frozenset({(21, k, n)}))._linear(x, w)
    assert rows == [10, 11]
    assert torch.equal(out, torch.cat([F.linear(x[:10], w), F.linear(x[10:], w)]))
    rows.clear()
    LlamaModel(ARCH, split_products=frozenset({(21, k, n), (10, k, n), (1, k, n)}))._linear(x, w)
    assert rows == [5, 5, 11]  # 10 splits again; a single row cannot
    assert halves_suffice(frozenset({(21, k, n), (10, k, n)}))
    assert not halves_suffice(frozenset({(2, k, n), (1, k, n)}))


def test_the_split_is_part_of_the_fingerprint_and_the_description():
    from tests.test_model_fast_paths import state_dict

    sd = state_dict()
    plan = ExecPlan.dense(torch.bfloat16)
    a = ModelRuntime(ARCH, sd, plan, source_digest="w")
    b = ModelRuntime(ARCH, sd, plan, source_digest="w", split_products=frozenset({(32, 64, 64)}))
    assert a.fingerprint != b.fingerprint
    assert auto_plan(bf16_gemm=True).shares_cores
    assert not auto_plan(bf16_gemm=False).shares_cores and not plan.shares_cores


def _chunks(rt: ModelRuntime, ids: torch.Tensor, cuts: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    kv = torch.zeros_like(rt.new_kv(len(ids)))
    logits = []
    with torch.inference_mode():
        for a, b in zip(cuts, cuts[1:], strict=False):
            logits.append(rt.prefill(ids[a:b], torch.arange(a, b), kv, a, torch.tensor([b - a - 1])))
    return kv, logits


@pytest.mark.slow
def test_real_model_prefill_has_the_same_bits_at_one_thread(real_model_dir, kernels):
    """The default model on the bfloat16-prefill plan (selected, whatever this CPU is):
    chunks of 256 (the down projection's product that differs on the Intel host), of
    every size from 33 up, and 1-token ones, with the slices at one thread and at two."""
    from segcache.model.weights import load_arch, load_state_dict

    arch, sd = load_arch(real_model_dir), load_state_dict(real_model_dir)
    plan = auto_plan(bf16_gemm=True, arch=arch)
    split = unstable_gemm_shapes(_products(arch), PREFILL_ATTENTION_TOKENS, 2, plan.prefill_dtype,
                                 read_environment().cache_dir)
    share = CoreShare(2, PREFILL_ATTENTION_TOKENS)
    rt = ModelRuntime(arch, sd, plan, kernels=kernels, core_share=share, split_products=split)
    ids = prompt(700, seed=5) + 200
    cuts = [0, 100, 356, 612, 613, 650, 700]
    seen = []
    linear = rt._dense_model._linear
    rt._dense_model._linear = lambda *a: seen.append(torch.get_num_threads()) or linear(*a)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        share.threads_now = lambda: 2
        want = _chunks(rt, ids, cuts)
        assert set(seen) == {2}
        seen.clear()
        share.threads_now = lambda: 1
        got = _chunks(rt, ids, cuts)
        assert set(seen) == {1}
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got[0], want[0])
    assert all(torch.equal(a, b) for a, b in zip(got[1], want[1], strict=True))


OPENMP_PROBE = """
import json, os, threading, torch
from segcache.model.threads import leave_openmp_to_other_threads
n0 = torch.get_num_threads()
x = torch.randn(512, 4096)
(x * x).sum()  # a parallel region: this thread's team exists now
before = len(os.listdir("/proc/self/task"))
ok = leave_openmp_to_other_threads()
after = len(os.listdir("/proc/self/task"))
here = torch.get_num_threads()
(x * x).sum()  # on one thread now: no team again
again = len(os.listdir("/proc/self/task"))
other = []
t = threading.Thread(target=lambda: other.append(torch.get_num_threads()))
t.start()
t.join()
print(json.dumps({"n0": n0, "ok": ok, "before": before, "after": after, "again": again,
                  "here": here, "other": other[0]}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_main_thread_leaves_openmp_to_the_engine_thread():
    """``segcache serve`` ends the main thread's OpenMP team once the engine is built: the
    main thread's parallel regions run on one thread from then on, other threads keep the
    configured count (the engine thread's team is then the only one)."""
    import json

    out = subprocess.run([sys.executable, "-c", OPENMP_PROBE], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["ok"] and r["here"] == 1 and r["other"] == r["n0"]
    if r["n0"] > 1:
        assert r["after"] == r["before"] - (r["n0"] - 1) == r["again"]
