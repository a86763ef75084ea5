"""Integrity checks hold under ``python -O`` (which strips ``assert``): they raise
``IntegrityError``, and no correctness check in the package is an ``assert``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import segcache

# Builds a segment tree and a radix tail, corrupts each and prints what check_integrity raised.
CORRUPT_UNDER_O = """
import sys
from segcache.kv import IntegrityError
from segcache.kv.hashing import segment_digest
from segcache.kv.radix import RadixTree
from segcache.kv.segment_tree import SegmentTree

assert False, "asserts run"  # stripped by -O: reaching the next line proves the flag
print("optimize", sys.flags.optimize)
ns = "sha256:" + "ab" * 32
tree = SegmentTree.create_simulated(budget_bytes=1 << 20)
node = tree.insert(tree.root(ns), segment_digest("A"), [1, 2], "kv:A", 10)
tree.check_integrity()
node.nbytes += 1
try:
    tree.check_integrity()
    print("segment tree: nothing raised")
except IntegrityError as e:
    print("segment tree:", e)
tail = RadixTree.create_simulated(1 << 20, bytes_per_token=3)
(leaf,) = tail.insert(ns, [1, 2, 3], lambda a, b: tuple(range(a, b)))
tail.check_integrity()
leaf.pins = -1
try:
    tail.check_integrity()
    print("radix tail: nothing raised")
except IntegrityError as e:
    print("radix tail:", e)
"""


def test_check_integrity_raises_under_python_O():
    run = subprocess.run([sys.executable, "-O", "-c", CORRUPT_UNDER_O], capture_output=True, text=True,
                         timeout=60, cwd=Path(segcache.__file__).parent.parent)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "optimize 1"
    assert lines[1] == "segment tree: resident_bytes is wrong"
    assert lines[2].startswith("radix tail: ") and "-1 pins" in lines[2]


def test_no_assert_statement_in_the_package():
    """A check written as ``assert`` would vanish under ``-O``: use ``kv.integrity.require``."""
    root = Path(segcache.__file__).parent
    found = [f"{path.relative_to(root)}:{node.lineno}" for path in sorted(root.rglob("*.py"))
             for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Assert)]
    assert found == []


def test_integrity_error_is_an_assertion_error():
    from segcache.kv import IntegrityError

    assert issubclass(IntegrityError, AssertionError)
