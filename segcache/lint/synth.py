"""Seeded multi-agent traces with planted cache defects, for tests and demos.

The clean workload follows seed 000 / the bench multi-agent workload as plain
OpenAI requests: every agent sends the shared global rules (system message 0)
and the shared tool list, then its own skills (system message 1), then its
task (a user message); each step appends the assistant's tool call and the
tool's result, so conversations grow append-only. Agents take turns
(step-major order); the first request warms the shared prefix before the
others start; requests stick to one replica per agent.

``plant`` names the defects to build in (rule ids of ``segcache.lint``);
``Trace.expected`` says where each one must be reported: the request index and,
where it applies, the message index and the character offset in the flat
prompt.
"""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from segcache.lint.trace import plain_tools_text

WORDS = (
    "agent cache prefix token segment review module request shared stable history plan "
    "check report update file test branch commit build deploy config error result value "
    "schema field index query answer reason context budget policy owner team service "
    "client server network storage memory latency throughput replica router window "
    "summary detail example careful precise short clear always never before after"
).split()
TOOL_NAMES = ("read_file", "search", "run_tests", "write_file", "list_dir", "open_issue")
ROUTES = ("billing", "support", "research", "operations", "security")
T0 = 1_750_000_000.0


@dataclass(frozen=True)
class Expected:
    request: int
    message: int | None = None
    char_offset: int | None = None


@dataclass
class Trace:
    records: list[dict[str, Any]]
    planted: set[str]
    expected: dict[str, Expected] = field(default_factory=dict)

    def to_jsonl(self) -> str:
        return "".join(json.dumps(r) + "\n" for r in self.records)


def _prose(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n_words)]
    sentences = [" ".join(words[i:i + 12]).capitalize() + "." for i in range(0, n_words, 12)]
    return "\n".join(" ".join(sentences[i:i + 4]) for i in range(0, len(sentences), 4))


def _tool(rng: random.Random, name: str) -> dict[str, Any]:
    props = {w: {"type": "string", "description": _prose(rng, 8)} for w in rng.sample(WORDS, 3)}
    return {"type": "function", "function": {
        "name": name, "description": _prose(rng, 20),
        "parameters": {"type": "object", "properties": props, "required": sorted(props)[:1]},
    }}


@dataclass
class _Agent:
    name: str
    skill: str
    task: str
    messages: list[dict[str, Any]] = field(default_factory=list)
    tools: list[dict[str, Any]] | None = None


def generate(seed: int = 0, plant: tuple[str, ...] = (), agents: int = 4, steps: int = 4,
             replicas: int = 2, log_records: bool = False) -> Trace:
    """A trace of ``agents * steps`` requests with the defects in ``plant``."""
    rng = random.Random(seed)
    planted = set(plant)
    tools = [_tool(rng, n) for n in TOOL_NAMES]
    # A constant date early is fine (it never changes): a hard negative for dynamic-prefix.
    rules = "Global rules. Knowledge cutoff: 2024-06-01.\n" + _prose(rng, 160)
    crew = [_Agent(f"agent-{a}", f"Skills of agent {a}.\n" + _prose(rng, 60),
                   _prose(rng, 30) + f" Today is 2025-0{1 + a % 9}-1{a % 10}.") for a in range(agents)]
    plan = _Plan(
        churn=(rng.randrange(agents), rng.randrange(1, steps)),
        rewrite=(rng.randrange(agents), rng.randrange(2, steps)) if steps > 2 else (0, 2),
        order=rng.randrange(1, agents * steps),
        dynamic_message=rng.choice((0, 1)),
        dynamic_kind=rng.choice(("timestamp", "uuid", "request", "counter")),
        reorder_keys=rng.random() < 0.5,
    )
    trace = Trace([], planted)
    for step in range(steps):
        for a, agent in enumerate(crew):
            index = len(trace.records)
            if step == 0:
                agent.messages = [{"role": "user", "content": agent.task}]
            else:
                _append_step(rng, agent, step, named="invisible-fields" in planted)
                if "invisible-fields" in planted and "invisible-fields" not in trace.expected:
                    trace.expected["invisible-fields"] = Expected(index, 3)  # LangGraph-style `name`
            if "history-rewrite" in planted and (a, step) == plan.rewrite:
                k = 2 + 2 * rng.randrange(step - 1)  # an earlier tool result
                agent.messages[k] = {**agent.messages[k], "content": "Summary: " + _prose(rng, 10)}
                trace.expected["history-rewrite"] = Expected(index, 2 + k)
            body_tools = _step_tools(rng, planted, tools, agent, (a, step), plan, index, trace)
            system = [rules, agent.skill]
            if "system-fragmentation" in planted:
                system[0] = f"Route: {ROUTES[a % len(ROUTES)]} desk.\n" + rules
                if a == 1 and step == 0:
                    trace.expected["system-fragmentation"] = Expected(index, 0)
            if "dynamic-prefix" in planted:
                m = plan.dynamic_message
                head, value = _dynamic_value(rng, plan.dynamic_kind, index)
                system[m] = f"Context: {head}{value}\n" + system[m]
                if index == (1 if m == 0 else agents):
                    # The tools block stands after the leading system message.
                    offset = len(_frame("system", plain_tools_text(body_tools))) if m > 0 else 0
                    offset += sum(len(_frame("system", t)) for t in system[:m])
                    offset += len("<|im_start|>system\nContext: ") + len(head)
                    trace.expected["dynamic-prefix"] = Expected(index, m, offset)
            if "wrapped-shared-text" in planted:  # CrewAI: "You are {role}. {rules}\nYour goal: {goal}"
                system[0] = f"You are {agent.name}. {rules}\nYour personal goal is: {agent.task}"
                trace.expected["wrapped-shared-text"] = Expected(1, 0)
            messages = [{"role": "system", "content": s} for s in system] + agent.messages
            if "shared-text-late" in planted:  # the agent's own text first, the shared rules later
                messages = [messages[1], {"role": "user", "content": messages[0]["content"]}, *messages[2:]]
                trace.expected["shared-text-late"] = Expected(1, 1)
            if ("noncanonical-json" in planted and not plan.reorder_keys and step >= 2
                    and "noncanonical-json" not in trace.expected):
                messages = _reformat_first_call(messages)
                trace.expected["noncanonical-json"] = Expected(index, 3)
            record = {"model": "smollm2", "messages": messages, "tools": body_tools}
            meta = {"agent": agent.name, "timestamp": _time(planted, step, a),
                    "replica": _replica(planted, index, a, replicas, agents)}
            trace.records.append({"request": record, **meta} if log_records else {**record, **meta})
    if "cold-fanout" in planted:
        trace.expected["cold-fanout"] = Expected(0)
    if "round-robin" in planted:
        trace.expected["round-robin"] = Expected(1)  # lands on r1 while r0 holds the shared prefix
    return trace


@dataclass(frozen=True)
class _Plan:
    """Where the defects go (drawn once per trace from its seed)."""

    churn: tuple[int, int]  # (agent, step)
    rewrite: tuple[int, int]
    order: int  # request index
    dynamic_message: int
    dynamic_kind: str
    reorder_keys: bool


def _frame(role: str, content: str) -> str:
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


def _dynamic_value(rng: random.Random, kind: str, index: int) -> tuple[str, str]:
    """(text before the value, the value) of one per-request context line."""
    if kind == "timestamp":
        return "", datetime.fromtimestamp(T0 + 7 * index + rng.random(), UTC).isoformat()
    if kind == "uuid":
        return "", str(uuid.UUID(int=rng.getrandbits(128)))
    if kind == "request":
        return "request ", f"req_{rng.getrandbits(48):012x}"
    return "call ", str(index + 1)


def _append_step(rng: random.Random, agent: _Agent, step: int, named: bool = False) -> None:
    name = rng.choice(TOOL_NAMES)
    args = {"path": f"src/{rng.choice(WORDS)}_{step}.py", "reason": rng.choice(WORDS)}
    call = {"id": f"call_{agent.name}_{step}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(args)}}
    agent.messages += [
        {"role": "assistant", "content": "", "tool_calls": [call], **({"name": agent.name} if named else {})},
        {"role": "tool", "tool_call_id": call["id"], "content": _prose(rng, 40)},
    ]


def _step_tools(rng: random.Random, planted: set[str], tools: list[dict[str, Any]], agent: _Agent,
                where: tuple[int, int], plan: _Plan, index: int, trace: Trace) -> list[dict[str, Any]]:
    out = agent.tools if agent.tools is not None else tools
    if "tool-churn" in planted and where == plan.churn:
        dropped = rng.choice(TOOL_NAMES)
        agent.tools = out = [t for t in tools if t["function"]["name"] != dropped]
        trace.expected["tool-churn"] = Expected(index)
    if "schema-dynamic" in planted:
        out = json.loads(json.dumps(out))
        params = next(t for t in out if t["function"]["name"] == "search")["function"]["parameters"]
        params["properties"]["request_id"] = {"type": "string", "const": f"req_{rng.getrandbits(40):010x}"}
        trace.expected["schema-dynamic"] = Expected(1)
    if "tool-order" in planted and index == plan.order:
        out = list(reversed(out))
        trace.expected["tool-order"] = Expected(index)
    if "noncanonical-json" in planted and plan.reorder_keys and index == 1:
        first = out[0]
        out = [{k: first[k] for k in reversed(first)}, *out[1:]]
        trace.expected["noncanonical-json"] = Expected(index)
    return out


def _reformat_first_call(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The agent's first tool call re-sent with its arguments pretty-printed."""
    out = list(messages)
    m = out[3]
    call = m["tool_calls"][0]
    args = json.dumps(json.loads(call["function"]["arguments"]), indent=1)
    out[3] = {**m, "tool_calls": [{**call, "function": {**call["function"], "arguments": args}}]}
    return out


def _time(planted: set[str], step: int, a: int) -> float:
    if "cold-fanout" in planted and step == 0:
        return T0 + 0.05 * a  # every agent starts at once, before anything is warm
    return T0 + step * 30.0 + (0.0 if step == 0 and a == 0 else 5.0 + 2.0 * a)


def _replica(planted: set[str], index: int, a: int, replicas: int, agents: int) -> str:
    if "round-robin" in planted:
        # One more replica than the clean trace, and never a divisor of the crew size:
        # otherwise round-robin over step-major order would pin each agent to one replica.
        n = replicas + 1
        while agents % n == 0:
            n += 1
        return f"r{index % n}"
    return f"r{a % replicas}"
