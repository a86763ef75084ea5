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

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from segcache.bench.corpus import Corpus
from segcache.bench.repo_docs import LAYOUTS, repo_docs_prompts

CHARS_PER_TOKEN = 3.8
REUSE = ("anywhere", "none")


@dataclass(frozen=True)
class BenchRequest:
    """One chat request of a workload.

    ``segments`` are ``(id, content)`` in prompt order; ``messages`` follow them
    (OpenAI message dicts, no system message: the segments are the system part).
    ``anywhere`` names the segments sent with ``"reuse": "anywhere"`` (segments
    mode): blocks the server may reuse at another position than where it saw them.
    """

    label: str
    agent: int
    turn: int
    segments: list[tuple[str, str]]
    messages: list[dict]
    max_tokens: int
    anywhere: tuple[str, ...] = ()


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
    agents: int = 8  # fan-out
    objects: int = 8  # repo-docs: code objects documented
    code_tokens: int = 350  # repo-docs: most tokens of one code block
    layout: str = "repoagent"  # repo-docs: see repo_docs.LAYOUTS
    reuse: str = "anywhere"  # repo-docs: mark recurring blocks "reuse": "anywhere", or "none"

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.reuse not in REUSE:
            raise ValueError(f"reuse must be one of {REUSE}, got {self.reuse!r}")
        if self.turns < 1:
            raise ValueError("turns must be >= 1")
        if self.agents < 1 or self.objects < 1:
            raise ValueError("agents and objects must be >= 1")
        if self.code_tokens < 20:
            raise ValueError("code_tokens must be >= 20")
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


def global_block(corpus: Corpus, opts: WorkloadOptions) -> tuple[str, str]:
    """Seed 000's block A: numbered rules (docstring prose) and tool JSON schemas."""
    a_chars = opts.chars(opts.sizes.global_tokens)
    rules = corpus.prose(int(a_chars * 0.4))
    tools = corpus.tool_schemas(a_chars - len(rules) - 40)
    return "global-rules", _header("Global rules and tools", f"{rules}\n\n## Tools\n\n{tools}", a_chars)


def multi_agent_blocks(opts: WorkloadOptions) -> tuple[dict[str, tuple[str, str]], dict[str, list[str]]]:
    """Seed 000's blocks: letter -> (segment id, content), and per task block the
    function names its code defines (what the user turns ask about)."""
    corpus = Corpus(opts.seed)
    s = opts.sizes
    blocks = {"A": global_block(corpus, opts)}
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
    """One agent (A+B) working a task over ``turns`` tool calls (default 10): each request is
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


def fan_out(opts: WorkloadOptions) -> list[BenchRequest]:
    """Seed 000 at width: ``agents`` agents (default 8) share a cold block A, each
    with its own agent block B_i and task block D_i, and are sent at once (the
    run's --concurrency defaults to the number of agents). Every agent's first
    request needs A, which nobody has computed yet: a server that computes a
    shared in-flight prefix once wins here. With --turns > 1, every agent asks
    a new question about its task file each turn."""
    corpus = Corpus(opts.seed)
    a = global_block(corpus, opts)
    agents = []
    for i in range(1, opts.agents + 1):
        name, code, _ = corpus.code(opts.chars(opts.sizes.agent_tokens) - 80)
        b = (f"agent{i}-skills", _header(f"Agent {i}: skills and project memory ({name})", code,
                                         opts.chars(opts.sizes.agent_tokens)))
        name, code, fns = corpus.code(opts.chars(opts.sizes.task_tokens) - 60)
        d = (f"agent{i}-task", _header(f"Task context: current file {name}", code, opts.chars(opts.sizes.task_tokens)))
        agents.append((b, d, fns))
    requests = []
    for turn in range(1, opts.turns + 1):
        for i, (b, d, fns) in enumerate(agents, start=1):
            question = QUESTIONS[(turn - 1 + i - 1) % len(QUESTIONS)]
            requests.append(BenchRequest(
                label=f"agent{i}/turn{turn}", agent=i, turn=turn, segments=[a, b, d],
                messages=[{"role": "user", "content": question.format(name=fns[(i + turn) % len(fns)])}],
                max_tokens=opts.max_tokens,
            ))
    return requests


def repo_docs(opts: WorkloadOptions) -> list[BenchRequest]:
    """Seed 003 (RepoAgent): document ``objects`` functions (default 8) of one
    standard library module, chosen by the seed, in topological order (callees
    first). Each prompt holds the function's code, the code of up to 3 functions
    it calls and of up to 3 that call it (each code block at most --code-tokens)
    and the module's outline (the project structure). The same code block comes
    back in later prompts at other positions.

    --layout repoagent (default), RepoAgent's template: a short fixed instruction,
    then what to document, then the structure, the code blocks and the format
    rules. The prefix common to all requests is the short instruction only (a
    few percent of the prompt); the structure and the code blocks recur at other
    positions: a prefix cache reuses little, a non-prefix (blend) cache most
    (the first prompt, and each block the first time it is seen, are new: with
    8 objects about 2/3 of the text can be reused, with 32 about 80%; a run
    prints this ceiling).
    --layout careful: the instructions and the structure first, as one block
    (~1,150 tokens), the layout a prefix cache likes: it reuses about half.

    --reuse anywhere (default) sends every recurring block (code blocks, project
    structure) with "reuse": "anywhere" in --mode segments; --reuse none leaves
    the marker off. --mode flat is the same text in one system message."""
    prompts = repo_docs_prompts(opts.seed, opts.objects, opts.chars(opts.code_tokens),
                                opts.chars(opts.sizes.agent_tokens), layout=opts.layout)
    return [BenchRequest(label=f"doc{i}/{p.name}", agent=1, turn=i, segments=p.segments,
                         messages=[{"role": "user", "content": p.question}], max_tokens=opts.max_tokens,
                         anywhere=p.recurring if opts.reuse == "anywhere" else ())
            for i, p in enumerate(prompts, start=1)]


def reusable_share(requests: list[BenchRequest]) -> dict[str, float | None]:
    """At best, the share of a workload's prompt text (characters of the segments
    and messages) that a cache could reuse, the requests sent in order:

    - ``prefix``: the longest common prefix of each flat prompt with an earlier
      one (an exact token-level prefix cache, at best);
    - ``anywhere``: the leading segments that match an earlier request's, plus
      every later segment marked ``anywhere`` whose text an earlier request
      held anywhere (a cache that blends marked segments, at best).
    """
    total = prefix = anywhere = 0
    flats: list[str] = []
    chains: set[tuple[str, ...]] = set()
    seen: set[str] = set()
    for req in requests:
        texts = [c for _, c in req.segments] + [str(m.get("content") or "") for m in req.messages]
        flat = "\n\n".join(texts)
        total += len(flat)
        prefix += max((len(os.path.commonprefix([flat, f])) for f in flats), default=0)
        flats.append(flat)
        in_prefix = True
        for n, (seg_id, content) in enumerate(req.segments):
            in_prefix = in_prefix and tuple(c for _, c in req.segments[: n + 1]) in chains
            if in_prefix or (seg_id in req.anywhere and content in seen):
                anywhere += len(content)
        chains.update(tuple(c for _, c in req.segments[: n + 1]) for n in range(len(req.segments)))
        seen.update(c for _, c in req.segments)
    return {"prefix": prefix / total if total else None, "anywhere": anywhere / total if total else None}


WORKLOADS: dict[str, Callable[[WorkloadOptions], list[BenchRequest]]] = {
    "multi-agent": multi_agent,
    "agent-loop": agent_loop,
    "repo-docs": repo_docs,
    "fan-out": fan_out,
}

# Per-workload defaults of --turns and --concurrency, where the shape asks for others
# than multi-agent's (3 turns, sequential).
DEFAULT_TURNS = {"multi-agent": 3, "agent-loop": 10, "repo-docs": 1, "fan-out": 1}


def default_concurrency(workload: str, opts: WorkloadOptions) -> int:
    return opts.agents if workload == "fan-out" else 1
