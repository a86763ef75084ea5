#!/usr/bin/env python
"""A small multi-agent program on a real agent framework (the OpenAI Agents SDK),
pointed at any OpenAI-compatible server: how much of each later agent's first
prompt the server reuses when the client sends plain requests (no ``segments``).

Three agents share one rules block (~1.4k tokens: seed 000's global rules and
tool schemas, the bench's block A); each has its own role text after it and its
own tool, as frameworks build them: the SDK sends ``instructions`` as the system
message (rules + role, one message) and the agent's tools in ``tools``. Each
agent answers one task; the first request of each is recorded with the usage the
server reports (``prompt_tokens_details.cached_tokens``).

    segcache serve --port 8000 &
    .venv/bin/python scripts/framework_agents.py --url http://127.0.0.1:8000/v1 --json out.json

The SDK is a development dependency of segcache (``pip install openai-agents``),
not a runtime one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from agents import (
    Agent,
    ModelSettings,
    OpenAIChatCompletionsModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from openai import AsyncOpenAI

from segcache.bench.corpus import Corpus
from segcache.bench.workloads import MultiAgentSizes, WorkloadOptions, global_block


@function_tool
def search_docs(query: str) -> str:
    """Search the project documentation and return the best matching paragraph."""
    return f"No documentation matches {query!r}."


@function_tool
def run_tests(pattern: str) -> str:
    """Run the test suite for the tests whose name matches the pattern."""
    return f"0 tests matched {pattern!r}."


@function_tool
def open_ticket(title: str, body: str) -> str:
    """Open a ticket in the issue tracker with a title and a body."""
    return f"ticket opened: {title}"


ROLES = (
    ("researcher", "You are the research agent: you find what the documentation says and "
                   "summarise it for the others.", search_docs,
     "Which rules apply when a tool fails?"),
    ("coder", "You are the coding agent: you change the code and run the tests before you "
              "answer.", run_tests, "Fix the failing login test and say what you changed."),
    ("reviewer", "You are the review agent: you read changes and open tickets for what must be "
                 "fixed.", open_ticket, "Review the last change to the login handler."),
)


async def run(url: str, api_key: str, model: str | None, rules_tokens: int, max_tokens: int) -> list[dict]:
    client = AsyncOpenAI(base_url=url, api_key=api_key, max_retries=0)
    model = model or (await client.models.list()).data[0].id
    opts = WorkloadOptions(sizes=MultiAgentSizes(global_tokens=rules_tokens))
    _, rules = global_block(Corpus(opts.seed), opts)
    rows = []
    for name, role, tool, task in ROLES:
        agent = Agent(name=name, instructions=f"{rules}\n\n{role}", tools=[tool],
                      model=OpenAIChatCompletionsModel(model, client),
                      model_settings=ModelSettings(temperature=0, max_tokens=max_tokens,
                                                   tool_choice="none"))
        t0 = time.perf_counter()
        result = await Runner.run(agent, task, max_turns=1)
        elapsed = time.perf_counter() - t0
        usage = result.raw_responses[0].usage
        cached = usage.input_tokens_details.cached_tokens or 0
        rows.append({"agent": name, "prompt_tokens": usage.input_tokens, "cached_tokens": cached,
                     "reused_share": cached / usage.input_tokens if usage.input_tokens else 0.0,
                     "seconds": round(elapsed, 3)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000/v1", help="OpenAI base URL (default: %(default)s)")
    p.add_argument("--api-key", default="local", help="bearer key (default: %(default)s)")
    p.add_argument("--model", default=None, help="model id (default: the first of GET /models)")
    p.add_argument("--rules-tokens", type=int, default=1400, help="shared rules block (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per answer (default: %(default)s)")
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = p.parse_args(argv)
    set_tracing_disabled(True)  # no network: the SDK would export traces to OpenAI
    rows = asyncio.run(run(args.url, args.api_key, args.model, args.rules_tokens, args.max_tokens))
    print("| agent | prompt tokens | cached | reused | seconds |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['agent']} | {r['prompt_tokens']} | {r['cached_tokens']} | "
              f"{r['reused_share']:.0%} | {r['seconds']:.2f} |")
    later = rows[1:]
    print(f"later agents' first prompts reused: "
          f"{sum(r['cached_tokens'] for r in later) / max(1, sum(r['prompt_tokens'] for r in later)):.0%}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "url": args.url,
                                         "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
