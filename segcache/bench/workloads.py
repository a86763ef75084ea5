"""Seeded benchmark workloads: lists of chat requests built from real text.

A workload is a function ``(WorkloadOptions) -> list[BenchRequest]``; the same
options give the same requests (for one Python version, whose standard library
is the text source, see ``corpus``). A request carries its prompt as ordered
segments plus trailing messages; the runner sends it either with ``segments[]``
or flattened into a system message (``mode``), so every server sees the same
text.

Sizes are given in tokens and turned into characters with
``chars_per_token`` (3.8 measured with SmolLM2's tokenizer on this corpus:
prose 4.05, tool JSON 3.7, code 3.6-4.0). The server's ``usage.prompt_tokens``
is what reports quote; sizes here only aim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from segcache.bench.corpus import Corpus

CHARS_PER_TOKEN = 3.8


@dataclass(frozen=True)
class BenchRequest:
    """One chat request of a workload.

    ``segments`` are ``(id, content)`` in prompt order; ``messages`` follow them
    (OpenAI message dicts, no system message: the segments are the system part).
    """

    label: str
    agent: int
    turn: int
    segments: list[tuple[str, str]]
    messages: list[dict]
    max_tokens: int


@dataclass(frozen=True)
class MultiAgentSizes:
    """Approximate token sizes of seed 000's blocks (A global, B/C agent, D/E task)."""

    global_tokens: int = 2500
    agent_tokens: int = 900
    task_tokens: int = 250

    def __post_init__(self) -> None:
        if min(self.global_tokens, self.agent_tokens, self.task_tokens) < 20:
            raise ValueError("block sizes must be >= 20 tokens")


@dataclass(frozen=True)
class WorkloadOptions:
    seed: int = 0
    turns: int = 3
    max_tokens: int = 32
    chars_per_token: float = CHARS_PER_TOKEN
    sizes: MultiAgentSizes = field(default_factory=MultiAgentSizes)

    def __post_init__(self) -> None:
        if self.turns < 1:
            raise ValueError("turns must be >= 1")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if not 0.5 <= self.chars_per_token <= 20:
            raise ValueError("chars_per_token must be in [0.5, 20]")

    def chars(self, tokens: int) -> int:
        return round(tokens * self.chars_per_token)


# Agents of seed 000: (name, agent block, task block).
AGENTS = (("backend", "B", "D"), ("frontend", "C", "E"), ("docs", "B", "E"))

QUESTIONS = (
    "Explain in two sentences what `{name}` does.",
    "List the edge cases `{name}` has to handle.",
    "Write one unit test for `{name}`.",
    "Suggest a clearer name for `{name}` and say why.",
    "What could make `{name}` raise an exception?",
    "Which callers of `{name}` would break if its signature changed?",
    "Rewrite the docstring of `{name}` in one line.",
    "Is `{name}` thread-safe? Answer briefly.",
    "What is the time complexity of `{name}`?",
)


def _header(title: str, body: str, n_chars: int) -> str:
    head = f"# {title}\n\n"
    return head + body[: max(0, n_chars - len(head))].rstrip()


def multi_agent_blocks(opts: WorkloadOptions) -> tuple[dict[str, tuple[str, str]], dict[str, list[str]]]:
    """Seed 000's blocks: letter -> (segment id, content), and per task block the
    function names its code defines (what the user turns ask about)."""
    corpus = Corpus(opts.seed)
    s = opts.sizes
    a_chars = opts.chars(s.global_tokens)
    rules = corpus.prose(int(a_chars * 0.4))
    tools = corpus.tool_schemas(a_chars - len(rules) - 40)
    blocks = {"A": ("global-rules", _header("Global rules and tools", f"{rules}\n\n## Tools\n\n{tools}", a_chars))}
    for letter, role in (("B", "backend"), ("C", "frontend")):
        name, code, _ = corpus.code(opts.chars(s.agent_tokens) - 80)
        body = f"Skills and project memory of the {role} agent. Module summary ({name}):\n\n{code}"
        blocks[letter] = (f"{role}-skills", _header(f"Agent: {role}", body, opts.chars(s.agent_tokens)))
    names: dict[str, list[str]] = {}
    for letter, task in (("D", "task-auth"), ("E", "task-docs")):
        name, code, fns = corpus.code(opts.chars(s.task_tokens) - 60)
        blocks[letter] = (task, _header(f"Task context: current file {name}", code, opts.chars(s.task_tokens)))
        names[letter] = fns
    return blocks, names


def multi_agent(opts: WorkloadOptions) -> list[BenchRequest]:
    """Seed 000: agent 1 = A+B+D, agent 2 = A+C+E, agent 3 = A+B+E; turn-major
    order (every agent's turn 1, then every agent's turn 2, ...). Each turn is a
    new short user question about a function of the agent's task file, so from
    turn 2 on every segment of a request has been seen before."""
    blocks, names = multi_agent_blocks(opts)
    requests = []
    for turn in range(1, opts.turns + 1):
        for agent, (_role, agent_block, task_block) in enumerate(AGENTS, start=1):
            fns = names[task_block]
            # One template per request (up to len(QUESTIONS)), so no two ask the same.
            question = QUESTIONS[((turn - 1) * len(AGENTS) + agent - 1) % len(QUESTIONS)]
            fn = fns[(agent + turn) % len(fns)]
            requests.append(BenchRequest(
                label=f"agent{agent}/turn{turn}",
                agent=agent,
                turn=turn,
                segments=[blocks[b] for b in ("A", agent_block, task_block)],
                messages=[{"role": "user", "content": question.format(name=fn)}],
                max_tokens=opts.max_tokens,
            ))
    return requests


def agent_loop(opts: WorkloadOptions) -> list[BenchRequest]:
    """One agent (A+B) working a task over ``turns`` tool calls: each request is
    the previous one plus a scripted assistant tool call and its result (a file
    excerpt of ~task size). Reuse here comes from the message history, below
    the segments. The assistant turns are scripted, not the model's replies, so
    the prompts are deterministic."""
    blocks, names = multi_agent_blocks(opts)
    corpus = Corpus(opts.seed + 1_000_003)
    task = f"Find and explain the bug risk in `{names['D'][0]}`. Read the files you need."
    messages: list[dict] = [{"role": "user", "content": task}]
    requests = []
    for turn in range(1, opts.turns + 1):
        requests.append(BenchRequest(
            label=f"loop/turn{turn}", agent=1, turn=turn,
            segments=[blocks["A"], blocks["B"]], messages=list(messages),
            max_tokens=opts.max_tokens,
        ))
        name, code, _ = corpus.code(opts.chars(opts.sizes.task_tokens))
        messages += [
            {"role": "assistant", "content": f'read_file({{"path": "Lib/{name}"}})'},
            {"role": "user", "content": f"Tool result (read_file Lib/{name}):\n\n{code}"},
        ]
    return requests


WORKLOADS: dict[str, Callable[[WorkloadOptions], list[BenchRequest]]] = {
    "multi-agent": multi_agent,
    "agent-loop": agent_loop,
}
