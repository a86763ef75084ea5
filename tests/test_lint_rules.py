"""segcache lint: each rule fires where a defect was planted, with the right
evidence; a clean trace gives nothing; the CLI's outputs and exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from segcache.lint import synth
from segcache.lint.analyze import RULE_IDS, LintResult, lint
from segcache.lint.cli import main
from segcache.lint.tokens import TokenCounter, find_tokenizer
from segcache.lint.trace import ReadStats, parse_record, read_requests, request_units


def _tokenizer_file() -> Path:
    """The converted default model's tokenizer.json: `make test` converts the model
    first, so it is in $SEGCACHE_CACHE_DIR or ~/.cache/segcache (or /tmp/sc-cache)."""
    found = find_tokenizer()
    if found is None:
        extra = sorted(Path("/tmp/sc-cache/models").glob("*/tokenizer.json"))
        found = extra[0] if extra else None
    assert found is not None, (
        "no tokenizer.json under $SEGCACHE_CACHE_DIR/models or ~/.cache/segcache/models: "
        "run `segcache prepare` (make test does) first")
    return found


@pytest.fixture(scope="session")
def counter() -> TokenCounter:
    return TokenCounter(_tokenizer_file())


def run_lint(trace: synth.Trace, counter: TokenCounter, simulate_fixes: bool = False) -> LintResult:
    requests = [parse_record(r, i, f"trace:{i + 1}") for i, r in enumerate(trace.records)]
    return lint(lambda: requests, counter, simulate_fixes=simulate_fixes)


@pytest.mark.parametrize("seed", [0, 1])
def test_clean_trace_has_no_findings(counter, seed):
    result = run_lint(synth.generate(seed, log_records=bool(seed)), counter)
    assert result.findings == []
    assert result.errors == 0
    # Append-only agents on sticky replicas: most of every later prompt is cached.
    assert result.baseline.result.seg_rate > 0.7


def _flat_plain(record: dict, index: int) -> str:
    return "".join(u.plain_text for u in request_units(parse_record(record, index, "x")))


@pytest.mark.parametrize("rule", RULE_IDS)
def test_rule_fires_at_planted_place(counter, rule):
    trace = synth.generate(11, (rule,))
    result = run_lint(trace, counter)
    assert result.fired() == {rule}
    finding = result.findings[0]
    expected = trace.expected[rule]
    first = finding.evidence[0]
    assert first.request == expected.request, finding.evidence
    if expected.message is not None:
        assert first.message == expected.message
    if expected.char_offset is not None:
        assert first.char_offset == expected.char_offset
    if first.char_offset:  # the token offset is the token count of the flat prompt before it
        flat = _flat_plain(trace.records[first.request], first.request)
        assert first.token_offset == counter.count(flat[:first.char_offset])
    assert finding.explanation and finding.fix and finding.severity in ("error", "warning", "info")


def test_dynamic_prefix_evidence_names_the_values(counter):
    for seed in range(4):
        trace = synth.generate(seed, ("dynamic-prefix",))
        ev = run_lint(trace, counter).findings[0].evidence[0]
        exp = trace.expected["dynamic-prefix"]
        flat = _flat_plain(trace.records[ev.request], ev.request)
        new_value = ev.text.split(" (was ")[0].strip("'")
        assert flat[ev.char_offset:].startswith(new_value), (seed, ev.text)
        assert (ev.request, ev.message, ev.char_offset) == (exp.request, exp.message, exp.char_offset)


def test_specific_evidence(counter):
    schema = run_lint(synth.generate(2, ("schema-dynamic",)), counter).findings[0].evidence[0]
    assert schema.detail["path"] == "$.function.parameters.properties.request_id.const"
    assert "req_" in schema.text
    churn = run_lint(synth.generate(2, ("tool-churn",)), counter).findings[0].evidence[0]
    assert churn.text.startswith("removed: ")
    rewrite = run_lint(synth.generate(2, ("history-rewrite",)), counter).findings[0].evidence[0]
    assert "Summary: " in rewrite.text
    fanout = run_lint(synth.generate(2, ("cold-fanout",)), counter).findings[0].evidence[0]
    assert fanout.detail["followers"] == [1, 2, 3]


def test_fixes_recover_the_hit_rate(counter):
    clean = run_lint(synth.generate(5), counter).baseline.result
    for rule in ("dynamic-prefix", "schema-dynamic", "tool-churn", "history-rewrite"):
        result = run_lint(synth.generate(5, (rule,)), counter, simulate_fixes=True)
        fixed = {s.name: s.result for s in result.fixes}[f"fix {rule}"]
        assert result.baseline.result.seg_rate < fixed.seg_rate, rule
        assert fixed.seg_rate >= clean.seg_rate - 0.02, rule
    order = run_lint(synth.generate(5, ("tool-order",)), counter, simulate_fixes=True)
    # segcache canonicalises the tool list; only the plain prefix cache loses.
    assert order.baseline.result.seg_rate == pytest.approx(clean.seg_rate, abs=1e-9)
    assert order.fixes[0].result.plain_rate > order.baseline.result.plain_rate


def test_read_shapes_and_skips(tmp_path):
    path = tmp_path / "t.jsonl"
    body = {"messages": [{"role": "user", "content": "hi"}]}
    lines = [
        json.dumps({**body, "metadata": {"tenant": "t1", "agent": "a"}, "timestamp": "2025-01-01T00:00:01+00:00"}),
        "",
        json.dumps({"request": body, "replica": "r2", "timestamp": 1735689601000,
                    "response": {"choices": [{"message": {"content": "hello"}}]}}),
        "not json",
        json.dumps({"something": "else"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    stats = ReadStats()
    reqs = list(read_requests([path], stats))
    assert [r.index for r in reqs] == [0, 1]
    assert (reqs[0].tenant, reqs[0].agent, reqs[0].timestamp) == ("t1", "a", 1735689601.0)
    assert (reqs[1].tenant, reqs[1].replica, reqs[1].timestamp, reqs[1].reply) == (
        "default", "r2", 1735689601.0, "hello")
    assert stats.skipped == 2 and stats.first_skipped == [f"{path}:4", f"{path}:5"]


def test_cli_exit_codes_and_reports(tmp_path, capsys):
    tok = str(_tokenizer_file())
    bad, clean = tmp_path / "bad.jsonl", tmp_path / "clean.jsonl"
    bad.write_text(synth.generate(3, ("dynamic-prefix", "tool-order")).to_jsonl())
    clean.write_text(synth.generate(3, ("tool-order",)).to_jsonl())  # warnings only
    out_json, out_html = tmp_path / "r.json", tmp_path / "r.html"
    assert main([str(bad), "--tokenizer", tok, "--json", str(out_json), "--html", str(out_html)]) == 1
    report = json.loads(out_json.read_text())
    assert {f["rule"] for f in report["findings"]} == {"dynamic-prefix", "tool-order"}
    names = [s["name"] for s in report["simulation"]["fixes"]]
    assert names == ["fix dynamic-prefix", "fix tool-order", "all fixes"]
    page = out_html.read_text()
    assert page.count("data:image/png;base64,") == 2 and "dynamic-prefix" in page
    assert main([str(clean), "--tokenizer", tok]) == 0
    assert main([str(clean), "--tokenizer", tok, "--rules", "dynamic-prefix"]) == 0
    assert main([str(clean), "--tokenizer", tok, "--rules", "nope"]) == 2
    assert main([str(tmp_path / "missing.jsonl")]) == 2
    assert "tool-order" in capsys.readouterr().out


def test_cli_without_tokenizer_warns_and_approximates(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SEGCACHE_CACHE_DIR", str(tmp_path / "empty"))
    path = tmp_path / "t.jsonl"
    path.write_text(synth.generate(1, ("tool-churn",)).to_jsonl())
    assert main([str(path)]) == 1
    captured = capsys.readouterr()
    assert "approximate" in captured.err


@pytest.mark.parametrize(("text", "kind"), [
    ("at 2025-05-23T10:15:03Z now", "timestamp"),
    ("on 2025-05-23 now", "date"),
    ("on May 23, 2026 now", "date"),
    ("at 10:15:03 now", "time"),
    ("id 3f2b6c1e-8d4a-4f6b-9c2d-1a2b3c4d5e6f now", "uuid"),
    ("trace_9fK2mQ7x now", "id"),
    ("epoch 1750000000 now", "epoch"),
    ("nonce Zx81kPq0rT now", "random"),
    ("step 17 now", "number"),
])
def test_dynamic_values_are_masked_by_kind(text, kind):
    from segcache.lint.dynamic import mask

    masked = mask(text)
    assert f"\u27e8{kind}\u27e9" in masked and masked.endswith(" now"), masked
