"""Rules about the shape of each prompt: what changes between requests that
should share a prefix, and whether it needed to.

All comparisons are within one tenant (the cache never crosses tenants), and
the per-agent ones within one agent (``RequestView.agent_key``).
"""

from __future__ import annotations

import json
from typing import Any

from segcache.kv.autoseg import TOOLS_HEADER, canonical_json, canonical_tools, tool_name
from segcache.kv.hashing import segment_digest
from segcache.lint.dynamic import find_values, first_difference, mask, snippet
from segcache.lint.findings import Evidence, Fix, LintOptions, Rule, evidence_at
from segcache.lint.trace import Request
from segcache.lint.view import RequestView, agent_key, masked_digest


def _value_at(text: str, at: int) -> tuple[int, str]:
    """(start, text) of the dynamic value covering ``at``, else (at, a snippet)."""
    for v in find_values(text):
        if v.start <= at < v.end:
            return v.start, v.text
    return at, snippet(text, at, 24)


def _set_content(message: dict[str, Any], text: str) -> dict[str, Any]:
    return {**message, "content": text}


def _content(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


class DynamicPrefix(Rule):
    id = "dynamic-prefix"
    severity = "error"
    title = "Dynamic value before stable content"
    explanation = ("A value that changes per request (timestamp, date, UUID, id, counter, random "
                   "token) sits before content that is otherwise identical, so nothing after it hits.")
    fix = ("Move the value after the stable content (the last user message) or out of the prompt "
           "into request metadata.")

    def __init__(self, options: LintOptions) -> None:
        super().__init__(options)
        self._seen: dict[str, set[str]] = {}  # tenant -> masked chains seen
        self._chains: dict[str, set[str]] = {}  # tenant -> raw chains seen
        self._texts: dict[str, str] = {}  # masked unit digest -> last plain text
        self.flagged: set[str] = set()  # masked digests of units that carried such values

    def observe(self, view: RequestView) -> None:
        seen = self._seen.setdefault(view.request.tenant, set())
        chains = self._chains.setdefault(view.request.tenant, set())
        miss = next((i for i, c in enumerate(view.chains) if c not in chains), None)
        if miss is not None and view.units[miss].kind != "tools" and view.masked_chains[miss] in seen:
            self._check(view, miss, seen)
        seen.update(view.masked_chains)
        chains.update(view.chains)
        for u, m in zip(view.units, view.masked, strict=True):
            self._texts[m] = u.plain_text

    def _check(self, view: RequestView, i: int, seen: set[str]) -> None:
        after = 0
        for j in range(i + 1, len(view.units)):
            if view.masked_chains[j] not in seen:
                break
            after += view.tokens[j]
        old = self._texts.get(view.masked[i])
        if old is None:
            return
        new = view.units[i].plain_text
        at, value = _value_at(new, first_difference(old, new))
        was = _value_at(old, at)[1]
        # Stable tokens behind the value: the rest of its unit, then every unit that would have hit.
        behind = view.counter.count(new[at:]) + after
        if behind < self.options.min_lost_tokens:
            return
        self.flagged.add(view.masked[i])
        self.report(evidence_at(view, i, at, f"{value!r} (was {was!r})", stable_tokens_after=behind),
                    tokens_lost=view.tokens[i] + after)

    def make_fix(self) -> Fix:
        return MaskUnits(self.flagged)


class MaskUnits(Fix):
    """Mask dynamic values in the messages and segments the rule flagged."""

    def __init__(self, flagged: set[str]) -> None:
        self.flagged = flagged

    def apply(self, request: Request) -> Request:
        from segcache.lint.trace import request_units

        units = request_units(request)
        body = dict(request.body)
        messages = list(request.messages)
        segments = list(body.get("segments") or [])
        for u in units:
            if masked_digest(u) not in self.flagged:
                continue
            if u.kind == "message":
                messages[u.index] = _set_content(messages[u.index], mask(_content(messages[u.index])))
            elif u.kind == "segment":
                segments[u.index] = {**segments[u.index], "content": mask(u.content), "hash": None}
        body["messages"] = messages
        if segments:
            body["segments"] = segments
        return request.with_body(body)


def _tools_offset(tools: list[dict[str, Any]], position: int) -> int:
    """Char offset of tool ``position`` inside the plain tools block content."""
    return len(TOOLS_HEADER) + sum(len(json.dumps(t, ensure_ascii=False)) + 1 for t in tools[:position])


def _tools_unit(view: RequestView) -> int | None:
    return next((i for i, u in enumerate(view.units) if u.kind == "tools"), None)


def _masked_tool(tool: dict[str, Any]) -> str:
    return segment_digest(mask(canonical_json(tool)))


class ToolOrder(Rule):
    id = "tool-order"
    severity = "warning"
    title = "Tool list order unstable"
    explanation = ("The same tools arrive in a different order, so a plain prefix cache misses "
                   "from the tools block on (segcache sorts tools; other backends do not).")
    fix = "Sort tools by name (or keep one fixed registry order) before sending."

    def __init__(self, options: LintOptions) -> None:
        super().__init__(options)
        self._orders: dict[tuple[str, frozenset[str]], tuple[tuple[str, ...], int]] = {}

    def observe(self, view: RequestView) -> None:
        tools, ti = view.request.tools, _tools_unit(view)
        if not tools or ti is None:
            return
        key = (view.request.tenant, frozenset(_masked_tool(t) for t in tools))
        order = tuple(tool_name(t) for t in tools)
        first = self._orders.setdefault(key, (order, view.index))
        if first[0] == order:
            return
        pos = next(p for p, (a, b) in enumerate(zip(order, first[0], strict=True)) if a != b)
        at = view.content_start(ti) + _tools_offset(tools, pos)
        self.report(evidence_at(view, ti, at, f"tool {pos} is {order[pos]!r} (was {first[0][pos]!r})",
                                order=list(order), earlier_order=list(first[0]), earlier_request=first[1]),
                    tokens_lost=view.plain_total - view.locate(ti, at)[1])

    def make_fix(self) -> Fix:
        return CanonicalTools()


class CanonicalTools(Fix):
    def apply(self, request: Request) -> Request:
        if not request.tools:
            return request
        return request.with_body({**request.body, "tools": canonical_tools(request.tools)})


class ToolChurn(Rule):
    id = "tool-churn"
    severity = "error"
    title = "Tool set changes between steps of one agent"
    explanation = ("Tools are added, removed or redefined between consecutive steps of one agent; "
                   "the tools block comes right after the leading system text, so every later "
                   "token of the step misses.")
    fix = ("Declare one stable tool set per agent and restrict use per step with tool_choice or "
           "instructions (stable tools + masking), not by editing the list.")

    def __init__(self, options: LintOptions) -> None:
        super().__init__(options)
        self._last: dict[tuple[str, str], tuple[dict[str, str], int]] = {}
        self.union: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        self.churned: set[tuple[str, str]] = set()

    def observe(self, view: RequestView) -> None:
        key = view.agent_key()
        if key is None:
            return
        tools = {tool_name(t): _masked_tool(t) for t in view.request.tools}
        union = self.union.setdefault(key, {})
        for t in view.request.tools:
            union.setdefault(tool_name(t), t)
        prev = self._last.get(key)
        self._last[key] = (tools, view.index)
        if prev is None or prev[0] == tools:
            return
        added = sorted(set(tools) - set(prev[0]))
        removed = sorted(set(prev[0]) - set(tools))
        changed = sorted(n for n in set(tools) & set(prev[0]) if tools[n] != prev[0][n])
        self.churned.add(key)
        ti = _tools_unit(view)
        text = "; ".join(f"{k}: {', '.join(v)}" for k, v in
                         (("added", added), ("removed", removed), ("changed", changed)) if v)
        if ti is None:
            ev = Evidence(view.index, view.request.source, None, "tools", 0, 0, text,
                          {"previous_request": prev[1]})
        else:
            ev = evidence_at(view, ti, None, text, previous_request=prev[1], agent=key[1])
        self.report(ev, tokens_lost=view.seg_total)

    def make_fix(self) -> Fix:
        return StableTools({k: list(v.values()) for k, v in self.union.items()
                            if k in self.churned})


class StableTools(Fix):
    """Every step of a churning agent declares the union of the tools it ever used."""

    def __init__(self, tools_by_agent: dict[tuple[str, str], list[dict[str, Any]]]) -> None:
        self.tools_by_agent = tools_by_agent

    def apply(self, request: Request) -> Request:
        from segcache.lint.trace import request_units

        key = agent_key(request, request_units(request))
        tools = self.tools_by_agent.get(key) if key else None
        return request if tools is None else request.with_body({**request.body, "tools": tools})


def _leaf_difference(old: Any, new: Any, path: str = "$") -> tuple[str, Any, Any] | None:
    """The first JSON path where two same-shaped values differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            found = _leaf_difference(old.get(k), new.get(k), f"{path}.{k}")
            if found:
                return found
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            found = _leaf_difference(a, b, f"{path}[{i}]")
            if found:
                return found
        return None
    return None if old == new else (path, old, new)


def mask_json(value: Any) -> Any:
    """``value`` with dynamic-looking values masked in every string (keys kept)."""
    if isinstance(value, dict):
        return {k: mask_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_json(v) for v in value]
    return mask(value) if isinstance(value, str) else value


class SchemaDynamic(Rule):
    id = "schema-dynamic"
    severity = "error"
    title = "Per-request value inside a tool or response schema"
    explanation = ("A tool or response_format JSON schema carries a value that changes per "
                   "request (request id, timestamp, ...), so the schema is a new prefix every time.")
    fix = "Keep schemas static; pass request ids and trace metadata outside the prompt."

    def __init__(self, options: LintOptions) -> None:
        super().__init__(options)
        self._last: dict[tuple[str, str], tuple[str, Any]] = {}  # (tenant, name) -> (masked, value)
        self.names: set[str] = set()

    def observe(self, view: RequestView) -> None:
        tools, ti = view.request.tools, _tools_unit(view)
        for pos, tool in enumerate(tools):
            at = None if ti is None else view.content_start(ti) + _tools_offset(tools, pos)
            self._compare(view, "tool:" + tool_name(tool), tool, ti, at)
        fmt = view.request.body.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            self._compare(view, "response_format", fmt, None, None)

    def _compare(self, view: RequestView, name: str, value: Any, ti: int | None, at: int | None) -> None:
        key = (view.request.tenant, name)
        masked = mask(canonical_json(value))
        prev = self._last.get(key)
        self._last[key] = (masked, value)
        if prev is None or prev[0] != masked or prev[1] == value:
            return
        diff = _leaf_difference(prev[1], value)
        path, was, now = diff if diff else ("$", None, None)
        text = f"{name} {path} = {now!r} (was {was!r})"
        self.names.add(name)
        if ti is None or at is None:
            ev = Evidence(view.index, view.request.source, None, name, None, None, text, {"path": path})
            self.report(ev)
            return
        at += first_difference(json.dumps(prev[1], ensure_ascii=False), json.dumps(value, ensure_ascii=False))
        self.report(evidence_at(view, ti, at, text, path=path, schema=name),
                    tokens_lost=view.seg_total - view.locate(ti, at)[1])

    def make_fix(self) -> Fix:
        return StaticSchemas(self.names)


class StaticSchemas(Fix):
    def __init__(self, names: set[str]) -> None:
        self.names = names

    def apply(self, request: Request) -> Request:
        body = dict(request.body)
        if request.tools:
            body["tools"] = [mask_json(t) if "tool:" + tool_name(t) in self.names else t
                             for t in request.tools]
        if "response_format" in self.names and isinstance(body.get("response_format"), dict):
            body["response_format"] = mask_json(body["response_format"])
        return request.with_body(body)


class NonCanonicalJson(Rule):
    id = "noncanonical-json"
    severity = "warning"
    title = "Same JSON, different bytes"
    explanation = ("A tool schema or tool-call arguments arrive with the same content but a "
                   "different key order or spacing, which a plain prefix cache sees as new text.")
    fix = "Serialise JSON canonically (sorted keys, fixed separators) before sending."

    def __init__(self, options: LintOptions) -> None:
        super().__init__(options)
        self._raw: dict[tuple[str, str], tuple[str, int]] = {}  # (tenant, canonical) -> (raw, idx)

    def observe(self, view: RequestView) -> None:
        tools, ti = view.request.tools, _tools_unit(view)
        for pos, tool in enumerate(tools):
            raw = json.dumps(tool, ensure_ascii=False)
            base = None if ti is None else view.content_start(ti) + _tools_offset(tools, pos)
            self._compare(view, canonical_json(tool), raw, ti, base, f"tool {tool_name(tool)!r}")
        for i, u in enumerate(view.units):
            if u.kind != "message":
                continue
            for call in view.request.messages[u.index].get("tool_calls") or []:
                args = (call.get("function") or {}).get("arguments")
                if isinstance(args, str):
                    try:
                        canonical = canonical_json(json.loads(args))
                    except json.JSONDecodeError:
                        continue
                    base = u.plain_text.find(args)
                    self._compare(view, canonical, args, i, base if base >= 0 else None,
                                  "tool-call arguments")

    def _compare(self, view: RequestView, canonical: str, raw: str, unit: int | None,
                 base: int | None, what: str) -> None:
        key = (view.request.tenant, canonical)
        first = self._raw.setdefault(key, (raw, view.index))
        if first[0] == raw:
            return
        at = first_difference(first[0], raw)
        text = f"{what}: {snippet(raw, at, 30)!r} (was {snippet(first[0], at, 30)!r})"
        if unit is None or base is None:
            self.report(Evidence(view.index, view.request.source, None, what, None, None, text,
                                 {"earlier_request": first[1]}))
            return
        self.report(evidence_at(view, unit, base + at, text, earlier_request=first[1]),
                    tokens_lost=view.plain_total - view.locate(unit, base + at)[1])

    def make_fix(self) -> Fix:
        return CanonicalJson()


class CanonicalJson(Fix):
    def apply(self, request: Request) -> Request:
        body = dict(request.body)
        if request.tools:
            body["tools"] = [json.loads(canonical_json(t)) for t in request.tools]
        messages = []
        for m in request.messages:
            if m.get("tool_calls"):
                m = {**m, "tool_calls": [_canonical_call(c) for c in m["tool_calls"]]}
            messages.append(m)
        body["messages"] = messages
        return request.with_body(body)


def _canonical_call(call: dict[str, Any]) -> dict[str, Any]:
    fn = dict(call.get("function") or {})
    try:
        fn["arguments"] = canonical_json(json.loads(fn.get("arguments", "{}")))
    except (json.JSONDecodeError, TypeError):
        pass
    return {**call, "function": fn}
