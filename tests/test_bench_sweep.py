"""segcache bench sweep against a real server (fake engine: the figures are the
real model's job; here the plumbing and the arithmetic)."""

from __future__ import annotations

import argparse
import copy
import json

from segcache.bench import sweep
from tests.fakes import FakeEngine
from tests.server_harness import running_server


def test_decode_rate_arithmetic():
    a, b = sweep._Stream(), sweep._Stream()
    a.times, a.tokens = [10.0, 10.5, 11.0], 3
    b.times, b.tokens = [10.2, 12.0], 2
    assert sweep.decode_rate([a, b]) == 5 / 2.0


def test_steady_rate_counts_only_the_window_where_all_streams_decode():
    a, b = sweep._Stream(), sweep._Stream()
    a.times, a.tokens = [10.0, 10.5, 11.0, 11.5, 12.0], 5
    b.times, b.tokens = [11.0, 11.5, 12.5], 3
    # window (11.0, 12.0]: a at 11.5, 12.0; b at 11.5 -> 3 chunks of 1 token each in 1 s
    assert sweep.steady_rate([a, b]) == 3.0
    one = sweep._Stream()
    one.times, one.tokens = [1.0, 1.25, 1.5], 6  # two tokens per chunk
    assert sweep.steady_rate([one]) == 2 * 2 / 0.5
    late = sweep._Stream()
    late.times, late.tokens = [13.0, 14.0], 2  # starts after a has finished
    assert sweep.steady_rate([a, late]) == 0.0


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
    assert all(r["steady_tok_s"] >= 0 for r in data["sweep"])
    assert data["prefill_interference"]["cold_ttft_s"] >= 0


def test_constrained_bench_runs_against_a_server(tmp_path, tiny_engine_factory):
    """The plumbing only (no figures are checked): both kinds of run happen, and the
    constrained streams really are constrained (their text parses as the schema)."""
    from segcache.bench import constrained

    engine = tiny_engine_factory()
    out = tmp_path / "constrained.json"
    with running_server(engine) as url:
        p = argparse.ArgumentParser()
        constrained.add_arguments(p)
        args = p.parse_args(["--url", url + "/v1", "--streams", "1,2", "--max-tokens", "6",
                             "--rounds", "1", "--json", str(out)])
        assert constrained.run(args) == 0
        rows = json.loads(out.read_text())["constrained"]
        assert [r["streams"] for r in rows] == [1, 2]
        assert [r["plain_tokens"] for r in rows] == [6, 12]
        assert all(r["json_tokens"] > 0 and r["overhead"] is not None for r in rows)
        from openai import OpenAI

        client = OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        # The bench's schema wants 40+ facts (replies as long as plain ones); a complete answer
        # within 200 tokens needs the same schema with fewer.
        schema = copy.deepcopy(constrained.FACTS_SCHEMA)
        schema["properties"]["facts"].update(minItems=1, items={"type": "string", "maxLength": 40})
        fmt = {"type": "json_schema", "json_schema": {"name": "facts", "schema": schema, "strict": True}}
        r = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": constrained._prompt(0)}],
            max_tokens=200, temperature=0, response_format=fmt,
            logit_bias={str(engine.tokenizer.encode("\n")[0]): -100})
        assert isinstance(json.loads(r.choices[0].message.content)["facts"], list)


def test_constrained_bench_rounds_alternate_and_report_spread(tiny_engine_factory, monkeypatch):
    """Each counted round runs both kinds on the same prompts, cached first, plain first
    in even rounds and constrained first in odd ones, after the uncounted warm-up
    rounds; the row holds every round and the median and range of each figure."""
    from segcache.bench import constrained

    calls: list[tuple[int, bool]] = []
    real_run_streams = constrained.run_streams

    def recorded(client, model, n, max_tokens, is_constrained, offset):
        if not calls or calls[-1][0] != offset:  # the round's first run: its prompts cached?
            usage = client.chat.completions.create(
                model=model, max_tokens=1, messages=[{"role": "user",
                                                      "content": constrained._prompt(offset + n - 1)}]).usage
            assert usage.prompt_tokens_details.cached_tokens >= usage.prompt_tokens - 8  # message hit
        calls.append((offset, is_constrained))
        return real_run_streams(client, model, n, max_tokens, is_constrained, offset)

    monkeypatch.setattr(constrained, "run_streams", recorded)
    engine = tiny_engine_factory()
    with running_server(engine) as url:
        from openai import OpenAI

        client = OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        row = constrained.measure(client, "tiny", 2, 5, rounds=3, warmup=1)
    assert calls == [(100000, False), (100000, True), (0, False), (0, True), (100, True),
                     (100, False), (200, False), (200, True)]
    assert len(row["rounds"]) == 3 and row["plain_tokens"] == 10
    for key in ("overhead", "steady_overhead", "plain_decode_tok_s", "json_decode_tok_s"):
        values = [r[key] for r in row["rounds"]]
        low, high = row[f"{key}_range"]
        assert low == min(values) and high == max(values) and low <= row[key] <= high
        assert row[key] == sorted(values)[1]
