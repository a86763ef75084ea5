"""Non-prefix reuse (blending) in the bench: the reuse marker in requests, blended
usage read from the server, the reused fraction, and the agreement of a run's
outputs with a reference run's. Against the fake server of test_bench_runner."""

from __future__ import annotations

import pytest
from rich.console import Console

from segcache.bench import cli, report
from segcache.bench.metrics import Pricing, agreement, leading_match, summarize
from segcache.bench.runner import Runner, Target
from segcache.bench.workloads import BenchRequest
from tests.test_bench_runner import PROMPT_TOKENS, FakeServer


def _request(question: str = "hi") -> BenchRequest:
    return BenchRequest(label="r", agent=1, turn=1, segments=[("A", "alpha " * 20), ("B", "beta " * 10)],
                        messages=[{"role": "user", "content": question}], max_tokens=8, anywhere=("B",))


def _text(renderable) -> str:
    console = Console(width=250, record=True)
    console.print(renderable)
    return console.export_text()


def test_runner_reads_blended_usage_and_summarizes_the_reused_fraction():
    fake = FakeServer(ttft_s=0.01, itl_s=0.001, blended=600, recomputed=90)
    try:
        runner = Runner(Target(url=fake.url))
        first, second = runner.send(_request(), 0), runner.send(_request(), 1)
        runner.close()
    finally:
        fake.close()
    # The marker goes with the request's anywhere segments only.
    assert [s.get("reuse") for s in fake.bodies[0]["segments"]] == [None, "anywhere"]
    assert (first.cached_tokens, first.blended_tokens, first.recomputed_tokens) == (0, 600, 90)
    assert first.hit_rate == 0 and first.reused_rate == pytest.approx(0.6)
    assert (second.cached_tokens, second.blended_tokens, second.recomputed_tokens) == (900, 100, 90)
    assert second.reused_rate == pytest.approx(1.0)
    s = summarize([first, second], wall_s=1.0, pricing=Pricing())
    assert (s["prompt_tokens"], s["cached_tokens"]) == (2 * PROMPT_TOKENS, 900)
    assert (s["blended_tokens"], s["recomputed_tokens"]) == (700, 180)
    assert s["token_hit_rate"] == pytest.approx(0.45)  # exact prefix hits only
    assert s["reused_fraction"] == pytest.approx(0.8)
    assert s["computed_tokens"] == 2000 - 900 - 700 + 180
    table = _text(report.records_table([first, second]))
    assert "blended" in table and "B:blend(r90)" in table and "60%" in table
    summary = _text(report.summary_table({"run": s}))
    assert "reused fraction (prefix + blend)" in summary and "80%" in summary and "700 / 180" in summary


def test_servers_without_blending_leave_the_fields_empty():
    fake = FakeServer(ttft_s=0.01, itl_s=0.001)
    try:
        runner = Runner(Target(url=fake.url))
        records = [runner.send(_request(), 0), runner.send(_request(), 1)]
        runner.close()
    finally:
        fake.close()
    assert all(r.blended_tokens is None and r.recomputed_tokens is None for r in records)
    assert records[1].reused_rate is None
    s = summarize(records, wall_s=1.0, pricing=Pricing())
    assert s["blended_tokens"] is None and s["recomputed_tokens"] is None
    assert s["reused_fraction"] == s["token_hit_rate"] == pytest.approx(0.45)
    assert "blended" not in _text(report.records_table(records))
    assert "reused fraction" not in _text(report.summary_table({"run": s}))


def test_agreement_of_known_texts():
    pairs = [("Hello world", "Hello world"), ("abcd", "abXY"), ("", ""), ("one two three", "one two four")]
    ag = agreement(pairs)
    assert ag["pairs"] == 4
    assert ag["exact_match"] == pytest.approx(0.5)
    assert ag["leading_chars"] == pytest.approx((1 + 2 / 4 + 1 + 8 / 13) / 4)
    assert ag["leading_words"] == pytest.approx((1 + 0 + 1 + 2 / 3) / 4)
    assert leading_match("abc", "abcdef") == pytest.approx(0.5)  # of the longer text
    assert agreement([]) == {"pairs": 0, "exact_match": None, "leading_chars": None, "leading_words": None}


SMALL_REPO_DOCS = ["repo-docs", "--objects", "3", "--code-tokens", "40", "--agent-tokens", "100",
                   "--max-tokens", "4"]


def test_repo_docs_blend_vs_cold_run_compare_and_table(tmp_path, capsys):
    blend = FakeServer(ttft_s=0.01, itl_s=0.001, blended=600, recomputed=60)
    cold = FakeServer(ttft_s=0.01, itl_s=0.001, pieces=["Hel", "lo", " there"])
    b_json, c_json, none_json = tmp_path / "blend.json", tmp_path / "cold.json", tmp_path / "none.json"
    try:
        assert cli.main([*SMALL_REPO_DOCS, "--url", blend.url, "--json", str(b_json)]) == 0
        assert cli.main([*SMALL_REPO_DOCS, "--url", cold.url, "--repeat-cold", "--json", str(c_json)]) == 0
        assert cli.main([*SMALL_REPO_DOCS, "--url", cold.url, "--reuse", "none", "--json", str(none_json)]) == 0
    finally:
        blend.close()
        cold.close()
    out = capsys.readouterr().out
    assert "reused fraction (prefix + blend)" in out and "reusable prompt text, at best" in out
    marked = [s["id"] for b in blend.bodies if "segments" in b for s in b["segments"] if s.get("reuse")]
    assert "project-structure" in marked and any(i.startswith("code:") for i in marked)
    assert all("reuse" not in s for b in cold.bodies[-3:] for s in b["segments"])  # --reuse none
    assert cold.purges == 3 + 1  # --repeat-cold: before each request; then the --reuse none run's start

    b, c = report.load_json(b_json), report.load_json(c_json)
    assert b["meta"]["layout"] == "repoagent" and b["meta"]["reuse"] == "anywhere"
    assert b["meta"]["reusable_share"]["prefix"] < 0.15
    assert b["summary"]["run"]["reused_fraction"] == pytest.approx(0.6)
    assert b["records"][0]["blended_tokens"] == 600 and b["records"][0]["text"] == "Hello world"
    assert c["summary"]["cold"]["blended_tokens"] is None

    # The cold run is the reference (A): B's outputs agree on "Hello " of "Hello world".
    assert cli.main(["compare", str(c_json), str(b_json)]) == 0
    out = capsys.readouterr().out
    assert "output agreement" in out and "did not send the same requests" not in out
    ag = report.agreement_between(c, b)["cold vs run"]
    assert ag["pairs"] == 3 and ag["exact_match"] == 0
    assert ag["leading_chars"] == pytest.approx(6 / 11) and ag["leading_words"] == pytest.approx(0.5)
    assert report.agreement_between(b, b)["run"]["exact_match"] == 1.0

    header, rows = report.results_rows({"cold": c, "blend": b})
    by_name = {r[0]: r for r in rows}
    assert by_name["reused fraction (prefix + blend)"][1:3] == ["0%", "60%"]  # cached + blended
    assert by_name["blended tokens"][2] == "1,800"
    assert by_name["outputs = cold's (same text / leading chars)"][1:3] == ["(reference)", "0% / 55%"]
    _, plain = report.results_rows({"cold": c, "none": report.load_json(none_json)})
    assert not any(r[0].startswith(("blended", "reused")) for r in plain)  # no blending reported


def test_compare_warns_when_the_runs_sent_other_requests(tmp_path, capsys):
    fake = FakeServer(ttft_s=0.01, itl_s=0.001)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    try:
        assert cli.main([*SMALL_REPO_DOCS, "--url", fake.url, "--json", str(a)]) == 0
        assert cli.main([*SMALL_REPO_DOCS, "--url", fake.url, "--seed", "1", "--json", str(b)]) == 0
    finally:
        fake.close()
    capsys.readouterr()
    report.compare(a, b, Console(width=200))
    assert "did not send the same requests (seed differ)" in capsys.readouterr().out


def test_help_documents_layout_reuse_and_agreement(capsys):
    with pytest.raises(SystemExit):
        cli.main(["repo-docs", "--help"])
    out = capsys.readouterr().out
    assert "--layout {repoagent,careful}" in out and "--reuse {anywhere,none}" in out
    assert "RepoAgent's template" in out and "careful" in out
    with pytest.raises(SystemExit):
        cli.main(["compare", "--help"])
    out = capsys.readouterr().out
    assert "same text" in out and "leading chars" in out and "--repeat-cold" in out


def test_a_cold_run_that_still_blends_is_reported(capsys):
    fake = FakeServer(ttft_s=0.01, itl_s=0.001, blended=600)  # blends whatever the purge did
    try:
        assert cli.main([*SMALL_REPO_DOCS, "--url", fake.url, "--repeat-cold"]) == 0
    finally:
        fake.close()
    assert "3 cold request(s) still reused KV" in capsys.readouterr().err
