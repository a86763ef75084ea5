"""Content-defined chunks of plain prompt text: the same block of text gives the
same chunks wherever it appears, so its KV can be reused at any position
(CacheBlend) although the client marked nothing. Stdlib only: the engine and
the linter cut text with this one function, so their verdicts agree.

``chunk_text(text)`` returns pieces whose concatenation is exactly ``text``.
Every cut is at a line start (a newline stays with the line it ends, blank
lines stay with the block above them), so a block's chunks never depend on the
text before it, only, for the last one, on whether blank lines follow it.

How a cut is decided (content-defined chunking over lines, not bytes):

1. **Atoms.** The text is scanned once, line by line, into atoms: a fenced
   code block (an opening ````` or ``~~~`` line to its closing line), or a
   paragraph (non-blank lines up to a blank line), each with the blank lines
   after it. An atom starts *strong* when it opens a fence, follows a closed
   fence, or starts with ``def``/``async def``/``class``/a decorator/a markdown
   header (``# ...``) at column 0 (a decorator keeps the ``def`` below it);
   otherwise, after a blank line, it starts *weak*.
2. **Oversize atoms** (longer than ``max_chars``) are split by their own
   content: a fence's inside is scanned as code (``def``/``class`` at column 0
   strong, blank lines weak), then a paragraph by lines, then a line every
   ``max_chars`` characters. The pieces are atoms again.
3. **Grouping.** Consecutive atoms join into one chunk until a cut. A cut
   always comes before a strong atom and before and after an *anchor* (an atom
   of at least ``min_chars``: a paragraph block of that size is always exactly
   its own chunk); before a weak atom when the chunk would pass ``max_chars``,
   or when a hash of the atom's text (CRC-32) selects it (one atom in
   ``CUT_ONE_IN``) and at least ``min_chars`` lie between it and the previous
   selected atom (or the start of the run). Whether an atom cuts therefore
   depends only on the atoms back to the previous selected one, never on where
   the current chunk started, so cuts resynchronise right after an edit (the
   size rule looks at the chunk, but chunks of small atoms reach ``max_chars``
   only where ``CUT_ONE_IN`` atoms in a row were not selected). A chunk left under ``min_chars``
   at the end of a run of small atoms joins the chunk before it in that run
   when both fit in ``max_chars``. Nothing ever merges across a strong cut,
   so a fenced block, a function or a section is its own chunk(s) in every
   prompt it appears in, and a short section stays a short chunk.

4. **The head.** The text's first atom, if a paragraph that would be weak
   anywhere else (it counts as strong: nothing comes before it), is a chunk of
   its own from half of ``min_chars`` on (still counted toward the next selected
   cut, so its size crossing that bound moves only the cut after it): a message
   usually opens with what it shares with others (a role, rules, an
   instruction; seed 001's "stable content first") and goes on with what
   differs, and a head of its own is then a prefix hit at position 0
   (RepoAgent's ~250-character instruction is, not the instruction joined to the
   object named after it). Only the text's start is concerned, so a block later
   in the text chunks as before.

An edit inside one atom changes whether that atom is selected and the distance
seen by the next selected atom: only those two cuts can move, so the edit
changes the chunk holding it and at most the next one (short of a forced
``max_chars`` cut). The run ends at the next strong atom or anchor anyway.

Defaults: ``min_chars=256`` (~64 tokens at ~4 characters a token) keeps the
per-chunk cost of a unit (a tree node, a separate tokenization, a blend
selection) small against what the chunk saves, and ``max_chars=4096`` (~1k
tokens) keeps one edit from invalidating more than ~1k tokens and keeps blend
recomputation local, while a typical function or paragraph fits in one chunk.
Pieces under ``min_chars`` exist only where the content is short between two
strong cuts (a heading, a one-line sentence between two code blocks).

No library does this: byte-level CDC (FastCDC) cuts at arbitrary bytes, not at
natural boundaries, and text splitters (LangChain's, ``semantic-text-splitter``)
fill chunks greedily from the start, so a block's chunks depend on what came
before it. One pass over the lines plus one CRC-32 per small atom: tens of
microseconds per kilobyte.
"""

from __future__ import annotations

import re
import zlib

from segcache.kv.hashing import segment_digest

MIN_CHARS = 256
MAX_CHARS = 4096
CUT_ONE_IN = 4  # a small atom past min_chars starts a new chunk with probability 1/4

_FENCE = re.compile(r" {0,3}(`{3,}|~{3,})")
_STRONG_PROSE = re.compile(r"(?:async\s+def|def|class)\s|@\w|#{1,6}\s")
_STRONG_CODE = re.compile(r"(?:async\s+def|def|class)\s|@\w")
_DECORATOR = re.compile(r"@\w")
_FENCE_FIRST = frozenset(" `~")
_STRONG_FIRST = frozenset("acd@#")

# An atom: (text, starts_strong, is_fence).
_Atom = tuple[str, bool, bool]


def chunk_text(text: str, *, min_chars: int = MIN_CHARS, max_chars: int = MAX_CHARS) -> list[str]:
    """``text`` cut into content-defined chunks (see the module docstring);
    ``"".join(chunk_text(t)) == t`` for every string. Raises ValueError
    unless ``1 <= min_chars <= max_chars``."""
    if not 1 <= min_chars <= max_chars:
        raise ValueError(f"need 1 <= min_chars <= max_chars, got {min_chars}, {max_chars}")
    if not text:
        return []
    atoms: list[_Atom] = []
    for atom in _atoms(text.splitlines(keepends=True), _STRONG_PROSE, fences=True):
        atoms += _split_oversize(atom, max_chars)
    return _group(atoms, min_chars, max_chars)


def chunk_digests(text: str, **kwargs: int) -> list[str]:
    """The segment digest of every chunk of ``text`` (``kv.hashing.segment_digest``)."""
    return [segment_digest(c) for c in chunk_text(text, **kwargs)]


def _atoms(lines: list[str], strong: re.Pattern[str], fences: bool) -> list[_Atom]:
    """One pass over ``lines``: fenced blocks and paragraphs, blank lines kept
    with the atom above them; the first atom counts as strong."""
    atoms: list[_Atom] = []
    cur: list[str] = []
    cur_strong, cur_fence = True, False
    fence: str | None = None  # the opening marker while inside a fence
    blank_seen = after_fence = prev_decorator = has_content = False
    for line in lines:
        if fence is not None:  # inside a fence: everything up to the closing line
            cur.append(line)
            m = _FENCE.match(line)
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) and not line[m.end():].strip():
                fence, after_fence, blank_seen = None, True, False
            continue
        is_blank = not line.strip()
        if is_blank:
            cur.append(line)  # leading blank lines open the first atom
            blank_seen, prev_decorator = has_content, False
            continue
        first = line[0]  # the patterns' first characters, checked before any regex runs
        opens = fences and first in _FENCE_FIRST and _FENCE.match(line)
        starts_strong = bool(opens) or after_fence or (
            first in _STRONG_FIRST and not prev_decorator and bool(strong.match(line)))
        if has_content and (starts_strong or blank_seen):
            atoms.append(("".join(cur), cur_strong, cur_fence))
            cur, cur_strong = [], starts_strong
        if not cur or not has_content:  # this line starts the atom
            cur_fence = bool(opens)
        cur.append(line)
        has_content = True
        blank_seen = after_fence = False
        prev_decorator = first == "@" and bool(_DECORATOR.match(line))
        if opens:
            fence = opens.group(1)
    if cur:
        atoms.append(("".join(cur), cur_strong, cur_fence))
    return atoms


def _split_oversize(atom: _Atom, max_chars: int) -> list[_Atom]:
    """``atom`` if it fits, else its pieces by its own content (fence inside as
    code, then lines, then every ``max_chars`` characters)."""
    text, strong, is_fence = atom
    if len(text) <= max_chars:
        return [atom]
    lines = text.splitlines(keepends=True)
    if is_fence and len(lines) > 2:
        inner = _atoms(lines[1:], _STRONG_CODE, fences=False)
        inner[0] = (lines[0] + inner[0][0], True, False)  # the opening line stays with the first piece
        pieces = [(t, s, False) for t, s, _ in inner]
    else:
        pieces = _line_pieces(lines)
    if len(pieces) < 2:
        pieces = [(text[i:i + max_chars], False, False) for i in range(0, len(text), max_chars)]
    pieces[0] = (pieces[0][0], strong, False)
    out: list[_Atom] = []
    for piece in pieces:
        if len(piece[0]) <= max_chars:
            out.append(piece)
        else:
            out += _split_oversize(piece, max_chars)
    return out


def _line_pieces(lines: list[str]) -> list[_Atom]:
    """One piece per line, blank lines kept with the line above (leading ones: below)."""
    groups: list[list[str]] = []
    content = False  # whether the last group holds a non-blank line
    for line in lines:
        blank = not line.strip()
        if groups and (blank or not content):
            groups[-1].append(line)
            content = content or not blank
        else:
            groups.append([line])
            content = not blank
    return [("".join(g), False, False) for g in groups]


def _group(atoms: list[_Atom], min_chars: int, max_chars: int) -> list[str]:
    """Join atoms into chunks (rules 3 and 4 of the module docstring)."""
    chunks: list[str] = []
    cur: list[str] = []
    cur_len = 0
    since_selected = 0  # characters since the last selected atom's start (or the run's start)
    run_start = 0  # index in ``chunks`` of the first chunk of the current run of small atoms
    for i, (text, strong, is_fence) in enumerate(atoms):
        n = len(text)
        anchor = n >= min_chars
        selected = not (strong or anchor) and _selected(text)
        if cur and (strong or anchor or cur_len + n > max_chars
                    or selected and since_selected >= min_chars):
            chunks.append("".join(cur))
            cur, cur_len = [], 0
            if strong or anchor:
                _close_run(chunks, run_start, min_chars, max_chars)
                run_start = len(chunks)
        if strong or anchor or selected:
            since_selected = 0
        head = (not i and n >= (min_chars + 1) // 2 and not is_fence  # rule 4
                and not _STRONG_PROSE.match(text.lstrip()))
        if anchor or head:  # a chunk of its own
            chunks.append(text)
            run_start = len(chunks)
            if head and not anchor:  # it still counts toward the next selected cut, so
                since_selected += n  # its size crossing the bound moves no later cut
            continue
        cur.append(text)
        cur_len += n
        since_selected += n
    if cur:
        chunks.append("".join(cur))
    _close_run(chunks, run_start, min_chars, max_chars)
    return chunks


def _selected(text: str) -> bool:
    """The content-defined cut: one atom in ``CUT_ONE_IN`` by the CRC-32 of its text."""
    return zlib.crc32(text.encode("utf-8", "surrogatepass")) % CUT_ONE_IN == 0


def _close_run(chunks: list[str], run_start: int, min_chars: int, max_chars: int) -> None:
    """A short last chunk of a run of small atoms joins the one before it in the run."""
    if len(chunks) - run_start >= 2 and len(chunks[-1]) < min_chars \
            and len(chunks[-1]) + len(chunks[-2]) <= max_chars:
        last = chunks.pop()
        chunks[-1] += last
