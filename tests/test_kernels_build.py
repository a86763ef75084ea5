"""The kernels are built from csrc/, loudly: a failed build says why, the fingerprint's
kernel version follows the sources, the default plan on x86-64 is the kernel plan, and the
worker pool gives the same bits whatever the thread count or the callers."""

from __future__ import annotations

import platform
import shutil
import stat
import threading
from pathlib import Path

import pytest
import torch

from segcache.config import read_environment
from segcache.model import kernels as K
from segcache.model.quant import BlockLinear


def _fake_compiler(tmp_path, message: str):
    cc = tmp_path / "fakecc"
    cc.write_text(f"#!/bin/sh\necho 'fakecc 1.0'\n[ \"$1\" = --version ] && exit 0\necho '{message}' >&2\nexit 1\n")
    cc.chmod(cc.stat().st_mode | stat.S_IEXEC)
    return cc


def test_failed_build_reports_the_compilers_output(tmp_path, monkeypatch, caplog):
    if K.unsupported_reason():
        pytest.skip(K.unsupported_reason())
    monkeypatch.setenv("CC", str(_fake_compiler(tmp_path, "kernels.h:1: error: planted failure")))
    probe = K.probe_kernels(tmp_path / "build")
    assert probe.kernels is None and probe.status == "build-failed"
    assert "planted failure" in probe.log and "failed" in probe.reason
    with caplog.at_level("ERROR", logger="segcache.kernels"):
        assert K.load_kernels(tmp_path / "build2") is None
    assert "planted failure" in caplog.text
    assert not list((tmp_path / "build").glob("_segkernels_*"))  # nothing half-built is kept


def test_kernel_version_follows_the_sources(tmp_path, monkeypatch):
    src = tmp_path / "csrc"
    shutil.copytree(K.CSRC, src)
    monkeypatch.setattr(K, "CSRC", src)
    before = K._source_digest()
    assert K.KERNEL_VERSION == "csrc-" + before[:16]
    with open(src / "matmul.c", "a") as f:
        f.write("\n/* a change */\n")
    assert K._source_digest() != before
    monkeypatch.setattr(K, "CFLAGS", (*K.CFLAGS, "-ffast-math"))
    assert len({before, K._source_digest()}) == 2


@pytest.mark.slow
def test_default_plan_is_the_kernel_plan_on_x86_64(real_model_dir, monkeypatch):
    """On x86-64 Linux with AVX2 (CI's machines) the default --dtype auto must run the
    block kernels: a CI that passed on the dense path would hide a broken build."""
    if platform.machine() != "x86_64" or K.unsupported_reason():
        if read_environment().ci:
            pytest.fail(f"CI machine cannot run the kernels: {K.unsupported_reason()}")
        pytest.skip(K.unsupported_reason() or platform.machine())
    from segcache.config import ModelConfig
    from segcache.model.runtime import ModelRuntime
    from segcache.model.weights import resolve_model
    from tests.conftest import _cache_dir

    rt = ModelRuntime.load(resolve_model(None, _cache_dir(), progress=False),
                           ModelConfig(dtype="auto", cache_dir=_cache_dir()))
    assert rt.kernel_probe.status == "loaded", rt.kernel_probe
    assert rt.plan.uses_kernels and rt.plan.name.startswith("kernels-"), rt.describe()
    assert rt.describe().startswith("plan kernels-") and "c-step" in rt.describe()
    # the fingerprint follows the kernel version (derived from csrc/)
    from segcache.model import runtime as runtime_mod

    same = runtime_mod._fingerprint(rt.arch, rt.plan, rt.block_formats, "w", "t")
    monkeypatch.setattr(runtime_mod, "KERNEL_VERSION", "csrc-other")
    assert runtime_mod._fingerprint(rt.arch, rt.plan, rt.block_formats, "w", "t") != same


def _q4_1(n: int, k: int, g: torch.Generator) -> BlockLinear:
    q = torch.randint(0, 16, (n, k // 32, 32), generator=g).to(torch.uint8)
    d = (torch.rand(n, k // 32, generator=g) * 0.1).half().float()
    m = (-torch.rand(n, k // 32, generator=g) * 0.5).half().float()
    return BlockLinear("q4_1", (q[..., :16] | (q[..., 16:] << 4)).reshape(n, -1).contiguous(), d, m, True)


def test_pool_gives_the_same_bits_at_any_thread_count(kernels):
    g = torch.Generator().manual_seed(11)
    w = _q4_1(96, 128, g)
    x = torch.randn(40, 128, generator=g)
    q = torch.randn(6, 30, 32, generator=g)
    kv = torch.randn(2, 2, 300, 32, generator=g).half()
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3, 8):
            torch.set_num_threads(threads)
            outs.append((kernels.matmul(x, w), kernels.matmul(x[:5], w, 8),
                         kernels.attend_prefill(q, kv[0], kv[1], 270, 0.2)))
    finally:
        torch.set_num_threads(before)
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other, strict=True))


def test_pool_serves_concurrent_callers(kernels):
    """Two threads calling at once: the second runs its job inline (the pool takes one job
    at a time) and both get exactly the single-caller result."""
    g = torch.Generator().manual_seed(12)
    w = _q4_1(256, 576, g)
    xs = [torch.randn(64, 576, generator=g) for _ in range(4)]
    want = [kernels.matmul(x, w) for x in xs]
    errors: list[str] = []

    def worker(i: int) -> None:
        for _ in range(20):
            if not torch.equal(kernels.matmul(xs[i], w), want[i]):
                errors.append(f"caller {i} got different bits")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_the_fingerprint_follows_the_model_code(tmp_path, monkeypatch):
    """KV outlives the process (disk, Redis): the torch layer and the rest of the
    Python under segcache/model/ are part of the fingerprint, as csrc/ is."""
    from segcache.model import runtime as runtime_mod

    model_dir = Path(runtime_mod.__file__).parent
    assert runtime_mod.MODEL_CODE_VERSION == "py-" + K.sources_digest(model_dir, (".py",))[:16]
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy, ignore=shutil.ignore_patterns("csrc", "__pycache__"))
    before = K.sources_digest(copy, (".py",))
    with open(copy / "llama.py", "a") as f:
        f.write("\n# a change\n")
    assert K.sources_digest(copy, (".py",)) != before
    plan = runtime_mod.ExecPlan.dense(torch.float32)
    from tests.tiny import TINY as arch

    same = runtime_mod._fingerprint(arch, plan, "", "w", "t")
    monkeypatch.setattr(runtime_mod, "MODEL_CODE_VERSION", "py-other")
    assert runtime_mod._fingerprint(arch, plan, "", "w", "t") != same
