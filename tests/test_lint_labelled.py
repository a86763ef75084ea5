"""Precision and recall of segcache lint over a labelled set of synthetic traces.

49 traces from ``segcache.lint.synth`` (seeded multi-agent workloads): 36 with one
planted defect (3 per rule, varied seeds, crew sizes, replica counts and record
shapes), 5 with two defects that do not hide each other, and 8 clean ones whose
hard negatives are built in (a constant date in the first system message, a
date at the end of each task, agent-sticky replicas, one cache miss per new
replica). A decision is (trace, rule): fired or not; the label is "planted".

Pairs where one defect removes the other's cost are left out on purpose: with a
request id in a tool schema every prompt is new from its first unit, so a cold
fan-out loses nothing and the linter rightly stays silent about it.

Threshold, and why: every planted defect is built to cost more than
``min_lost_tokens`` (invisible-fields is informational: reported whatever it
costs), so each one should be found and a perfect score is expected; 0.95
leaves room for one odd interaction while failing when any one rule regresses
(a rule that stops firing loses its 3+ of the 46 planted defects: recall <=
0.94; one that fires on every clean trace adds 8+ false positives: precision
<= 0.85). Location accuracy (first evidence at the
planted request) is held to the same bar.
"""

from __future__ import annotations

from segcache.lint import synth
from segcache.lint.analyze import RULE_IDS
from tests.test_lint_rules import counter, run_lint  # noqa: F401 (fixture)

PAIRS = (
    ("tool-order", "history-rewrite"),
    ("noncanonical-json", "cold-fanout"),
    ("tool-churn", "round-robin"),
    ("system-fragmentation", "schema-dynamic"),
    ("dynamic-prefix", "tool-churn"),
)


def labelled_set() -> list[tuple[str, synth.Trace]]:
    cases = []
    for r, rule in enumerate(RULE_IDS):
        for k in range(3):
            seed = 100 + 10 * r + k
            trace = synth.generate(seed, (rule,), agents=3 + k, steps=4 + k % 2,
                                   replicas=2 + k % 2, log_records=k == 1)
            cases.append((f"{rule}/{seed}", trace))
    for p, pair in enumerate(PAIRS):
        cases.append(("+".join(pair), synth.generate(300 + p, pair, agents=4, steps=4)))
    for c in range(8):
        cases.append((f"clean/{c}", synth.generate(400 + c, (), agents=3 + c % 3, steps=3 + c % 3,
                                                   replicas=2 + c % 2, log_records=c % 2 == 1)))
    return cases


def test_precision_and_recall_over_labelled_traces(counter, capsys):  # noqa: F811
    cases = labelled_set()
    assert len(cases) >= 30
    tp = fp = fn = located = 0
    misses = []
    per_rule = {r: [0, 0, 0] for r in RULE_IDS}  # tp, fp, fn
    for name, trace in cases:
        result = run_lint(trace, counter)
        fired = result.fired()
        for rule in RULE_IDS:
            planted, hit = rule in trace.planted, rule in fired
            if planted and hit:
                tp += 1
                per_rule[rule][0] += 1
                first = next(f for f in result.findings if f.rule == rule).evidence
                if trace.expected[rule].request in {e.request for e in first}:
                    located += 1
                else:
                    misses.append(f"{name}: {rule} found elsewhere")
            elif hit:
                fp += 1
                per_rule[rule][1] += 1
                misses.append(f"{name}: false {rule}")
            elif planted:
                fn += 1
                per_rule[rule][2] += 1
                misses.append(f"{name}: missed {rule}")
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    with capsys.disabled():
        print(f"\nsegcache lint over {len(cases)} labelled traces: precision {precision:.3f}, "
              f"recall {recall:.3f}, located {located}/{tp} (tp {tp}, fp {fp}, fn {fn})")
        for rule, (t, f, n) in per_rule.items():
            print(f"  {rule:22s} tp {t}  fp {f}  fn {n}")
        for m in misses:
            print("  " + m)
    assert precision >= 0.95 and recall >= 0.95, misses
    assert located / tp >= 0.95, misses
