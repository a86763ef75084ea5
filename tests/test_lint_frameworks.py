"""segcache lint on traces shaped like what real agent frameworks send
(tests/fixtures/lint/, written by make_traces.py there): three agents sharing a
rules block, each with its own role and tool."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from segcache.lint.analyze import LintResult, lint
from segcache.lint.rules_frameworks import shared_block
from segcache.lint.trace import parse_record
from tests.fixtures.lint import make_traces
from tests.test_lint_rules import counter  # noqa: F401 (fixture)

FIXTURES = Path(__file__).parent / "fixtures" / "lint"


def run(name: str, counter) -> LintResult:  # noqa: F811
    lines = (FIXTURES / f"{name}.jsonl").read_text().splitlines()
    requests = [parse_record(json.loads(line), i, f"{name}:{i + 1}") for i, line in enumerate(lines)]
    return lint(lambda: requests, counter)


@pytest.mark.parametrize("name", ["langgraph", "crewai", "agents_sdk"])
def test_fixtures_are_what_make_traces_writes(name):
    build = getattr(make_traces, name)
    assert (FIXTURES / f"{name}.jsonl").read_text() == "".join(json.dumps(r) + "\n" for r in build())


def test_crewai_rules_wrapped_in_role_text(counter):  # noqa: F811
    result = run("crewai", counter)
    assert "wrapped-shared-text" in result.fired()
    finding = next(f for f in result.findings if f.rule == "wrapped-shared-text")
    # The writer's and the reviewer's first requests (2 and 4), at the rules inside their system prompt.
    assert [e.request for e in finding.evidence] == [2, 4]
    first = finding.evidence[0]
    # "Senior Researcher. " and "Technical Writer. " share their last characters: the block starts there.
    assert first.message == 0 and first.char_offset == len("<|im_start|>system\nYou are Technical Writ")
    assert finding.tokens_lost >= 2 * counter.count(make_traces.RULES)
    fixed = next(s for s in result.fixes if s.name == "fix wrapped-shared-text").result
    assert fixed.seg_rate > result.baseline.result.seg_rate + 0.1


def test_langgraph_shared_history_behind_per_agent_tools_and_named_replies(counter):  # noqa: F811
    result = run("langgraph", counter)
    assert {"shared-text-late", "invisible-fields"} <= result.fired()
    late = next(f for f in result.findings if f.rule == "shared-text-late")
    # No leading system message: each agent's tools come first, then the shared rules + task.
    assert late.evidence[0].request == 2 and late.evidence[0].message == 0
    assert late.evidence[0].detail["behind"] == "tool set"
    named = next(f for f in result.findings if f.rule == "invisible-fields")
    assert named.severity == "info" and "name='researcher'" in named.evidence[0].text
    assert named.tokens_lost == 0  # the digest leaves out what the template does not render
    fixes = {s.name: s.result for s in result.fixes}
    assert fixes["fix shared-text-late"].seg_rate > result.baseline.result.seg_rate + 0.1
    # Dropping `name` changes nothing for segcache (it keys what the template renders).
    assert fixes["fix invisible-fields"].seg_rate == result.baseline.result.seg_rate


def test_agents_sdk_shared_head_is_not_a_late_or_wrapped_block(counter):  # noqa: F811
    result = run("agents_sdk", counter)
    assert result.errors == 0
    assert not {"shared-text-late", "wrapped-shared-text", "invisible-fields"} & result.fired()


def test_shared_block_widens_lines_to_characters():
    old = "You are A. RULE one\nRULE two\nRULE three\nGoal: a"
    new = "You are Bee. RULE one\nRULE two\nRULE three\nGoal: b"
    start, old_start, size = shared_block(new, old)
    assert new[start:start + size] == ". RULE one\nRULE two\nRULE three\nGoal: "
    assert old[old_start:old_start + size] == new[start:start + size]
    assert shared_block("abc", "xyz") == (0, 0, 0)


def test_repoagent_plain_prompts_predict_non_prefix_reuse_with_blend_auto(counter):  # noqa: F811
    """Seed 003: RepoAgent's prompts as plain text (the bench's flat mode). A prefix
    cache reuses a few percent; with --blend auto the moved code blocks are chunks
    reused where they now stand, and the linter says how much."""
    from segcache.bench.repo_docs import repo_docs_prompts
    from segcache.lint.findings import LintOptions
    from segcache.lint.trace import Request

    prompts = repo_docs_prompts(seed=0, n_objects=8, code_chars=1500, structure_chars=1200)
    requests = [Request(i, f"repoagent:{i + 1}", {"messages": [
        {"role": "system", "content": "\n\n".join(text for _, text in p.segments)},
        {"role": "user", "content": p.question}]}) for i, p in enumerate(prompts)]
    marked = lint(lambda: requests, counter, LintOptions(blend="marked"), simulate_fixes=False)
    auto = lint(lambda: requests, counter, LintOptions(blend="auto"), simulate_fixes=False)
    before, after = marked.baseline.result, auto.baseline.result
    assert before.plain_rate < 0.1 and before.seg_rate < 0.1 and before.nonprefix_rate == 0
    assert after.nonprefix_rate > 0.5 and after.seg_rate >= after.nonprefix_rate
    assert after.plain_rate == before.plain_rate  # the prefix model does not change
    # The structure block comes back after per-object text in every prompt.
    assert "wrapped-shared-text" in auto.fired()


def test_simulation_predicts_partial_and_non_prefix_reuse_on_framework_traces(counter):  # noqa: F811
    from segcache.lint.findings import LintOptions

    def reuse(name: str, **options) -> list[tuple[int, int]]:
        lines = (FIXTURES / f"{name}.jsonl").read_text().splitlines()
        requests = [parse_record(json.loads(line), i, name) for i, line in enumerate(lines)]
        return lint(lambda: requests, counter, LintOptions(**options), simulate_fixes=False).baseline.result.reuse

    # Agents SDK: the prompt prefix + rules head each agent's system message; the later
    # agents reuse it token-level, rounded down to the 256-token prefill chunk...
    assert reuse("agents_sdk") == [(0, 0), (256, 0), (256, 0)]
    # ...or all of it where the model plan computes rows independently of the call.
    assert all(p > 256 and b == 0 for p, b in reuse("agents_sdk", independent_rows=256)[1:])
    # LangGraph: the shared rules + task stand behind each agent's tools: only blending
    # (--blend auto, chunk units) reuses them, in every request after the first agent's.
    assert all(b == 0 for _, b in reuse("langgraph"))
    auto = reuse("langgraph", blend="auto")
    assert auto[:2] == [(0, 0), (0, 0)] and all(b > 0 for _, b in auto[2:])


def test_cli_blend_auto_reports_the_non_prefix_hit_rate(tmp_path, capsys):
    from segcache.lint.cli import main
    from tests.test_lint_rules import _tokenizer_file

    out = tmp_path / "r.json"
    args = [str(FIXTURES / "langgraph.jsonl"), "--tokenizer", str(_tokenizer_file()), "--json", str(out)]
    assert main([*args, "--blend", "auto"]) == 0  # warnings and info only
    report = json.loads(out.read_text())["simulation"]
    assert report["blend"] == "auto" and report["baseline"]["segcache_nonprefix_hit_rate"] > 0
    assert "(segcache --blend auto)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*args, "--blend", "sometimes"])


def test_invisible_fields_on_other_roles_fire_only_when_they_vary(counter):  # noqa: F811
    from segcache.lint.trace import Request

    system = {"role": "system", "content": "Shared rules. " * 20}
    def request(i: int, **fields) -> Request:
        user = {"role": "user", "content": "Summarise the report.", **fields}
        tool = {"role": "tool", "tool_call_id": f"call_{i}", "content": "ok"}
        return Request(i, f"t:{i}", {"messages": [system, user, tool]}, agent=f"a{i}")
    same = lint(lambda: [request(0, name="alice"), request(1, name="alice")], counter, simulate_fixes=False)
    assert "invisible-fields" not in same.fired()  # a constant field, and tool_call_id: nothing to say
    varied = lint(lambda: [request(0, name="alice"), request(1, name="bob", refusal=None)], counter,
                  simulate_fixes=False)
    finding = next(f for f in varied.findings if f.rule == "invisible-fields")
    assert [e.request for e in finding.evidence] == [1] and "name='bob'" in finding.evidence[0].text
    assert finding.tokens_lost == 0
