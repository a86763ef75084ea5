"""repo-docs (seed 003) and fan-out workloads: deterministic, the promised structure;
repo-docs' blocks recur at other positions, marked reuse anywhere, with little shared prefix."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

from segcache.bench.repo_docs import (
    CodeObject,
    call_closure,
    module_objects,
    pick_module,
    select_objects,
    topological_order,
)
from segcache.bench.runner import request_body
from segcache.bench.workloads import (
    CHARS_PER_TOKEN,
    DEFAULT_TURNS,
    BenchRequest,
    WorkloadOptions,
    agent_loop,
    default_concurrency,
    fan_out,
    repo_docs,
    reusable_share,
)

MODULE = '''\
import os


def leaf(x):
    return x + 1


def middle(x):
    return leaf(x) * os.sep.count("/")


def top(x):
    return middle(x) + leaf(x)


class Box:
    def __init__(self):
        self.value = top(1)

    def grow(self):
        self.shrink()
        return self.value

    def shrink(self):
        return self.grow()  # a cycle with grow
'''


def _objects(tmp_path: Path) -> dict[str, CodeObject]:
    path = tmp_path / "toy.py"
    path.write_text(MODULE)
    return module_objects(path)


def test_module_objects_find_calls_to_functions_and_own_methods(tmp_path):
    objects = _objects(tmp_path)
    assert list(objects) == ["leaf", "middle", "top", "Box.__init__", "Box.grow", "Box.shrink"]
    assert objects["top"].calls == ("middle", "leaf")
    assert objects["middle"].calls == ("leaf",)  # os.sep.count is not the module's
    assert objects["Box.__init__"].calls == ("top",)
    assert objects["Box.grow"].calls == ("Box.shrink",)
    assert objects["Box.grow"].source.startswith("def grow(self):")  # dedented
    assert objects["Box.__init__"].kind == "method" and objects["leaf"].kind == "function"


def test_topological_order_puts_callees_first_and_breaks_cycles_deterministically(tmp_path):
    objects = _objects(tmp_path)
    order = topological_order(objects)
    assert sorted(order) == sorted(objects)
    pos = {n: i for i, n in enumerate(order)}
    assert pos["leaf"] < pos["middle"] < pos["top"] < pos["Box.__init__"]
    assert order == topological_order(objects)
    assert call_closure(objects, "Box.__init__") == ["Box.__init__", "top", "middle", "leaf"]
    assert select_objects(objects, 3) == ["leaf", "middle", "top"]


@pytest.fixture(scope="module")
def docs():
    return repo_docs(WorkloadOptions(seed=0))


def test_repo_docs_is_deterministic_for_a_seed(docs):
    assert repo_docs(WorkloadOptions(seed=0)) == docs
    assert repo_docs(WorkloadOptions(seed=0, layout="careful")) == repo_docs(WorkloadOptions(seed=0,
                                                                                             layout="careful"))
    assert repo_docs(WorkloadOptions(seed=1)) != docs
    assert len(docs) == 8 and len(repo_docs(WorkloadOptions(seed=0, objects=5))) == 5


def _name(req) -> str:
    return req.label.split("/", 1)[1]


def test_repo_docs_repoagent_layout(docs):
    # RepoAgent's template: a short fixed instruction, then the object, then the
    # structure, the code blocks and the format rules.
    assert len({r.segments[0] for r in docs}) == 1
    assert len(docs[0].segments[0][1]) < 400  # short: the only shared prefix
    assert len({r.segments[2] for r in docs}) == 1 and docs[0].segments[2][0] == "project-structure"
    assert len({r.segments[-1] for r in docs}) == 1 and docs[0].segments[-1][0] == "repo-docs-format"
    for r in docs:
        ids = [i for i, _ in r.segments]
        assert len(ids) == len(set(ids))
        assert ids[1] == f"object:{_name(r)}" and ids[3] == f"code:{_name(r)}"
        assert any(i.startswith("refs-") for i in ids)  # every object has a relation
        assert 300 * CHARS_PER_TOKEN < sum(len(c) for _, c in r.segments) < 2600 * CHARS_PER_TOKEN


def test_repo_docs_careful_layout_puts_instructions_and_structure_first():
    docs = repo_docs(WorkloadOptions(seed=0, layout="careful"))
    heads = {r.segments[0] for r in docs}
    assert len(heads) == 1  # the instructions + project structure: the one shared prefix
    assert "Lib/" in docs[0].segments[0][1] and len(docs[0].segments[0][1]) > 1000
    for r in docs:
        ids = [i for i, _ in r.segments]
        assert ids[1] == f"object:{_name(r)}" and ids[2] == f"code:{_name(r)}"
        assert "project-structure" not in ids and "repo-docs-format" not in ids
    # The same objects and code blocks as the repoagent layout, only laid out differently.
    repoagent = repo_docs(WorkloadOptions(seed=0))
    assert [r.label for r in docs] == [r.label for r in repoagent]
    code = [{s for s in r.segments if s[0].startswith("code:")} for r in docs]
    assert code == [{s for s in r.segments if s[0].startswith("code:")} for r in repoagent]
    with pytest.raises(ValueError, match="layout"):
        WorkloadOptions(layout="bogus")


@pytest.mark.parametrize("layout", ["repoagent", "careful"])
def test_code_blocks_recur_at_other_positions_and_are_marked_reuse_anywhere(layout):
    docs = repo_docs(WorkloadOptions(seed=0, layout=layout))
    # A code block is the same text wherever it appears, and shows up in several
    # requests at different positions: the non-prefix reuse seed 003 is about.
    positions: dict[str, set[int]] = {}
    texts: dict[str, set[str]] = {}
    for r in docs:
        _, extra = request_body(r, "segments")
        for pos, seg in enumerate(extra["segments"]):
            if seg["id"].startswith("code:"):
                positions.setdefault(seg["id"], set()).add(pos)
                texts.setdefault(seg["id"], set()).add(seg["content"])
                assert seg["reuse"] == "anywhere"
            elif seg["id"] == "project-structure":
                assert seg["reuse"] == "anywhere"
            elif seg["id"].startswith("object:"):
                assert "reuse" not in seg  # new in every request
    assert all(len(t) == 1 for t in texts.values())
    moved = [s for s, p in positions.items() if len(p) > 1]
    assert len(moved) >= 3, positions
    # --reuse none: the same text without the marker; flat mode: unchanged.
    bare = repo_docs(WorkloadOptions(seed=0, layout=layout, reuse="none"))
    assert [r.segments for r in bare] == [r.segments for r in docs]
    for r in bare:
        assert all("reuse" not in s for s in request_body(r, "segments")[1]["segments"])
    flat, extra = request_body(docs[1], "flat")
    assert extra == {} and flat[0]["content"] == "\n\n".join(c for _, c in docs[1].segments)


def _common_prefix_share(prompts: list[list[str]]) -> float:
    """Sum over prompts of the longest common prefix with an earlier one, over their sum."""
    shared = 0
    for i, p in enumerate(prompts):
        best = 0
        for q in prompts[:i]:
            n = 0
            while n < min(len(p), len(q)) and p[n] == q[n]:
                n += 1
            best = max(best, n)
        shared += best
    return shared / sum(len(p) for p in prompts)


def test_repoagent_layout_shares_little_prefix_but_recurs_a_lot():
    docs = repo_docs(WorkloadOptions(seed=0))
    flats = ["\n\n".join([c for _, c in r.segments] + [m["content"] for m in r.messages]) for r in docs]
    by_chars = _common_prefix_share([list(f) for f in flats])
    by_words = _common_prefix_share([f.split() for f in flats])  # a token proxy
    assert by_chars < 0.15 and by_words < 0.15, (by_chars, by_words)
    share = reusable_share(docs)
    assert share["prefix"] == pytest.approx(by_chars)
    assert share["anywhere"] > 0.6  # the first prompt and first sightings are new
    careful = reusable_share(repo_docs(WorkloadOptions(seed=0, layout="careful")))
    assert careful["prefix"] > 0.35  # the ~1,150-token head
    unmarked = reusable_share(repo_docs(WorkloadOptions(seed=0, reuse="none")))
    assert unmarked["anywhere"] < 0.1  # only the short instruction: nothing is marked


def test_reusable_share_of_known_requests():
    def req(segments, anywhere=()):
        return BenchRequest("r", 1, 1, segments, [{"role": "user", "content": "qq"}], 8, anywhere)

    a, b, c = ("a", "x" * 10), ("b", "y" * 20), ("c", "z" * 30)
    reqs = [req([a, b]), req([a, c, b], anywhere=("b",)), req([c, a], anywhere=("a", "c"))]
    share = reusable_share(reqs)
    total = (10 + 2 + 20 + 2 + 2) + (10 + 30 + 20 + 6 + 2) + (30 + 2 + 10 + 2 + 2)
    # prefix: request 2 shares "x"*10 + "\n\n" with request 1; request 3 shares nothing.
    assert share["prefix"] == pytest.approx(12 / total)
    # anywhere: request 2: a (prefix) + b (marked, seen); request 3: c and a (marked, seen).
    assert share["anywhere"] == pytest.approx((10 + 20 + 30 + 10) / total)
    assert reusable_share([]) == {"prefix": None, "anywhere": None}


def test_repo_docs_follows_the_call_graph_in_topological_order(docs):
    structure = docs[0].segments[2][1]
    module = next(line for line in structure.splitlines() if line.startswith("Lib/"))[4:]
    objects = module_objects(Path(sysconfig.get_paths()["stdlib"]) / module)
    names = [_name(r) for r in docs]
    pos = {n: i for i, n in enumerate(names)}
    for r, name in zip(docs, names, strict=True):
        refs = [i[5:] for i, _ in r.segments[4:] if i.startswith("code:")]
        for callee in objects[name].calls:
            if callee in pos:
                assert pos[callee] < pos[name]  # documented before its callers
        for ref in refs:
            assert ref in objects[name].calls or name in objects[ref].calls
        target = r.segments[3][1]
        assert objects[name].source.splitlines()[0] in target  # real stdlib code


def test_repo_docs_code_blocks_respect_the_size_cap():
    reqs = repo_docs(WorkloadOptions(seed=2, code_tokens=60))
    for r in reqs:
        for seg_id, text in r.segments:
            if seg_id.startswith("code:"):
                assert len(text) <= 60 * CHARS_PER_TOKEN + 100  # + fence and header line


def test_pick_module_needs_enough_connected_objects():
    path, objects = pick_module(0, 8)
    assert path.suffix == ".py" and len(objects) >= 8
    with pytest.raises(RuntimeError):
        pick_module(0, 10_000)


def test_fan_out_shares_only_block_a():
    opts = WorkloadOptions(seed=0, turns=DEFAULT_TURNS["fan-out"])
    reqs = fan_out(opts)
    assert fan_out(opts) == reqs and fan_out(WorkloadOptions(seed=1, turns=1)) != reqs
    assert [r.label for r in reqs] == [f"agent{i}/turn1" for i in range(1, 9)]
    assert len({r.segments[0] for r in reqs}) == 1
    assert len({r.segments[1][1] for r in reqs}) == 8 and len({r.segments[2][1] for r in reqs}) == 8
    assert default_concurrency("fan-out", opts) == 8 and default_concurrency("multi-agent", opts) == 1
    wide = fan_out(WorkloadOptions(seed=0, agents=3, turns=2))
    assert [r.label for r in wide] == [f"agent{i}/turn{t}" for t in (1, 2) for i in (1, 2, 3)]
    assert wide[3].segments == wide[0].segments and wide[3].messages != wide[0].messages


def test_agent_loop_default_is_ten_turns_of_tool_results():
    assert DEFAULT_TURNS["agent-loop"] == 10
    reqs = agent_loop(WorkloadOptions(seed=0, turns=10))
    assert len(reqs) == 10
    results = [m["content"] for m in reqs[-1].messages if m["content"].startswith("Tool result")]
    assert len(results) == 9
    # "a few hundred tokens" each: task_tokens (250) of text, give or take the cut.
    assert all(150 * CHARS_PER_TOKEN <= len(t) <= 300 * CHARS_PER_TOKEN for t in results)
