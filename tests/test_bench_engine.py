"""``segcache bench engine``: one tiny real run on the default model, with a busy
process beside it, whose JSON holds every figure quiet and contended, and which
leaves no busy process behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.serve_process import ROOT

SPIN = "while True: pass"  # what benchmark.Contenders runs


def _spinners() -> set[str]:
    """Pids of the processes running ``SPIN`` now (Linux: their /proc cmdline)."""
    found = set()
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone, or not a process
            continue
        if cmd[-3:-1] == [b"-c", SPIN.encode()]:
            found.add(proc.name)
    return found


@pytest.mark.slow
def test_contended_figures_come_with_the_quiet_ones(tmp_path):
    out = tmp_path / "engine.json"
    before = _spinners()
    cmd = [sys.executable, "-m", "segcache.cli", "bench", "engine", "--no-reference", "--sizes", "40",
           "--decode-context", "40", "--decode-tokens", "2", "--repeats", "1", "--contend", "1",
           "--json", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "contended / quiet" in done.stdout
    result = json.loads(out.read_text())
    assert result["contend"] == 1
    figures = result["tokens_per_s"]["segcache"]
    assert set(figures) == {"prefill@40", "prefill@40+contend1", "decode@40", "decode@40+contend1"}
    assert all(v > 0 for v in figures.values())
    assert _spinners() <= before  # the busy processes were killed with the run
