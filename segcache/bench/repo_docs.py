"""Seed 003's RepoAgent workload: documentation prompts over a real call graph.

RepoAgent documents a repository's code objects in topological order (callees
before their callers), and every prompt carries the object's code plus the code
of the objects it calls and of those that call it. A function's code therefore
comes back in later prompts, at a different position each time: a prefix cache
reuses only the common instructions, a non-prefix cache (CacheBlend) reuses the
code blocks too.

The "repository" is one module of the Python standard library, picked by the
seed among those with enough internally connected functions. Objects are its
top-level functions and its classes' methods; an edge ``f -> g`` is a call
``g(...)`` to a top-level function or ``self.g(...)`` / ``cls.g(...)`` to a
method of the same class.

Two layouts of one request's segments (``layout``):

``repoagent`` (the default) follows RepoAgent's template as seed 003 describes
it: a short fixed instruction, then what to document, so that, as in RepoAgent,
a per-object variable comes within the first ~300 characters and the prefix
shared by all requests is only the instruction (a few percent of the prompt):

1. ``repo-docs-instructions``: a short fixed instruction -- the same in every
   request, the only shared prefix;
2. ``object:<name>``: what to document (kind, name, file) -- new each request;
3. ``project-structure``: the module's outline -- the same text in every
   request, after a different segment each time;
4. ``code:<name>``: the target's code;
5. ``refs-callees`` then ``code:<callee>`` for each callee (at most ``max_refs``);
6. ``refs-callers`` then ``code:<caller>`` for each caller (at most ``max_refs``);
7. ``repo-docs-format``: the fixed output format rules, at a position that
   depends on how many references come before it.

``careful`` is the layout a client that knows about prefix caching would pick:
the instructions and the project structure first, as one block
(``repo-docs-instructions``, ~1,150 tokens, the shared prefix), then 2, 4, 5, 6.

A ``code:<name>`` block is the same text wherever it appears. ``recurring``
names the blocks a client would send with ``"reuse": "anywhere"``: the ones that
come back in other requests at other positions (code blocks, the project
structure, the ``refs-`` lines and the format rules; in ``careful``, the
instructions block too, as it holds the structure). Not ``object:<name>``, new
in every request, nor repoagent's short instruction, always a prefix hit.
"""

from __future__ import annotations

import ast
import random
import textwrap
from dataclasses import dataclass
from pathlib import Path

from segcache.bench.corpus import fit, stdlib_files


@dataclass(frozen=True)
class CodeObject:
    """A function or method of one module and the objects of that module it calls."""

    name: str  # "func" or "Class.method"
    kind: str  # "function" or "method"
    source: str  # dedented source, decorators left out
    calls: tuple[str, ...]


def _calls_in(fn: ast.FunctionDef, functions: set[str], methods: set[str], owner: str | None) -> list[str]:
    found: list[str] = []
    for node in ast.walk(fn):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id in functions:
            found.append(f.id)
        elif (owner and isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
              and f.value.id in ("self", "cls") and f.attr in methods):
            found.append(f"{owner}.{f.attr}")
    return found


def module_objects(path: Path) -> dict[str, CodeObject]:
    """Every top-level function and method of ``path``, in source order, with its calls."""
    source = path.read_text(encoding="utf-8", errors="replace")
    tree = ast.parse(source, str(path))
    lines = source.splitlines()
    defs: list[tuple[str, str, ast.FunctionDef, str | None, set[str]]] = []
    functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            defs.append((node.name, "function", node, None, set()))
        elif isinstance(node, ast.ClassDef):
            methods = {m.name for m in node.body if isinstance(m, ast.FunctionDef)}
            for m in node.body:
                if isinstance(m, ast.FunctionDef):
                    defs.append((f"{node.name}.{m.name}", "method", m, node.name, methods))
    objects = {}
    for name, kind, fn, owner, methods in defs:
        text = textwrap.dedent("\n".join(lines[fn.lineno - 1:fn.end_lineno]))
        calls = tuple(dict.fromkeys(c for c in _calls_in(fn, functions, methods, owner) if c != name))
        objects[name] = CodeObject(name, kind, text, calls)
    return objects


def topological_order(objects: dict[str, CodeObject]) -> list[str]:
    """Callees before callers (RepoAgent's order). Within a level, and to break a
    cycle, source order decides: the result is deterministic."""
    order_of = {name: i for i, name in enumerate(objects)}
    pending = {name: {c for c in obj.calls if c in objects} for name, obj in objects.items()}
    done: list[str] = []
    while pending:
        ready = [n for n, deps in pending.items() if not deps]
        if not ready:  # a cycle: take the first object in source order
            ready = [min(pending, key=order_of.__getitem__)]
        for name in sorted(ready, key=order_of.__getitem__):
            del pending[name]
            done.append(name)
        for deps in pending.values():
            deps.difference_update(ready)
    return done


def callers_of(objects: dict[str, CodeObject]) -> dict[str, list[str]]:
    callers: dict[str, list[str]] = {name: [] for name in objects}
    for name, obj in objects.items():
        for callee in obj.calls:
            if callee in callers:
                callers[callee].append(name)
    return callers


def connected(objects: dict[str, CodeObject]) -> list[str]:
    """Objects with at least one call edge inside the module, in source order."""
    called = {c for obj in objects.values() for c in obj.calls}
    return [n for n, obj in objects.items() if obj.calls or n in called]


def call_closure(objects: dict[str, CodeObject], root: str) -> list[str]:
    """``root`` and everything it calls, directly or not, breadth first."""
    seen = [root]
    for name in seen:  # grows while iterating: a breadth-first walk
        seen += [c for c in objects[name].calls if c in objects and c not in seen]
    return seen


def select_objects(objects: dict[str, CodeObject], n: int) -> list[str]:
    """``n`` objects that call each other, in topological order: the call closures
    of the objects with the largest ones, biggest first and each from its leaves
    up, until ``n`` are taken.
    Documenting a whole closure is what makes a function's code come back as a
    reference in its callers' prompts."""
    order = topological_order(objects)
    rank = {name: i for i, name in enumerate(order)}
    closures = sorted((call_closure(objects, name) for name in objects), key=len, reverse=True)
    chosen: list[str] = []
    for closure in closures:
        # Deepest first, so that a chosen object's callees are chosen too.
        chosen += [c for c in sorted(closure, key=rank.__getitem__) if c not in chosen][: n - len(chosen)]
        if len(chosen) >= n:
            break
    picked = set(chosen)
    return [name for name in order if name in picked]


def pick_module(seed: int, min_objects: int, files: list[Path] | None = None) -> tuple[Path, dict[str, CodeObject]]:
    """A module, chosen by ``seed``, with ``min_objects`` connected objects of which
    at least half are the call closure of one of them."""
    candidates = list(files if files is not None else stdlib_files())
    random.Random(seed).shuffle(candidates)
    for path in candidates:
        try:
            objects = module_objects(path)
        except SyntaxError:
            continue
        if len(connected(objects)) < min_objects:
            continue
        if max(len(call_closure(objects, n)) for n in objects) >= max(2, min_objects // 2):
            return path, objects
    raise RuntimeError(f"no standard library module has {min_objects} connected functions")


LAYOUTS = ("repoagent", "careful")

INSTRUCTIONS = """\
You are an AI documentation assistant. Your task is to write the documentation of one \
code object of a project from its code and from its relationships with other objects: \
what it does, its parameters, what it returns, and how it is used by its callers.

Write in Markdown, in a deterministic tone, with the sections **Function**, \
**Parameters**, **Returns** and **Notes**. Do not speculate about code you were not \
shown, and do not repeat the code back.

The project is the Python standard library (`Lib/`). Its structure, for the module \
being documented:"""

# The repoagent layout's pieces: INSTRUCTIONS split into a short head and format
# rules that close the prompt, as in RepoAgent's template.
SHORT_INSTRUCTIONS = """\
You are an AI documentation assistant. Your task is to write the documentation of one \
code object of a project from its code and from its relationships with other objects, \
so that developers new to the project understand what it does and how to use it."""

FORMAT_RULES = """\
Write the documentation in Markdown, in a deterministic tone, with the sections \
**Function**, **Parameters**, **Returns** and **Notes**: what the object does, its \
parameters, what it returns, and how it is used by its callers. Do not speculate about \
code you were not shown, and do not repeat the code back."""


def _outline(path: Path, objects: dict[str, CodeObject], n_chars: int) -> str:
    lines = [f"Lib/{path.name}"]
    for name, obj in objects.items():
        first = obj.source.splitlines()[0].strip() if obj.source else name
        indent = "    " if obj.kind == "method" else "  "
        lines.append(f"{indent}{name}: {first}")
    return fit("\n".join(lines), n_chars)


@dataclass(frozen=True)
class RepoDocsPrompt:
    """One object to document: ``segments`` in prompt order, the ids of those that
    recur in other requests (``recurring``) and the user question."""

    name: str
    segments: list[tuple[str, str]]
    question: str
    recurring: tuple[str, ...] = ()


def repo_docs_prompts(seed: int, n_objects: int, code_chars: int, structure_chars: int,
                      max_refs: int = 3, layout: str = "repoagent") -> list[RepoDocsPrompt]:
    """``n_objects`` objects of a seeded module that call each other, in topological
    order, laid out as ``layout`` says (see the module docstring)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    path, objects = pick_module(seed, n_objects)
    order = select_objects(objects, n_objects)
    rank = {n: i for i, n in enumerate(topological_order(objects))}
    callers = callers_of(objects)
    outline = _outline(path, objects, structure_chars)

    def block(name: str) -> tuple[str, str]:
        return f"code:{name}", f"```python\n# Lib/{path.name}: {name}\n{fit(objects[name].source, code_chars)}\n```"

    prompts = []
    for name in order:
        obj = objects[name]
        callees = sorted(obj.calls, key=rank.__getitem__)[:max_refs]
        users = [c for c in sorted(callers[name], key=rank.__getitem__) if c not in callees][:max_refs]
        if layout == "careful":
            segments = [("repo-docs-instructions", f"{INSTRUCTIONS}\n\n{outline}"),
                        (f"object:{name}", f'Now document the {obj.kind} "{name}" of Lib/{path.name}. '
                                           "Its code is as follows:")]
        else:
            segments = [("repo-docs-instructions", SHORT_INSTRUCTIONS),
                        (f"object:{name}", f'Document the {obj.kind} "{name}" of Lib/{path.name}, a module '
                                           "of the Python standard library. Below are the module's "
                                           "structure, the code of the object, then the code of the "
                                           "objects it calls and of the objects that call it."),
                        ("project-structure", f"The structure of the module:\n{outline}")]
        segments.append(block(name))
        if callees:
            segments.append(("refs-callees", "As you can see, the code calls the following objects; "
                                             "their code is as follows:"))
            segments += [block(c) for c in callees]
        if users:
            segments.append(("refs-callers", "The code is called by the following objects; "
                                             "their code is as follows:"))
            segments += [block(c) for c in users]
        if layout == "repoagent":
            segments.append(("repo-docs-format", FORMAT_RULES))
        recurring = tuple(i for i, _ in segments if not i.startswith("object:")
                          and (layout == "careful" or i != "repo-docs-instructions"))
        question = (f"Please write the documentation of `{name}` from its code and its relationships "
                    "with the objects above.")
        prompts.append(RepoDocsPrompt(name, segments, question, recurring))
    return prompts
