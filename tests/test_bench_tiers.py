"""``segcache bench tiers``: the request it sends, and one tiny real run (real servers,
a real redis-server) whose JSON says where every phase's segments came from."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from segcache.bench.tiers import PHASES, bench_request
from segcache.bench.workloads import CHARS_PER_TOKEN
from tests.serve_process import ROOT


def test_the_request_is_a_deterministic_guide_cut_into_segments():
    req = bench_request(3600, 4, 8)
    assert req == bench_request(3600, 4, 8)
    assert [s[0] for s in req.segments] == ["guide-0", "guide-1", "guide-2", "guide-3"]
    chars = sum(len(c) for _, c in req.segments)
    assert 3600 * CHARS_PER_TOKEN <= chars + 4 <= 3600 * CHARS_PER_TOKEN * 1.1
    assert req.max_tokens == 8 and req.messages[0]["role"] == "user"
    assert len(bench_request(200, 1, 2).segments) == 1


def test_bench_tiers_imports_no_torch():
    code = "import sys, segcache.bench.tiers; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.slow
def test_a_tiny_run_serves_each_phase_from_its_tier(tmp_path):
    out = tmp_path / "tiers.json"
    cmd = [sys.executable, "-m", "segcache.cli", "bench", "tiers", "--prompt-tokens", "300", "--segments", "3",
           "--max-tokens", "2", "--repeat", "1", "--serve-args", "--dtype float32", "--json", str(out),
           "--workdir", str(tmp_path / "work"), "--multi-agent", "--turns", "1", "--global-tokens", "120",
           "--agent-tokens", "60", "--task-tokens", "60"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "one full hit by tier" in done.stdout
    result = json.loads(out.read_text())
    figures = result["figures"]
    assert list(figures) == list(PHASES)
    assert figures["cold"]["tiers"] == ["None"] and figures["cold"]["cached_tokens"] == 0
    for phase in ("ram", "disk", "redis"):
        assert figures[phase]["tiers"] == [phase]
        assert figures[phase]["cached_tokens"] > 0.9 * figures[phase]["prompt_tokens"]
        assert figures[phase]["ttft_s"] > 0 and figures[phase]["speedup_vs_cold"] > 0
    assert figures["disk"]["load_gb_s"] > 0 and figures["redis"]["load_gb_s"] > 0
    restarts = result["restarts"]
    assert restarts["warm disk"]["requests"] == restarts["cold restart"]["requests"] == 3
    assert restarts["cold restart"]["cached_tokens"] < restarts["warm disk"]["cached_tokens"]
    warm_runs = result["restart_runs"]["warm disk"]
    tiers = [[s["tier"] for s in r["segments"] if s["kind"] == "segment"] for r in warm_runs]
    assert tiers[0] == ["disk"] * 3  # after the restart: from disk, then what it loaded stays in RAM
    assert all(t in ("disk", "ram") for ts in tiers for t in ts)
