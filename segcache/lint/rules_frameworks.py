"""Rules learnt from what real agent frameworks send (LangGraph, CrewAI, the
OpenAI Agents SDK): text that several agents share but that stands behind
per-agent tools or text, shared text wrapped in per-agent text, and request
fields that change a message's key without changing what the model sees.

All comparisons are within one tenant; "agents" are told apart by
``RequestView.agent_key`` (the ``agent`` field, else the conversation).
"""

from __future__ import annotations

from difflib import SequenceMatcher
from typing import Any

from segcache.kv.autoseg import message_digest
from segcache.lint.dynamic import common_suffix, first_difference, snippet
from segcache.lint.findings import Fix, LintOptions, Rule, evidence_at
from segcache.lint.trace import Request
from segcache.lint.view import RequestView

# Message fields a ChatML template renders (tool_call_id: required by the API for
# tool results, so nothing to change there).
RENDERED_FIELDS = frozenset({"role", "content", "tool_calls", "tool_call_id"})
MAX_COMPARED_AGENTS = 8
INSTRUCTION_ROLES = ("system", "developer", "user")  # wrapped-shared-text compares a new agent with this many earlier ones


def _content(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


class SharedTextLate(Rule):
    id = "shared-text-late"
    severity = "warning"
    title = "Shared text behind per-agent tools or text"
    explanation = ("Several agents send the same message, but after a tool set or a message that "
                   "differs between them (per-agent tools with no leading system message, or the "
                   "agent's role first and the shared rules later), so no agent reuses another's "
                   "copy as a prefix.")
    fix = ("Send the shared text first, as the leading system message: segcache puts the tool "
           "declarations after it, so agents with different tools still share it; put the "
           "agent's role and task after it. (With --blend auto segcache can also reuse the "
           "chunks of a multi-paragraph message where they stand, at a small recompute cost: "
           "run segcache lint --blend auto to see how much.)")

    def __init__(self, options: LintOptions) -> None:
        super().__init__(options)
        self._first: dict[tuple[str, str], tuple[tuple[str, str], int, tuple[str, ...]]] = {}
        self._chains: dict[str, set[str]] = {}
        self._reported: set[tuple[str, tuple[str, str], str]] = set()
        self.shared: set[str] = set()  # message digests to move first

    def observe(self, view: RequestView) -> None:
        agent = view.agent_key()
        tenant = view.request.tenant
        chains = self._chains.setdefault(tenant, set())
        digests = tuple(u.digest for u in view.units)
        for i in view.message_units():
            u = view.units[i]
            if agent is None or i == 0 or u.role not in INSTRUCTION_ROLES:
                continue  # history (replies, tool results) cannot move; instructions can
            first = self._first.setdefault((tenant, u.digest), (agent, view.index, digests[:i]))
            if (first[0] == agent or view.chains[i] in chains or view.tokens[i] < self.options.min_lost_tokens
                    or (tenant, agent, u.digest) in self._reported):
                continue
            k = next((j for j, (a, b) in enumerate(zip(digests, first[2], strict=False)) if a != b),
                     min(i, len(first[2])))
            own = sum(view.tokens[j] for j in range(k, i) if view.units[j].digest not in first[2])
            if own >= view.tokens[i]:
                continue  # more per-agent text in front than shared text: moving it would not pay
            cause = "tool set" if view.units[k].kind == "tools" else view.units[k].label
            self._reported.add((tenant, agent, u.digest))
            self.shared.add(u.digest)
            self.report(evidence_at(view, i, None,
                                    f"{u.label}, {view.tokens[i]} tokens, is also sent by request "
                                    f"{first[1]}, but behind a different {cause}",
                                    earlier_request=first[1], behind=cause),
                        tokens_lost=view.tokens[i])
        chains.update(view.chains)

    def make_fix(self) -> Fix:
        return SharedFirst(self.shared)


class SharedFirst(Fix):
    """Messages several agents share move to the front, as leading system messages."""

    def __init__(self, shared: set[str]) -> None:
        self.shared = shared

    def apply(self, request: Request) -> Request:
        moved = [m for m in request.messages if message_digest(m) in self.shared]
        if not moved:
            return request
        rest = [m for m in request.messages if message_digest(m) not in self.shared]
        head = [{"role": "system", "content": _content(m)} for m in moved]
        return request.with_body({**request.body, "messages": head + rest})


def shared_block(new: str, old: str) -> tuple[int, int, int]:
    """(start in ``new``, start in ``old``, length) of a longest common block of
    two texts, found over whole lines and widened by characters at both ends
    (a shared block often starts mid-line, after "You are {role}. ")."""
    a, b = new.splitlines(keepends=True), old.splitlines(keepends=True)
    i, j, k = SequenceMatcher(None, a, b, autojunk=False).find_longest_match(0, len(a), 0, len(b))
    if k == 0:
        return 0, 0, 0
    sa, sb = sum(map(len, a[:i])), sum(map(len, b[:j]))
    ea, eb = sa + sum(map(len, a[i:i + k])), sb + sum(map(len, b[j:j + k]))
    back = common_suffix(new[:sa], old[:sb], min(sa, sb))
    ahead = first_difference(new[ea:], old[eb:])
    return sa - back, sb - back, ea - sa + back + ahead


class WrappedSharedText(Rule):
    id = "wrapped-shared-text"
    severity = "warning"
    title = "Shared text wrapped in per-agent text"
    explanation = ("Agents' first messages carry the same long block, but with per-agent text "
                   "before it and after it (\"You are {role}. {shared rules} {goal}\", as CrewAI "
                   "builds its system prompt), so the block is never a shared prefix.")
    fix = ("Send the shared block as its own leading system message and the role, goal and "
           "tools text in a second message (in CrewAI: keep the rules out of the backstory, "
           "e.g. in a system template that starts with them).")

    def __init__(self, options: LintOptions) -> None:
        super().__init__(options)
        self._firsts: dict[str, list[tuple[str, int]]] = {}  # tenant -> (first message text, request)
        self._agents: set[tuple[str, str]] = set()
        self.blocks: set[str] = set()

    def observe(self, view: RequestView) -> None:
        agent = view.agent_key()
        units = view.message_units()
        if agent is None or agent in self._agents or not units:
            return
        self._agents.add(agent)
        i = units[0]
        text = view.units[i].content
        earlier = self._firsts.setdefault(view.request.tenant, [])
        for old, index in earlier[-MAX_COMPARED_AGENTS:]:
            start, _, size = shared_block(text, old)
            block = text[start:start + size]
            head = first_difference(text, old)
            if start <= head or start + size >= len(text) or view.counter.count(block) < self.options.min_lost_tokens:
                continue  # a shared head (a prefix), or nothing after the block: not wrapped
            self.blocks.add(block)
            at = view.content_start(i) + start
            self.report(evidence_at(view, i, at,
                                    f"{size} characters shared with request {index}'s first message, "
                                    f"after {snippet(text, 0, min(start, 30))!r} and before "
                                    f"{snippet(text, start + size, 30)!r}",
                                    earlier_request=index, shared_chars=size),
                        tokens_lost=view.counter.count(block))
            break
        earlier.append((text, view.index))

    def make_fix(self) -> Fix:
        return SplitShared(self.blocks)


class SplitShared(Fix):
    """A message holding a shared block becomes: the block as the leading system
    message, then the message without it."""

    def __init__(self, blocks: set[str]) -> None:
        self.blocks = sorted(blocks, key=len, reverse=True)

    def apply(self, request: Request) -> Request:
        messages = list(request.messages)
        for n, m in enumerate(messages):
            text = _content(m)
            block = next((b for b in self.blocks if b in text), None)
            if block is not None:
                messages[n] = {**m, "content": text.replace(block, "", 1)}
                messages.insert(0, {"role": "system", "content": block})
                return request.with_body({**request.body, "messages": messages})
        return request


class InvisibleFields(Rule):
    id = "invisible-fields"
    severity = "info"
    title = "Request fields the prompt does not show"
    explanation = ("Messages carry fields the chat template does not render (LangGraph sets `name` "
                   "on the replies it sends back): the prompt is the same, but a reply the model "
                   "generated comes back as a different message object. segcache keys what the "
                   "template renders, so this costs it nothing; caches keyed on the request body "
                   "(response caches, gateways, older segcache versions) miss on every kept reply.")
    fix = ("Nothing to change for segcache or for token-level prefix caches. For caches keyed on "
           "the request body, drop the fields the template does not use before sending.")

    def __init__(self, options: LintOptions) -> None:
        super().__init__(options)
        self._seen: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._reported: set[tuple[str, str]] = set()
        self.fields: set[str] = set()

    def observe(self, view: RequestView) -> None:
        tenant = view.request.tenant
        for i in view.message_units():
            u = view.units[i]
            m = view.request.messages[u.index]
            extra = {k: v for k, v in m.items() if k not in RENDERED_FIELDS and v is not None}
            key = (tenant, u.role, u.content)
            earlier = self._seen.setdefault(key, extra)
            # A kept reply: the model generated it without any such field.
            if not extra or (u.role != "assistant" and earlier == extra) or (tenant, u.digest) in self._reported:
                continue
            self._reported.add((tenant, u.digest))
            self.fields.update(extra)
            plain = {k: v for k, v in m.items() if k in RENDERED_FIELDS}
            lost = sum(view.tokens[i:]) if message_digest(m) != message_digest(plain) else 0
            shown = ", ".join(f"{k}={v!r}" for k, v in sorted(extra.items()))
            self.report(evidence_at(view, i, None, f"{u.label} carries {shown}, not rendered",
                                    fields=sorted(extra)), tokens_lost=lost)

    def make_fix(self) -> Fix:
        return DropFields(self.fields)


class DropFields(Fix):
    def __init__(self, fields: set[str]) -> None:
        self.fields = fields

    def apply(self, request: Request) -> Request:
        messages = [{k: v for k, v in m.items() if k not in self.fields} for m in request.messages]
        return request.with_body({**request.body, "messages": messages})
