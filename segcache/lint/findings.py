"""What a rule is, what it reports, and how its fix is applied to a trace.

A ``Rule`` sees every request once, in trace order (``observe``), keeps only
digests and small per-tenant/per-agent state, and is asked at the end
(``finish``) for its verdict. A rule that fired can build a ``Fix``: a
rewrite of each request (and optionally of the simulation's warm-up delay)
that the simulation replays to show what the fix would buy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from segcache.config import BLEND_MODES
from segcache.lint.trace import Request
from segcache.lint.view import RequestView

SEVERITIES = ("error", "warning", "info")


@dataclass(frozen=True)
class LintOptions:
    """Thresholds of the rules and the simulation (all in tokens unless named)."""

    min_lost_tokens: int = 32  # a finding must cost at least this many cacheable tokens
    warm_delay_s: float = 1.0  # a prompt is cached this long after it arrives
    fanout_min: int = 3  # requests in one cold burst
    fragmentation_min_variants: int = 3
    fragmentation_similarity: float = 0.75
    fragmentation_min_chars: int = 100
    roundrobin_min_misrouted: int = 3
    roundrobin_min_fraction: float = 0.2
    max_evidence: int = 10
    # The simulated server: ``segcache serve --blend`` and the engine's prefill chunk
    # (partial hits are rounded to it) and the model plan's independent rows (0: rows
    # depend on the call's shape, the safe assumption).
    blend: str = "marked"
    prefill_chunk: int = 256
    independent_rows: int = 0

    def __post_init__(self) -> None:
        if self.blend not in BLEND_MODES:
            raise ValueError(f"blend must be one of {', '.join(BLEND_MODES)}, got {self.blend!r}")
        if self.prefill_chunk < 0 or self.independent_rows < 0:
            raise ValueError("prefill_chunk and independent_rows must be >= 0")
        if self.warm_delay_s < 0:
            raise ValueError("warm_delay_s must be >= 0")
        if not 0 < self.fragmentation_similarity <= 1:
            raise ValueError("fragmentation_similarity must be in (0, 1]")
        if min(self.fanout_min, self.fragmentation_min_variants, self.max_evidence) < 1:
            raise ValueError("counts must be >= 1")


@dataclass(frozen=True)
class Evidence:
    """Where a defect shows: request index (0-based over the trace), its source
    line, the message index (None for tools or traffic-level evidence), the
    character and token offset in the flat prompt, and the differing text."""

    request: int
    source: str
    message: int | None
    unit: str
    char_offset: int | None
    token_offset: int | None
    text: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Finding:
    rule: str
    severity: str
    title: str
    explanation: str
    fix: str
    count: int  # occurrences (evidence holds the first few)
    requests: int  # distinct requests affected
    tokens_lost: int  # cacheable tokens the occurrences cost, as the rule estimates them
    evidence: list[Evidence]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Fix:
    """A rewrite of the trace. ``apply`` may keep state (requests come in order);
    a fresh Fix is built for every simulated scenario."""

    warm_delay_s: float | None = None  # override of the simulation's warm-up delay

    def apply(self, request: Request) -> Request:
        return request


class Rule:
    id = ""
    severity = "warning"
    title = ""
    explanation = ""
    fix = ""

    def __init__(self, options: LintOptions) -> None:
        self.options = options
        self.count = 0
        self.tokens_lost = 0
        self.evidence: list[Evidence] = []
        self._requests: set[int] = set()

    def observe(self, view: RequestView) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """Called once after the last request; rules that judge the whole trace report here."""

    def make_fix(self) -> Fix | None:
        return None

    def report(self, evidence: Evidence, tokens_lost: int = 0) -> None:
        self.count += 1
        self.tokens_lost += tokens_lost
        self._requests.add(evidence.request)
        if len(self.evidence) < self.options.max_evidence:
            self.evidence.append(evidence)

    def finding(self) -> Finding | None:
        if not self.count:
            return None
        return Finding(self.id, self.severity, self.title, self.explanation, self.fix,
                       self.count, len(self._requests), self.tokens_lost, list(self.evidence))


def evidence_at(view: RequestView, unit: int, char_in_unit: int | None, text: str,
                **detail: Any) -> Evidence:
    """Evidence located at a character of unit ``unit`` (None: the unit's start)."""
    u = view.units[unit]
    char, tok = view.locate(unit, char_in_unit or 0)
    return Evidence(view.index, view.request.source, u.index if u.kind == "message" else None,
                    u.label, char, tok, text, detail)
