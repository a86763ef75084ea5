"""Token ids for the linter: the server's HF tokenizer when a ``tokenizer.json``
can be found, otherwise an approximation (one pseudo-token per 4 characters).

No torch and no ``transformers``: the ``tokenizers`` library reads the
``tokenizer.json`` that ``segcache prepare`` writes next to the converted
weights (``<cache dir>/models/<name>/tokenizer.json``).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path

from segcache.config import default_cache_dir

APPROX_CHARS_PER_TOKEN = 4


def find_tokenizer(path: str | Path | None = None, cache_dir: Path | None = None) -> Path | None:
    """A ``tokenizer.json``: ``path`` itself, or inside ``path`` if it is a
    directory, or else the newest one under ``<cache_dir>/models/*/`` (default:
    ``config.default_cache_dir()``)."""
    if path is not None:
        p = Path(path).expanduser()
        candidate = p / "tokenizer.json" if p.is_dir() else p
        if not candidate.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {candidate}")
        return candidate
    found = sorted(((cache_dir or default_cache_dir()) / "models").glob("*/tokenizer.json"),
                   key=lambda f: f.stat().st_mtime, reverse=True)
    return found[0] if found else None


class TokenCounter:
    """Text -> token ids, memoised (prompts repeat the same blocks over and over).

    ``encode`` of a piece of text is independent of its neighbours, exactly as
    the server tokenizes each segment on its own (segment-aligned tokenization).
    """

    def __init__(self, tokenizer_file: Path | None, max_entries: int = 50_000) -> None:
        self.tokenizer_file = tokenizer_file
        self.max_entries = max_entries
        self._memo: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._tok = None
        if tokenizer_file is not None:
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_file(str(tokenizer_file))

    @property
    def approximate(self) -> bool:
        return self._tok is None

    def describe(self) -> str:
        if self._tok is None:
            return f"approximate ({APPROX_CHARS_PER_TOKEN} chars/token; no tokenizer.json found)"
        return str(self.tokenizer_file)

    def encode(self, text: str) -> tuple[int, ...]:
        ids = self._memo.get(text)
        if ids is None:
            ids = self._encode(text)
            self._memo[text] = ids
            if len(self._memo) > self.max_entries:
                self._memo.popitem(last=False)
        return ids

    def count(self, text: str) -> int:
        return len(self.encode(text))

    def _encode(self, text: str) -> tuple[int, ...]:
        if self._tok is not None:
            return tuple(self._tok.encode(text, add_special_tokens=False).ids)
        step = APPROX_CHARS_PER_TOKEN
        return tuple(
            int.from_bytes(hashlib.blake2b(text[i:i + step].encode(), digest_size=4).digest(), "little")
            for i in range(0, len(text), step)
        )
