"""The linter's two passes over a trace.

1. Every rule observes every request; the baseline simulation runs alongside.
2. If rules fired, the trace is read again and replayed once per fix (each
   alone) and once with all fixes together, so the report can say what each
   fix buys. Only the rewritten requests are tokenized anew (memoised).

The trace is given as a function that opens it, so files are streamed twice
instead of held in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from segcache.lint.findings import Finding, Fix, LintOptions, Rule
from segcache.lint.rules_conversation import HistoryRewrite, SystemFragmentation
from segcache.lint.rules_frameworks import InvisibleFields, SharedTextLate, WrappedSharedText
from segcache.lint.rules_prompt import (
    DynamicPrefix,
    NonCanonicalJson,
    SchemaDynamic,
    ToolChurn,
    ToolOrder,
)
from segcache.lint.rules_traffic import ColdFanout, RoundRobin
from segcache.lint.simulate import CacheSim, SimResult
from segcache.lint.tokens import TokenCounter
from segcache.lint.trace import Request
from segcache.lint.view import build_view

# Order of application when all fixes are replayed together: conversation shape
# first (it decides which messages exist and where), then text, then tools, then traffic.
RULES: tuple[type[Rule], ...] = (
    HistoryRewrite, SystemFragmentation, WrappedSharedText, SharedTextLate, InvisibleFields,
    DynamicPrefix, SchemaDynamic, NonCanonicalJson, ToolOrder, ToolChurn, ColdFanout, RoundRobin,
)
RULE_IDS = tuple(r.id for r in RULES)
ALL_FIXES = "all fixes"


@dataclass
class Scenario:
    name: str
    result: SimResult

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.result.summary()}


@dataclass
class LintResult:
    requests: int
    tokenizer: str
    findings: list[Finding]
    baseline: Scenario
    fixes: list[Scenario] = field(default_factory=list)
    blend: str = "marked"  # the simulated server's --blend

    @property
    def errors(self) -> int:
        return sum(1 for f in self.findings if f.severity == "error")

    def fired(self) -> set[str]:
        return {f.rule for f in self.findings}

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "tokenizer": self.tokenizer,
            "findings": [f.to_dict() for f in self.findings],
            "simulation": {"blend": self.blend, "baseline": self.baseline.to_dict(),
                           "fixes": [s.to_dict() for s in self.fixes]},
        }


def lint(open_trace: Callable[[], Iterable[Request]], counter: TokenCounter,
         options: LintOptions | None = None, rules: Iterable[str] | None = None,
         simulate_fixes: bool = True) -> LintResult:
    """Run the rules named in ``rules`` (default: all) over the trace and, unless
    ``simulate_fixes`` is False, replay it once more per fix."""
    options = options or LintOptions()
    wanted = set(RULE_IDS if rules is None else rules)
    unknown = wanted - set(RULE_IDS)
    if unknown:
        raise ValueError(f"unknown rule(s): {', '.join(sorted(unknown))} (known: {', '.join(RULE_IDS)})")
    active = [r(options) for r in RULES if r.id in wanted]
    baseline = _sim(options, options.warm_delay_s)
    n = 0
    for request in open_trace():
        view = build_view(request, counter)
        for rule in active:
            rule.observe(view)
        baseline.observe(view)
        n += 1
    for rule in active:
        rule.finish()
    fired = [r for r in active if r.count]
    findings = [f for f in (r.finding() for r in fired) if f is not None]
    result = LintResult(n, counter.describe(), findings, Scenario("as traced", baseline.result),
                        blend=options.blend)
    if fired and simulate_fixes:
        result.fixes = _replay_fixes(open_trace, counter, options, fired)
    return result


def _replay_fixes(open_trace: Callable[[], Iterable[Request]], counter: TokenCounter,
                  options: LintOptions, fired: list[Rule]) -> list[Scenario]:
    pipelines: list[tuple[str, list[Fix]]] = []
    for rule in fired:
        fix = rule.make_fix()
        if fix is not None:
            pipelines.append((f"fix {rule.id}", [fix]))
    if len(pipelines) > 1:
        pipelines.append((ALL_FIXES, [f for f in (r.make_fix() for r in fired) if f is not None]))
    sims = [_sim(options, _warm_delay(options, fixes)) for _, fixes in pipelines]
    for request in open_trace():
        for (_, fixes), sim in zip(pipelines, sims, strict=True):
            fixed = request
            for fix in fixes:
                fixed = fix.apply(fixed)
            sim.observe(build_view(fixed, counter))
    return [Scenario(name, sim.result) for (name, _), sim in zip(pipelines, sims, strict=True)]


def _sim(options: LintOptions, warm_delay_s: float) -> CacheSim:
    return CacheSim(warm_delay_s, options.blend, options.prefill_chunk, options.independent_rows)


def _warm_delay(options: LintOptions, fixes: list[Fix]) -> float:
    overrides = [f.warm_delay_s for f in fixes if f.warm_delay_s is not None]
    return min(overrides) if overrides else options.warm_delay_s
