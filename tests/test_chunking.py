"""Content-defined chunking of plain prompt text (segcache.kv.chunking): exact
concatenation, the same block gives the same chunks wherever it stands, an
edit changes only the chunks it touches, and it is cheap."""

from __future__ import annotations

import random
import timeit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segcache.bench.repo_docs import SHORT_INSTRUCTIONS, repo_docs_prompts
from segcache.kv.chunking import (
    _STRONG_PROSE,
    MAX_CHARS,
    MIN_CHARS,
    _atoms,
    chunk_digests,
    chunk_text,
)
from segcache.kv.hashing import segment_digest

WORDS = ("cache prefix token segment review module request shared stable history plan check "
         "report update file test branch commit build deploy config error result value").split()


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def paragraph(rng: random.Random, n_chars: int) -> str:
    lines, size = [], 0
    while size < n_chars:
        line = words(rng, rng.randint(4, 12)).capitalize() + "."
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines)


def function(rng: random.Random, name: str, n_lines: int) -> str:
    body = "\n".join(f"    {rng.choice(WORDS)}_{i} = {words(rng, 3).replace(' ', '_')}({i})"
                     for i in range(n_lines))
    return f"def {name}(x):\n{body}\n    return x\n"


def fenced(rng: random.Random, name: str, n_lines: int) -> str:
    return f"```python\n# {name}\n{function(rng, name, n_lines)}```"


def document(rng: random.Random, n_blocks: int) -> str:
    """Markdown-ish prose with code: headers, paragraphs of all sizes, fenced code, bare defs."""
    blocks = []
    for i in range(n_blocks):
        kind = rng.choice(("para", "para", "small", "fence", "def", "header"))
        if kind == "para":
            blocks.append(paragraph(rng, rng.randint(150, 900)))
        elif kind == "small":
            blocks.append(paragraph(rng, rng.randint(20, 120)))
        elif kind == "fence":
            blocks.append(fenced(rng, f"f{i}", rng.randint(2, 30)))
        elif kind == "def":
            blocks.append(function(rng, f"g{i}", rng.randint(1, 12)))
        else:
            blocks.append(f"## {words(rng, 3)}")
    return "\n\n".join(blocks)


def contains_run(chunks: list[str], run: list[str]) -> bool:
    return any(chunks[i:i + len(run)] == run for i in range(len(chunks) - len(run) + 1))


# Text made of lines that exercise every rule: fences, defs, decorators, headers, blank lines.
LINE = st.one_of(
    st.text(max_size=40).map(lambda s: s.replace("\n", " ")),
    st.sampled_from(["", "   ", "```", "```python", "~~~", "def f():", "    return 1", "class C:",
                     "@cache", "async def g():", "# Title", "## Section", "- item"]),
)
STRUCTURED = st.lists(LINE, max_size=60).map("\n".join)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), STRUCTURED), st.integers(1, 300), st.integers(0, 600))
def test_chunks_concatenate_to_the_text_and_respect_max(text, min_chars, extra):
    max_chars = min_chars + extra
    chunks = chunk_text(text, min_chars=min_chars, max_chars=max_chars)
    assert "".join(chunks) == text
    assert all(chunks) and all(len(c) <= max_chars for c in chunks)
    assert chunk_text(text, min_chars=min_chars, max_chars=max_chars) == chunks  # deterministic


def test_defaults_and_bad_bounds():
    assert (MIN_CHARS, MAX_CHARS) == (256, 4096)
    assert chunk_text("") == []
    with pytest.raises(ValueError, match="min_chars"):
        chunk_text("x", min_chars=10, max_chars=5)
    with pytest.raises(ValueError, match="min_chars"):
        chunk_text("x", min_chars=0)


def test_natural_boundaries():
    text = ("Intro.\n\n```python\ndef f():\n    return 1\n```\n\nAs you can see.\n\n"
            "# Header\nText\n\n@dec\ndef g():\n    pass\n\nclass C:\n    x = 1\n")
    assert chunk_text(text, min_chars=40, max_chars=400) == [
        "Intro.\n\n", "```python\ndef f():\n    return 1\n```\n\n", "As you can see.\n\n",
        "# Header\nText\n\n", "@dec\ndef g():\n    pass\n\n", "class C:\n    x = 1\n"]


def test_small_weak_paragraphs_join_until_min():
    paras = ["a" * 30 + "\n\n", "b" * 30 + "\n\n", "c" * 30 + "\n\n"]
    # Under min_chars together: one chunk; an anchor (>= min_chars) stands alone.
    assert chunk_text("".join(paras), min_chars=100, max_chars=400) == ["".join(paras)]
    big = "d" * 120 + "\n\n"
    assert chunk_text(paras[0] + big + paras[1], min_chars=100, max_chars=400) == [paras[0], big, paras[1]]


def test_oversize_fence_splits_at_its_functions():
    rng = random.Random(5)
    fns = [function(rng, f"h{i}", 40) for i in range(4)]
    block = "```python\n" + "\n".join(fns) + "```\n"
    chunks = chunk_text(block, max_chars=2500)
    assert "".join(chunks) == block and len(chunks) >= 4
    # Each function after the first starts a chunk of its own.
    for fn in fns[1:]:
        assert any(c.startswith(fn.split("\n")[0]) for c in chunks)


@settings(max_examples=80, deadline=None)
@given(st.randoms(use_true_random=False), st.integers(0, 6), st.integers(0, 6),
       st.sampled_from(["fence", "def", "para", "header"]))
def test_same_block_same_chunks_after_any_text(rng, n_before_a, n_before_b, kind):
    """A block (fenced code, a function, a big paragraph, a header section) gives
    the same chunk digests whatever text stands before it."""
    block = {"fence": lambda: fenced(rng, "target", rng.randint(3, 200)),
             "def": lambda: function(rng, "target", rng.randint(3, 200)),
             "para": lambda: paragraph(rng, rng.randint(MIN_CHARS, 3000)),
             "header": lambda: "# Target\n" + paragraph(rng, 500)}[kind]()
    tail = "\n\n## After\n" + paragraph(rng, 200)
    alone = chunk_digests(block + tail)
    for n in (n_before_a, n_before_b):
        before = document(rng, n)
        whole = chunk_digests((before + "\n\n" if before else "") + block + tail)
        assert contains_run(whole, alone), (kind, n)


@settings(max_examples=40, deadline=None)
@given(st.randoms(use_true_random=False))
def test_fenced_block_same_chunks_whatever_follows(rng):
    block = fenced(rng, "target", rng.randint(3, 300)) + "\n\n"
    alone = chunk_digests(block)
    for _ in range(2):
        whole = chunk_digests(document(rng, 4) + "\n\n" + block + document(rng, 4))
        assert contains_run(whole, alone)


def _changed(old: list[str], new: list[str]) -> int:
    """How many chunks of ``new`` are not chunks of ``old`` (at the same place in the text)."""
    def spans(chunks):
        out, at = set(), 0
        for c in chunks:
            out.add((at, c))
            at += len(c)
        return out
    old_spans = spans(old)
    shift = {(at + (len(''.join(new)) - len(''.join(old))), c) for at, c in old_spans}
    return sum(1 for s in spans(new) if s not in old_spans and s not in shift)


@settings(max_examples=150, deadline=None)
@given(st.randoms(use_true_random=False), st.sampled_from(["replace", "insert", "delete"]),
       st.booleans())
def test_tiny_edit_changes_only_the_touched_chunk_and_a_neighbour(rng, op, small_paragraphs):
    # Small paragraphs exercise the content-defined cuts; documents, the strong ones and anchors.
    text = ("\n\n".join(paragraph(rng, rng.randint(20, 200)) for _ in range(60)) if small_paragraphs
            else document(rng, 12))
    letters = [i for i, ch in enumerate(text) if ch.isalpha()]
    at = rng.choice(letters)
    if op == "replace":
        edited = text[:at] + ("x" if text[at] != "x" else "y") + text[at + 1:]
    elif op == "insert":
        edited = text[:at] + "z" + text[at:]
    else:
        edited = text[:at] + text[at + 1:]
    old, new = chunk_text(text), chunk_text(edited)
    # An edit that takes its paragraph across a size bound (min_chars: an anchor; half
    # of it for the head) also cuts before and after it: one chunk becomes three.
    bound = 3 if _size_class(text, at) != _size_class(edited, at) else 2
    assert 1 <= _changed(old, new) <= bound, (op, at)


def _size_class(text: str, at: int) -> tuple[bool, bool]:
    """Whether the atom holding character ``at`` is an anchor, and a head of its own."""
    end = 0
    for i, (atom, _, _) in enumerate(_atoms(text.splitlines(keepends=True), _STRONG_PROSE, fences=True)):
        end += len(atom)
        if at < end:
            return len(atom) >= MIN_CHARS, not i and len(atom) >= (MIN_CHARS + 1) // 2
    return False, False


def test_repoagent_prompts_reuse_moved_code_blocks():
    """Seed 003: RepoAgent's flat prompts (segments joined by a blank line, as the
    bench's flat mode sends them); the code of an object comes back at another
    position in its callers' prompts and gives the same chunks there."""
    prompts = repo_docs_prompts(seed=0, n_objects=8, code_chars=1500, structure_chars=1200)
    seen: dict[str, int] = {}
    moved = 0
    for p in prompts:
        flat = "\n\n".join(text for _, text in p.segments)
        chunks = chunk_digests(flat)
        offset = 0
        for seg_id, text in p.segments:
            if seg_id.startswith("code:"):
                alone = chunk_digests(text + "\n\n")
                assert contains_run(chunks, alone), (p.name, seg_id)
                if seen.get(seg_id, offset) != offset:
                    moved += 1
                seen.setdefault(seg_id, offset)
            offset += len(text) + 2
    assert moved >= 3  # the blocks did move, and still matched


def test_chunk_digests_are_segment_digests():
    text = "Para one.\n\n```\ncode\n```\n"
    assert chunk_digests(text) == [segment_digest(c) for c in chunk_text(text)]


def test_speed_well_under_a_millisecond_per_kilobyte():
    text = document(random.Random(1), 200)[:30_000]
    assert len(text) == 30_000
    runs = 20
    seconds = timeit.timeit(lambda: chunk_text(text), number=runs) / runs
    # Generous for a loaded 2-core machine; typically ~30 us per kilobyte.
    assert seconds / 30 < 1e-3, f"{seconds * 1e3 / 30:.3f} ms per KB"


@pytest.mark.parametrize("unit", ["\n", "a\n\n", "é\u2028", "# h\n", "```\nx\n```\n", "x"])
def test_speed_on_degenerate_text_stays_linear(unit):
    """30k characters of one tiny line repeated (blank lines, one-letter paragraphs,
    headers, fences, one endless line): each line is handled once, never rebuilt
    (a quadratic path would take seconds here)."""
    text = (unit * (30_000 // len(unit) + 1))[:30_000]
    chunks = chunk_text(text)
    assert "".join(chunks) == text and all(len(c) <= MAX_CHARS for c in chunks)
    seconds = timeit.timeit(lambda: chunk_text(text), number=3) / 3
    assert seconds / 30 < 5e-3, f"{seconds * 1e3 / 30:.3f} ms per KB"  # ~0.3-0.8 on a loaded 2-core machine


def test_the_head_paragraph_is_a_chunk_of_its_own_from_half_of_min():
    """Rule 4: a message's opening paragraph (shared instructions) from min_chars / 2
    on stands alone, so the text after it changing leaves it a prefix hit; shorter,
    or anywhere but at the start, it joins its neighbours as before."""
    head, rest = "h" * 60 + "\n\n", "r" * 30 + "\n\n"
    assert chunk_text(head + rest + rest, min_chars=100, max_chars=400) == [head, rest + rest]
    assert chunk_text("h" * 40 + "\n\n" + rest, min_chars=100, max_chars=400) == ["h" * 40 + "\n\n" + rest]
    assert chunk_text(rest + head + rest, min_chars=100, max_chars=400) == [rest + head + rest]
    # RepoAgent's template: the fixed instruction, then the object to document.
    prompts = repo_docs_prompts(seed=0, n_objects=3, code_chars=1500, structure_chars=1200)
    heads = {chunk_text("\n\n".join(text for _, text in p.segments))[0] for p in prompts}
    assert heads == {SHORT_INSTRUCTIONS + "\n\n"}
