"""The bench runner against a fake OpenAI-compatible server: a real HTTP server on
a free port that streams chat.completion.chunk events with known delays and
returns known usage, so TTFT, ITL, hit rate, aggregates and cost can be checked."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from segcache.bench import cli, report
from segcache.bench.metrics import Pricing, RequestRecord, percentile, summarize
from segcache.bench.runner import Runner, Target, run_cold_vs_warm, run_requests
from segcache.bench.workloads import BenchRequest, MultiAgentSizes, WorkloadOptions, multi_agent

TTFT_S = 0.20   # delay between the role chunk and the first text chunk
ITL_S = 0.05    # delay between text chunks
PIECES = ["Hel", "lo", " wor", "ld"]  # one token each
PROMPT_TOKENS = 1000


class FakeServer:
    """Streams ``pieces`` after ``TTFT_S``; a prompt seen before (same body apart
    from the user turn) reports 900 cached tokens until a purge. With ``blended``
    set, usage carries segcache's blending fields: ``blended`` tokens (at most
    what is not cached) of which ``recomputed`` (at most the blended ones)."""

    def __init__(self, purge_allowed: bool = True, ttft_s: float = TTFT_S, itl_s: float = ITL_S,
                 pieces: list[str] = PIECES, blended: int | None = None, recomputed: int = 0) -> None:
        self.ttft_s, self.itl_s = ttft_s, itl_s
        self.pieces = pieces
        self.blended, self.recomputed = blended, recomputed
        self.bodies: list[dict] = []
        self.purges = 0
        self.seen: set[str] = set()
        self.purge_allowed = purge_allowed
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def cached_for(self, body: dict) -> int:
        key = json.dumps([body.get("segments"), body["messages"][:1]], sort_keys=True)
        with self.lock:
            hit = key in self.seen
            self.seen.add(key)
        return 900 if hit else 0

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _json(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._json(200, {"object": "list", "data": [
                    {"id": "fake-model", "object": "model", "created": 0, "owned_by": "test"}]})

            def do_DELETE(self) -> None:
                if not fake.purge_allowed:
                    return self._json(404, {"error": {"message": "no such route"}})
                with fake.lock:
                    fake.purges += 1
                    fake.seen.clear()
                self._json(200, {"purged_nodes": 3})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.bodies.append(body)
                if "FAIL" in json.dumps(body["messages"]):
                    return self._json(500, {"error": {"message": "boom", "type": "server_error"}})
                cached = fake.cached_for(body)
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                self._event({"role": "assistant", "content": ""})  # role chunk before "prefill"
                time.sleep(fake.ttft_s)
                for i, piece in enumerate(fake.pieces):
                    if i:
                        time.sleep(fake.itl_s)
                    self._event({"content": piece})
                self._event({}, finish="stop")
                usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": len(fake.pieces),
                         "total_tokens": PROMPT_TOKENS + len(fake.pieces), "cached_prefix_tokens": cached,
                         "prompt_tokens_details": {"cached_tokens": cached},
                         "segcache": {"chain": "sha256:0", "segments": [
                             {"id": "A", "hash": "sha256:1", "status": "hit" if cached else "miss",
                              "tokens": 900}]}}
                if fake.blended is not None:
                    blended = min(fake.blended, PROMPT_TOKENS - cached)
                    recomputed = min(fake.recomputed, blended)
                    usage["segcache"].update(blended_tokens=blended, recomputed_tokens=recomputed)
                    usage["segcache"]["segments"].append({"id": "B", "hash": "sha256:2", "status": "blended",
                                                          "tokens": blended, "recomputed": recomputed})
                self._send({"id": "c1", "object": "chat.completion.chunk", "created": 0,
                            "model": "fake-model", "choices": [], "usage": usage})
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()

            def _event(self, delta: dict, finish: str | None = None) -> None:
                self._send({"id": "c1", "object": "chat.completion.chunk", "created": 0,
                            "model": "fake-model",
                            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

            def _send(self, chunk: dict) -> None:
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()

        return Handler


@pytest.fixture
def server():
    fake = FakeServer()
    yield fake
    fake.close()


def _request(label: str = "r", question: str = "hi") -> BenchRequest:
    return BenchRequest(label=label, agent=1, turn=1, segments=[("A", "alpha " * 20), ("B", "beta")],
                        messages=[{"role": "user", "content": question}], max_tokens=8)


def test_runner_measures_ttft_itl_and_reads_usage(server):
    runner = Runner(Target(url=server.url))
    assert runner.model == "fake-model"
    first = runner.send(_request(), 0)
    second = runner.send(_request(), 1)
    runner.close()
    assert first.error is None and first.text == "Hello world"
    # The role chunk comes at once; TTFT waits for the first text.
    assert TTFT_S <= first.ttft_s < TTFT_S + 0.15
    assert ITL_S * 0.9 <= first.itl_s < ITL_S + 0.04
    assert first.e2e_s >= first.ttft_s + 3 * ITL_S * 0.9
    assert (first.prompt_tokens, first.cached_tokens, first.completion_tokens) == (PROMPT_TOKENS, 0, 4)
    assert (second.cached_tokens, second.cached_prefix_tokens, second.hit_rate) == (900, 900, 0.9)
    assert second.segments[0]["status"] == "hit"
    body = server.bodies[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert [s["id"] for s in body["segments"]] == ["A", "B"]
    assert body["segments"][0]["hash"].startswith("sha256:")


def test_flat_mode_sends_one_system_message(server):
    runner = Runner(Target(url=server.url, mode="flat", model="m"))
    runner.send(_request(), 0)
    runner.close()
    body = server.bodies[0]
    assert "segments" not in body and body["model"] == "m"
    assert body["messages"][0] == {"role": "system", "content": "alpha " * 20 + "\n\nbeta"}


def test_errors_are_recorded_not_raised(server):
    runner = Runner(Target(url=server.url))
    rec = runner.send(_request(question="FAIL"), 0)
    runner.close()
    assert rec.error and "500" in rec.error and rec.ttft_s is None


def test_cold_vs_warm_purges_before_each_cold_request(server):
    runner = Runner(Target(url=server.url))
    records, _ = run_cold_vs_warm(runner, [_request("x"), _request("y", "other")])
    runner.close()
    assert [(r.label, r.phase, r.cached_tokens) for r in records] == [
        ("x", "cold", 0), ("x", "warm", 900), ("y", "cold", 0), ("y", "warm", 900)]
    assert server.purges == 3  # the probe, then one before each cold request


def test_cold_vs_warm_uses_a_nonce_where_the_server_cannot_purge():
    fake = FakeServer(purge_allowed=False)
    try:
        runner = Runner(Target(url=fake.url))
        records, _ = run_cold_vs_warm(runner, [_request(), _request()])
        runner.close()
    finally:
        fake.close()
    # Both cold requests are new to the server although the requests are equal.
    assert [r.cached_tokens for r in records] == [0, 900, 0, 900]
    firsts = [b["segments"][0]["content"] for b in fake.bodies]
    assert firsts[0] == firsts[1] != firsts[2] == firsts[3]
    assert firsts[0].startswith("[run ")


def test_concurrent_requests_overlap(server):
    runner = Runner(Target(url=server.url))
    records, wall = run_requests(runner, [_request(str(i), f"q{i}") for i in range(4)], concurrency=4)
    runner.close()
    assert [r.label for r in records] == ["0", "1", "2", "3"]
    assert all(r.error is None for r in records)
    assert wall < 2 * (TTFT_S + 3 * ITL_S)  # sequential would take 4x


def test_percentile_matches_linear_interpolation():
    xs = [float(x) for x in range(1, 11)]
    assert percentile(xs, 50) == 5.5
    assert percentile(xs, 90) == pytest.approx(9.1)
    assert percentile(xs, 99) == pytest.approx(9.91)
    assert percentile([3.0], 99) == 3.0
    assert percentile([], 50) is None


def test_pricing_follows_seed_000():
    p = Pricing(input_per_mtok=5.0, cached_discount=0.9, cache_write_premium=0.0)
    assert p.baseline(62_000) == pytest.approx(0.31)
    assert p.cost(62_000, 50_000) == pytest.approx(0.085)  # "~$0.08"
    assert Pricing(cache_write_premium=0.25).cost(1_000_000, 0) == pytest.approx(6.25)


def test_summarize_aggregates_known_records():
    def rec(i, ttft, prompt, cached, error=None):
        return RequestRecord(index=i, label=str(i), agent=1, turn=1, mode="segments", phase="run",
                             ttft_s=ttft, e2e_s=None if ttft is None else ttft + 1, itl_s=0.1, prompt_tokens=prompt,
                             cached_tokens=cached, completion_tokens=10, error=error)

    records = [rec(0, 1.0, 1000, 0), rec(1, 0.1, 1000, 900), rec(2, 0.3, 2000, 1500),
               rec(3, None, None, None, error="boom")]
    s = summarize(records, wall_s=10.0, pricing=Pricing(5.0, 0.9, 0.0))
    assert (s["requests"], s["errors"]) == (4, 1)
    assert s["ttft_p50_s"] == pytest.approx(0.3) and s["ttft_sum_s"] == pytest.approx(1.4)
    assert (s["prompt_tokens"], s["cached_tokens"], s["computed_tokens"]) == (4000, 2400, 1600)
    assert s["token_hit_rate"] == pytest.approx(0.6)
    assert s["output_tokens_per_s"] == pytest.approx(3.0)
    assert s["cost_usd"] == pytest.approx((1600 + 2400 * 0.1) * 5e-6)
    assert s["cost_no_cache_usd"] == pytest.approx(4000 * 5e-6)


def test_cli_cold_vs_warm_writes_json_and_compare_reads_it(tmp_path, capsys):
    server = FakeServer(ttft_s=0.01, itl_s=0.001)
    try:
        _cli_run_and_compare(server, tmp_path, capsys)
    finally:
        server.close()


def _cli_run_and_compare(server: FakeServer, tmp_path, capsys) -> None:
    small = MultiAgentSizes(200, 80, 30)
    args = ["multi-agent", "--url", server.url, "--turns", "1", "--global-tokens", "200",
            "--agent-tokens", "80", "--task-tokens", "30"]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert cli.main([*args, "--cold-vs-warm", "--json", str(a)]) == 0
    out = capsys.readouterr().out
    assert "cold vs warm" in out and "agent3/turn1" in out
    result = report.load_json(a)
    assert set(result["summary"]) == {"cold", "warm"}
    assert result["summary"]["warm"]["token_hit_rate"] == pytest.approx(0.9)
    assert len(result["records"]) == 6
    expected = multi_agent(WorkloadOptions(turns=1, sizes=small))
    assert [s["content"] for s in server.bodies[0]["segments"]] == [c for _, c in expected[0].segments]

    assert cli.main([*args, "--mode", "flat", "--json", str(b)]) == 0
    assert report.load_json(b)["summary"]["run"]["requests"] == 3
    assert cli.main(["compare", str(a), str(a)]) == 0
    ratios = report.compare(a, a)
    assert ratios["cold"]["ttft_sum_s"] == pytest.approx(1.0)
    ratios = report.compare(a, b)  # no phase in common: A's warm against B's run
    assert set(ratios) == {"warm vs run"}
    assert ratios["warm vs run"]["token_hit_rate"] == 0.0  # B: three first sightings


def test_repeat_cold_with_concurrency_uses_a_fresh_nonce_per_request(server):
    runner = Runner(Target(url=server.url))
    reqs = [_request(str(i)) for i in range(4)]  # the same prompt four times
    records, _ = run_requests(runner, reqs, concurrency=4, cold_each="nonce")
    runner.close()
    assert [r.phase for r in records] == ["cold"] * 4 and server.purges == 0
    assert all(r.cached_tokens == 0 for r in records)
    firsts = {b["segments"][0]["content"] for b in server.bodies}
    assert len(firsts) == 4
    with pytest.raises(ValueError, match="concurrency 1"):
        run_requests(runner, reqs, concurrency=2, cold_each="purge")


def test_fan_out_cli_runs_agents_at_once_and_table_compares(tmp_path, capsys):
    fake = FakeServer(ttft_s=0.3, itl_s=0.001)
    try:
        small = ["--global-tokens", "100", "--agent-tokens", "40", "--task-tokens", "30"]
        seg, cold = tmp_path / "seg.json", tmp_path / "cold.json"
        assert cli.main(["fan-out", "--url", fake.url, "--agents", "4", *small, "--json", str(seg),
                         "--plot", str(tmp_path / "plots")]) == 0
        assert cli.main(["fan-out", "--url", fake.url, "--agents", "4", *small, "--repeat-cold",
                         "--json", str(cold)]) == 0
    finally:
        fake.close()
    result = report.load_json(seg)
    assert result["meta"]["concurrency"] == 4 and result["meta"]["turns"] == 1
    assert result["summary"]["run"]["wall_s"] < 4 * 0.3  # sent at once, not one by one
    assert (tmp_path / "plots" / "ttft.png").stat().st_size > 1000
    assert (tmp_path / "plots" / "hit_rate.png").exists()
    capsys.readouterr()
    assert cli.main(["table", "--markdown", f"segcache={seg}", f"no cache={cold}",
                     "--plot", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "| metric | segcache | no cache | no cache / segcache |" in out
    assert (tmp_path / "cmp" / "ttft_compare.png").exists()
    header, rows = report.results_rows({"a": report.load_json(seg), "b": report.load_json(cold)})
    ttft_sum = next(r for r in rows if r[0] == "TTFT sum s")
    assert ttft_sum[3].endswith("x") and 0.5 < float(ttft_sum[3][:-1]) < 2  # same fake delays
    # a label may hold "="; a missing or broken file is a clear error, not a traceback
    assert cli.main(["table", "--markdown", f"blend c=3={seg}"]) == 0
    assert "| metric | blend c=3 |" in capsys.readouterr().out
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    for argv in (["table", f"x={tmp_path / 'missing.json'}"], ["compare", str(seg), str(broken)]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert "cannot read" in err and "Traceback" not in err


def test_workload_help_describes_every_workload(capsys):
    for name in ("multi-agent", "agent-loop", "repo-docs", "fan-out"):
        with pytest.raises(SystemExit):
            cli.main([name, "--help"])
        out = capsys.readouterr().out
        assert "--concurrency" in out and "--seed" in out
    with pytest.raises(SystemExit):
        cli.main(["repo-docs", "--help"])
    assert "topological order" in capsys.readouterr().out
