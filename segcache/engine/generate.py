"""From a computed prompt to a result: decode ``n`` choices and shape what they say
(``Generation``); tool-call text kept out of a choice's stream (``ChoiceFilter``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import torch

from segcache.engine.decode import Decoder, Sequence
from segcache.engine.detok import TextStream
from segcache.engine.grammar import Constraint, Grammars
from segcache.engine.kv_pool import KVPool
from segcache.engine.run import RunState
from segcache.engine.sampling import Sampler
from segcache.engine.scheduler import prefill
from segcache.engine.toolcalls import ToolCallFilter, parse_tool_calls
from segcache.engine.types import Choice, GenerationResult, SamplingParams, TextDelta
from segcache.model.tokenizer import ChatTokenizer

Callback = Callable[[str], None]
CancelCheck = Callable[[], bool]


class Generation:
    """Decoding for one engine: choice 0 decodes in the run's buffer, choices 1..n-1 in
    buffers from ``kv_pool`` holding a copy of the prompt's slots."""

    def __init__(self, tokenizer: ChatTokenizer, grammars: Grammars, kv_pool: KVPool) -> None:
        self.tokenizer = tokenizer
        self.grammars = grammars
        self.kv_pool = kv_pool

    def run(self, run: RunState, tail: tuple[int, ...], sampling: SamplingParams, t0: float,
            on_text: Callback | None, is_cancelled: CancelCheck | None,
            logits: torch.Tensor | None = None, constraint: Constraint | None = None):
        """Prefill the tail (unless its ``logits`` are given: computed already) and
        decode ``sampling.n`` choices from it; returns (result, their sequences), the
        caller gives the sequences back (``give_back``). On a finish by EOS or length a
        choice's buffer holds every generated token but a final EOS (ready to be kept
        as a reply)."""
        if logits is None:
            logits = yield from prefill(tail, run.kv, run.pos)
        start = run.pos + len(tail)
        seqs = [self._sequence(i, run, start, sampling, constraint) for i in range(sampling.n)]
        decoder = Decoder(self.tokenizer.eos_ids, self._describe, on_text, t0)
        try:
            yield from decoder.run(seqs, logits, sampling.max_tokens, is_cancelled)
        except BaseException:
            self.give_back(seqs)
            raise
        return self._result(run, len(tail), seqs, t0), seqs

    def give_back(self, seqs: list[Sequence]) -> None:
        """The other choices' buffers to the pool (choice 0 decodes in the run's)."""
        for seq in seqs[1:]:
            self.kv_pool.give(seq.kv)

    def _sequence(self, index: int, run: RunState, start: int, sampling: SamplingParams,
                  constraint: Constraint | None) -> Sequence:
        """Choice ``index``: choice 0 decodes in the run's buffer, the others in a copy
        of its first ``start`` slots (the prompt, computed once); each has its own
        sampler (seed + index when seeded) and grammar state."""
        kv = run.kv
        if index > 0:
            kv, _ = self.kv_pool.take(start + sampling.max_tokens)
            kv[:, :, :, :start] = run.kv[:, :, :, :start]
            if constraint is not None:
                constraint = constraint.copy()
        seeded = sampling if sampling.seed is None or index == 0 else \
            replace(sampling, seed=(sampling.seed + index) % 2**63)
        return Sequence(index, kv, start, Sampler(seeded),
                        TextStream(self.tokenizer.decode_stream(), sampling.stop), constraint,
                        [] if sampling.logprobs is not None else None)

    def _describe(self, token: int) -> tuple[str, bytes]:
        """A token's text and bytes, for logprobs (a piece of a UTF-8 character
        shows as U+FFFD in the text; the bytes are exact)."""
        raw = self.grammars.token_bytes(token)
        return raw.decode("utf-8", errors="replace"), raw

    @staticmethod
    def _result(run: RunState, tail_len: int, seqs: list[Sequence], t0: float) -> GenerationResult:
        first = seqs[0]
        more = [Choice(s.index, s.stream.text, s.finish or "stop", list(s.stream.ids),
                       logprobs=s.logprobs) for s in seqs[1:]]
        return GenerationResult(
            text=first.stream.text, finish_reason=first.finish or "stop",  # type: ignore[arg-type]
            prompt_tokens=run.pos + tail_len,
            completion_tokens=sum(len(s.stream.ids) for s in seqs),
            cached_tokens=run.cached, chain=run.parent.chain, segments=list(run.usage),
            ttft_s=first.ttft, total_s=time.perf_counter() - t0, token_ids=list(first.stream.ids),
            prefix_chain=run.prefix_chain or run.parent.chain, logprobs=first.logprobs,
            more_choices=more,
        )

    @staticmethod
    def cancelled(run: RunState, tail_len: int, t0: float) -> GenerationResult:
        """The result of a request cancelled before it finished (nothing generated)."""
        return GenerationResult(
            text="", finish_reason="cancelled", prompt_tokens=run.pos + tail_len,
            completion_tokens=0, cached_tokens=run.cached, chain=run.parent.chain,
            segments=list(run.usage), ttft_s=0.0, total_s=time.perf_counter() - t0,
            prefix_chain=run.prefix_chain or run.parent.chain)

    @staticmethod
    def shape_reply(result: GenerationResult, parse_calls: bool) -> None:
        """Turn ``<tool_call>`` blocks in each choice's text into OpenAI tool_calls."""
        if not parse_calls or result.finish_reason == "cancelled":
            return
        for choice in [result, *result.more_choices]:
            content, calls = parse_tool_calls(choice.text)
            if calls:
                choice.text, choice.tool_calls, choice.finish_reason = content or "", calls, "tool_calls"


class ChoiceFilter(ToolCallFilter):
    """A ``ToolCallFilter`` for choice ``index``: its text goes on as ``TextDelta``s of
    that choice, with the logprobs of the tokens received so far (those of a call's
    tokens stay in the final result only)."""

    def __init__(self, on_text: Callback, index: int) -> None:
        self._logprobs: tuple = ()
        super().__init__(lambda text: on_text(TextDelta(text, index, self._take())))

    def __call__(self, delta: str) -> None:
        self._logprobs += getattr(delta, "logprobs", ())
        super().__call__(delta)

    def _take(self) -> tuple:
        taken, self._logprobs = self._logprobs, ()
        return taken
