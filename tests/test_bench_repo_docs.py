"""repo-docs (seed 003) and fan-out workloads: deterministic, the promised structure."""

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
from segcache.bench.workloads import (
    CHARS_PER_TOKEN,
    DEFAULT_TURNS,
    WorkloadOptions,
    agent_loop,
    default_concurrency,
    fan_out,
    repo_docs,
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
    assert repo_docs(WorkloadOptions(seed=1)) != docs
    assert len(docs) == 8 and len(repo_docs(WorkloadOptions(seed=0, objects=5))) == 5


def test_repo_docs_structure(docs):
    heads = {r.segments[0] for r in docs}
    assert len(heads) == 1  # the instructions + project structure: the one shared prefix
    assert all(r.segments[1][0] == f"object:{r.label.split('/', 1)[1]}" for r in docs)
    for r in docs:
        ids = [i for i, _ in r.segments]
        assert len(ids) == len(set(ids))
        assert ids[2] == f"code:{r.label.split('/', 1)[1]}"
        assert any(i.startswith("refs-") for i in ids)  # every object has a relation
    # A code block is the same text wherever it appears, and shows up in several
    # requests at different positions: the non-prefix reuse seed 003 is about.
    positions: dict[str, set[int]] = {}
    texts: dict[str, set[str]] = {}
    for r in docs:
        for pos, (seg_id, text) in enumerate(r.segments):
            if seg_id.startswith("code:"):
                positions.setdefault(seg_id, set()).add(pos)
                texts.setdefault(seg_id, set()).add(text)
    assert all(len(t) == 1 for t in texts.values())
    moved = [s for s, p in positions.items() if len(p) > 1]
    assert len(moved) >= 3, positions


def test_repo_docs_follows_the_call_graph_in_topological_order(docs):
    head = docs[0].segments[0][1]
    module = next(line for line in head.splitlines() if line.startswith("Lib/"))[4:]
    objects = module_objects(Path(sysconfig.get_paths()["stdlib"]) / module)
    names = [r.label.split("/", 1)[1] for r in docs]
    pos = {n: i for i, n in enumerate(names)}
    for r, name in zip(docs, names, strict=True):
        refs = [i[5:] for i, _ in r.segments[3:] if i.startswith("code:")]
        for callee in objects[name].calls:
            if callee in pos:
                assert pos[callee] < pos[name]  # documented before its callers
        for ref in refs:
            assert ref in objects[name].calls or name in objects[ref].calls
        target = r.segments[2][1]
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
