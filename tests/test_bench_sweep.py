"""segcache bench sweep against a real server (fake engine: the figures are the
real model's job; here the plumbing and the arithmetic)."""

from __future__ import annotations

import argparse
import json

from segcache.bench import sweep
from tests.fakes import FakeEngine
from tests.server_harness import running_server


def test_decode_rate_arithmetic():
    a, b = sweep._Stream(), sweep._Stream()
    a.times, a.tokens = [10.0, 10.5, 11.0], 3
    b.times, b.tokens = [10.2, 12.0], 2
    assert sweep.decode_rate([a, b]) == 5 / 2.0


def test_sweep_runs_against_a_server(tmp_path):
    out = tmp_path / "sweep.json"
    with running_server(FakeEngine()) as url:
        p = argparse.ArgumentParser()
        sweep.add_arguments(p)
        args = p.parse_args(["--url", url + "/v1", "--streams", "1,2", "--max-tokens", "5",
                             "--prefill-tokens", "200", "--json", str(out)])
        assert sweep.run(args) == 0
    data = json.loads(out.read_text())
    assert [r["streams"] for r in data["sweep"]] == [1, 2]
    assert all(r["tokens"] > 0 for r in data["sweep"])
    assert data["prefill_interference"]["cold_ttft_s"] >= 0
