"""Rules about how conversations and system prompts evolve over the trace:
history rewritten instead of appended, and near-identical system prompt variants."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from segcache.kv.autoseg import message_text
from segcache.kv.hashing import segment_digest
from segcache.lint.dynamic import common_suffix, first_difference, mask, snippet, word_start
from segcache.lint.findings import Evidence, Fix, LintOptions, Rule, evidence_at
from segcache.lint.trace import Request, request_units
from segcache.lint.view import RequestView, agent_key


@dataclass
class _Step:
    index: int
    digests: list[str]  # masked digest per message
    texts: list[str]  # plain text per message
    roles: list[str]


def _messages(view: RequestView) -> _Step:
    idx = view.message_units()
    return _Step(view.index, [view.masked[i] for i in idx], [view.units[i].plain_text for i in idx],
                 [view.units[i].role for i in idx])


class HistoryRewrite(Rule):
    id = "history-rewrite"
    severity = "error"
    title = "Conversation history rewritten, not appended"
    explanation = ("A later step of the same conversation changes or drops an earlier message, "
                   "so everything from that message on is recomputed.")
    fix = ("Grow the conversation append-only; if it must shrink, summarise once and keep the "
           "summary fixed, or put the changing part at the end.")

    def __init__(self, options: LintOptions) -> None:
        super().__init__(options)
        self._last: dict[tuple[str, str], _Step] = {}
        self.rewritten: dict[tuple[str, str], int] = {}  # agent -> first rewriting request

    def observe(self, view: RequestView) -> None:
        key = view.agent_key()
        if key is None:
            return
        step = _messages(view)
        prev = self._last.get(key)
        self._last[key] = step
        if prev is None or not _continues(prev, step):
            return
        k = 0
        while k < min(len(prev.digests), len(step.digests)) and prev.digests[k] == step.digests[k]:
            k += 1
        if k >= len(prev.digests) or k >= len(step.digests):
            return  # appended (or a retry / rollback of the same messages)
        unit = view.message_units()[k]
        at = word_start(step.texts[k], first_difference(prev.texts[k], step.texts[k]))
        text = f"{snippet(step.texts[k], at)!r} (was {snippet(prev.texts[k], at)!r})"
        lost = sum(view.tokens[unit:])
        if lost >= self.options.min_lost_tokens:
            self.rewritten.setdefault(key, view.index)
            self.report(evidence_at(view, unit, at, text, previous_request=prev.index), tokens_lost=lost)

    def make_fix(self) -> Fix:
        return AppendOnly(self.rewritten)


def _continues(prev: _Step, step: _Step) -> bool:
    """Same conversation: the new step repeats a non-system message of the previous one."""
    own = set(step.digests)
    return any(d in own for d, r in zip(prev.digests, prev.roles, strict=True) if r != "system")


class AppendOnly(Fix):
    """Replay each rewriting conversation append-only, from its first rewrite on:
    the previous step's messages as sent, then what this step adds after the
    last message it shares with them. Differences in dynamic values alone are
    left to the dynamic-prefix fix."""

    def __init__(self, rewritten: dict[tuple[str, str], int]) -> None:
        self.rewritten = rewritten
        self._last: dict[tuple[str, str], list[dict[str, Any]]] = {}

    def apply(self, request: Request) -> Request:
        key = agent_key(request, request_units(request))
        if key not in self.rewritten:
            return request
        msgs, prev = request.messages, self._last.get(key)
        if prev is not None and request.index >= self.rewritten[key]:
            own = {_masked(m) for m in prev if m.get("role") != "system"}
            new = [_masked(m) for m in msgs]
            shared = [i for i, d in enumerate(new) if d in own]
            if shared and new[:len(prev)] != [_masked(m) for m in prev]:
                msgs = prev + msgs[shared[-1] + 1:]
        self._last[key] = msgs
        return request if msgs is request.messages else request.with_body({**request.body, "messages": msgs})


def _masked(message: dict[str, Any]) -> str:
    return segment_digest(f"{message.get('role')}\x00{mask(message_text(message))}")


@dataclass
class _Cluster:
    rep: str
    lcp: int
    lcs: int
    variants: list[Evidence] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)


class SystemFragmentation(Rule):
    id = "system-fragmentation"
    severity = "warning"
    title = "Many near-identical system prompt variants"
    explanation = ("Several system prompts are the same text with small edits (route- or "
                   "user-specific lines), so each variant warms its own copy of the shared text.")
    fix = ("Keep one shared system message with the common text, and put the variant-specific "
           "lines in a second message after it (prompt families), or unify the variants.")

    MAX_CLUSTERS = 64

    def __init__(self, options: LintOptions) -> None:
        super().__init__(options)
        self._seen: set[tuple[str, str]] = set()
        self._clusters: dict[str, list[_Cluster]] = {}

    def observe(self, view: RequestView) -> None:
        for i in view.message_units():
            u = view.units[i]
            if u.role != "system" or len(u.content) < self.options.fragmentation_min_chars:
                continue
            if (view.request.tenant, view.masked[i]) in self._seen:
                continue
            self._seen.add((view.request.tenant, view.masked[i]))
            self._add(view, i)

    def _add(self, view: RequestView, i: int) -> None:
        text = view.units[i].content
        clusters = self._clusters.setdefault(view.request.tenant, [])
        for c in clusters:
            lcp = word_start(text, first_difference(c.rep, text))
            lcs = common_suffix(c.rep, text, min(len(c.rep), len(text)) - lcp)
            if (lcp + lcs) / max(len(c.rep), len(text)) >= self.options.fragmentation_similarity:
                c.lcp, c.lcs = min(c.lcp, lcp), min(c.lcs, lcs)
                at = view.content_start(i) + lcp
                c.variants.append(evidence_at(view, i, at, f"{snippet(text, lcp)!r} (was {snippet(c.rep, lcp)!r})"))
                c.texts.append(text)
                return
        if len(clusters) < self.MAX_CLUSTERS:
            clusters.append(_Cluster(text, len(text), len(text), texts=[text]))

    def finish(self) -> None:
        for clusters in self._clusters.values():
            for c in clusters:
                if len(c.texts) >= self.options.fragmentation_min_variants:
                    for ev in c.variants:
                        self.report(ev, tokens_lost=0)

    def make_fix(self) -> Fix:
        families = []
        for clusters in self._clusters.values():
            for c in clusters:
                if len(c.texts) >= self.options.fragmentation_min_variants:
                    families.append((c.rep[:c.lcp], c.rep[len(c.rep) - c.lcs:] if c.lcs else ""))
        return PromptFamilies(families)


class PromptFamilies(Fix):
    """Split each variant into (shared text) + (its own lines) as two system messages."""

    def __init__(self, families: list[tuple[str, str]]) -> None:
        self.families = families

    def apply(self, request: Request) -> Request:
        out, changed = [], False
        for m in request.messages:
            content = m.get("content")
            split = self._split(content) if m.get("role") == "system" and isinstance(content, str) else None
            if split is None:
                out.append(m)
                continue
            out += [{**m, "content": split[0]}, {**m, "content": split[1]}]
            changed = True
        return request.with_body({**request.body, "messages": out}) if changed else request

    def _split(self, text: str) -> tuple[str, str] | None:
        for prefix, suffix in self.families:
            if (text.startswith(prefix) and text.endswith(suffix)
                    and len(text) > len(prefix) + len(suffix)):
                return prefix + suffix, text[len(prefix):len(text) - len(suffix)]
        return None
