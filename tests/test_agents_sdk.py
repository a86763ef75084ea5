"""A real agent framework end to end: the OpenAI Agents SDK runs a tool loop on the
real model through segcache, making the same call (same name, same arguments)
turn after turn. The SDK drops history items whose call id it has seen before, so
with ids that repeat the model would never see its earlier calls; with ids unique
per call every turn shows all of them, and each turn reuses the last from cache."""

from __future__ import annotations

import asyncio

import pytest
from agents import (
    Agent,
    ModelSettings,
    OpenAIChatCompletionsModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from agents.agent import ToolsToFinalOutputResult
from openai import AsyncOpenAI

from segcache.config import CacheConfig
from tests.server_harness import running_server

TURNS = 3


@pytest.mark.slow
def test_agents_sdk_tool_loop_with_repeated_identical_calls(real_engine):
    from segcache.engine.engine import Engine

    engine = Engine(real_engine.runtime, real_engine.tokenizer, CacheConfig(),
                    real_engine.model_name)
    seen: list[list[dict]] = []  # the messages of every chat request the engine got
    submit = engine.submit_chat

    def recording_submit(req, *args, **kwargs):
        seen.append(req.messages)
        return submit(req, *args, **kwargs)

    engine.submit_chat = recording_submit
    rolls: list[int] = []

    @function_tool
    def roll_die() -> str:
        """Roll a six-sided die and return the result."""
        rolls.append(len(rolls) + 1)
        return f"rolled {rolls[-1]}"

    def finish_after_three(_ctx, results) -> ToolsToFinalOutputResult:
        done = len(rolls) >= TURNS
        return ToolsToFinalOutputResult(done, results[-1].output if done else None)

    set_tracing_disabled(True)  # no network: the SDK would export traces to OpenAI
    try:
        with running_server(engine) as url:
            client = AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            agent = Agent(
                name="dice", instructions="Roll the die with the tool, one roll per turn.",
                tools=[roll_die], model=OpenAIChatCompletionsModel(engine.model_name, client),
                model_settings=ModelSettings(tool_choice="required", parallel_tool_calls=False,
                                             temperature=0, max_tokens=40),
                tool_use_behavior=finish_after_three, reset_tool_choice=False)
            result = asyncio.run(Runner.run(agent, "Roll the die three times.",
                                            max_turns=TURNS + 2))
    finally:
        engine.close(drain=False)
    assert result.final_output == "rolled 3"
    assert rolls == [1, 2, 3] and len(seen) == TURNS
    last = seen[-1]
    calls = [c for m in last if m["role"] == "assistant" for c in m.get("tool_calls") or []]
    assert len(calls) == TURNS - 1  # the model sees every earlier call...
    assert len({c["id"] for c in calls}) == TURNS - 1  # ...each with its own id
    assert len({(c["function"]["name"], c["function"]["arguments"]) for c in calls}) == 1
    assert [m["content"] for m in last if m["role"] == "tool"] == ["rolled 1", "rolled 2"]
    usage = [r.usage for r in result.raw_responses]
    for before, after in zip(usage, usage[1:], strict=False):  # the last turn, reply included
        assert after.input_tokens_details.cached_tokens >= before.input_tokens + before.output_tokens - 2


@pytest.mark.slow
def test_agents_sharing_a_rules_block_reuse_it_on_plain_requests(real_engine):
    """Issue 16: three Agents SDK agents whose instructions are one rules block + their
    own role, each with its own tool (scripts/framework_agents.py): each later agent's
    first prompt reuses the shared rules, although the client sends no segments."""
    import importlib.util
    from pathlib import Path

    from segcache.engine.engine import Engine

    path = Path(__file__).parent.parent / "scripts" / "framework_agents.py"
    spec = importlib.util.spec_from_file_location("framework_agents", path)
    program = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(program)
    engine = Engine(real_engine.runtime, real_engine.tokenizer, CacheConfig(), real_engine.model_name)
    set_tracing_disabled(True)
    try:
        with running_server(engine) as url:
            rows = asyncio.run(program.run(url + "/v1", "x", None, rules_tokens=700, max_tokens=4))
    finally:
        engine.close(drain=False)
    assert rows[0]["cached_tokens"] == 0
    for row in rows[1:]:
        assert row["reused_share"] >= 0.5, rows
