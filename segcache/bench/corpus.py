"""Real text for benchmark prompts: the Python standard library on this machine.

Prompts made of lorem ipsum tokenize unlike real prompts (and compress unlike
them in any cache that looks at content), so every block a workload builds is
cut from ``Lib/*.py`` of the running interpreter: module and function
docstrings (prose), function signatures turned into tool JSON schemas, and
source excerpts (code).

``Corpus(seed)`` is deterministic for a seed *and* a Python version: the file
list is sorted and every pick comes from one ``random.Random(seed)``. A file is
used at most once per corpus, so two blocks never share text by accident.
"""

from __future__ import annotations

import ast
import inspect
import json
import random
import sysconfig
from pathlib import Path


def stdlib_files() -> list[Path]:
    """Top-level ``Lib/*.py`` files, sorted (packages and tests left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if not p.name.startswith(("_", "test")))


def fit(text: str, n_chars: int) -> str:
    """``text`` cut to at most ``n_chars``, at a line end (or a space) near the limit."""
    if len(text) <= n_chars:
        return text
    cut = text[:n_chars]
    for sep in ("\n", " "):
        at = cut.rfind(sep)
        if at >= 0.95 * n_chars:
            return cut[:at]
    return cut


class Corpus:
    """Deterministic picks of stdlib text. Not thread-safe (one ``Random``)."""

    def __init__(self, seed: int, files: list[Path] | None = None) -> None:
        self.rng = random.Random(seed)
        self._files = files if files is not None else stdlib_files()
        if not self._files:
            raise RuntimeError("no standard library sources found (sysconfig 'stdlib' path)")
        self._unused = list(self._files)

    def _next_module(self) -> tuple[Path, ast.Module]:
        if not self._unused:
            self._unused = list(self._files)
        path = self._unused.pop(self.rng.randrange(len(self._unused)))
        source = path.read_text(encoding="utf-8", errors="replace")
        return path, ast.parse(source, str(path))

    def _gather(self, n_chars: int, units_of, whole: bool = False) -> str:
        """Join units from successive random modules until ``n_chars`` are reached.

        ``whole``: never cut a unit; skip those that do not fit and stop within
        5% of the target (for JSON objects, which a cut would leave invalid).
        """
        parts: list[str] = []
        total = 0
        for attempt in range(len(self._files)):
            if whole and attempt >= 20:
                whole = False  # nothing small enough left: accept a cut unit
            path, tree = self._next_module()
            for unit in units_of(path, tree):
                if whole and total + len(unit) + 2 > n_chars:
                    continue
                parts.append(unit)
                total += len(unit) + 2
                if total >= 0.95 * n_chars if whole else total >= n_chars:
                    return fit("\n\n".join(parts), n_chars)
        return fit("\n\n".join(parts), n_chars)

    def prose(self, n_chars: int) -> str:
        """Docstring paragraphs (module, class, function), as numbered rules."""
        counter = iter(range(1, 1_000_000))

        def units(_path: Path, tree: ast.Module):
            for node in ast.walk(tree):
                if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef):
                    doc = ast.get_docstring(node)
                    for para in inspect.cleandoc(doc or "").split("\n\n"):
                        if len(para) > 80:
                            yield f"{next(counter)}. {para.strip()}"

        return self._gather(n_chars, units)

    def tool_schemas(self, n_chars: int) -> str:
        """Public documented functions as OpenAI tool JSON schemas, one JSON object a unit."""

        def units(path: Path, tree: ast.Module):
            for node in tree.body:
                if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                    doc = ast.get_docstring(node)
                    if doc:
                        yield json.dumps(_tool_schema(path.stem, node, doc), indent=2)

        return self._gather(n_chars, units, whole=True)

    def code(self, n_chars: int) -> tuple[str, str, list[str]]:
        """A source excerpt starting at a top-level definition.

        Returns (file name, excerpt, names of the functions the excerpt defines).
        """
        while True:
            path, tree = self._next_module()
            defs = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)]
            if len(defs) < 2:
                continue
            start = self.rng.randrange(len(defs) // 2 + 1)
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
            excerpt = fit("\n".join(lines[defs[start].lineno - 1:]), n_chars)
            if len(excerpt) < 0.95 * n_chars:
                continue  # file too short for this size; try another
            names = [n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)
                     and f"def {n.name}(" in excerpt]
            if names:
                return path.name, excerpt, names


def _tool_schema(module: str, fn: ast.FunctionDef, doc: str) -> dict:
    args = [a.arg for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs
            if a.arg not in ("self", "cls")]
    n_defaults = len(fn.args.defaults)
    positional = [a.arg for a in fn.args.posonlyargs + fn.args.args]
    required = [a for a in positional[: len(positional) - n_defaults] if a in args]
    summary = inspect.cleandoc(doc).split("\n\n")[0].replace("\n", " ")
    return {
        "type": "function",
        "function": {
            "name": f"{module}_{fn.name}",
            "description": summary,
            "parameters": {
                "type": "object",
                "properties": {a: {"type": "string", "description": f"`{a}` of {module}.{fn.name}"}
                               for a in args},
                "required": required,
            },
        },
    }
