"""Constrained decoding with llguidance: which tokens may come next.

A request's constraint comes from ``response_format`` (``json_object``,
``json_schema``) and its tools (``tool_choice`` ``"required"`` or a named
function, ``strict`` tool schemas): ``grammar_for`` turns them into one Lark
grammar, checked before any compute (a bad schema is a 400). Each generated
sequence gets its own ``Constraint`` (a matcher); in a decode step the engine
masks that sequence's logits row, or asks whether the token chosen without a mask
is allowed (which usually spares the mask), and tells it the token chosen. Masks change
only the choice of the next token: the KV cache, and so every cached segment,
is the same as for an unconstrained request.

``tool_choice`` naming a function allows exactly one call of it; ``"required"``
one or more (one with ``parallel_tool_calls: false``). Tool calls use the format
the tools block teaches the model
(``segcache.kv.autoseg``): ``<tool_call>\\n{"name": N, "arguments": {...}}\\n</tool_call>``.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import llguidance
import llguidance.hf
import numpy as np
import torch

from segcache.engine.toolcalls import CLOSE, OPEN
from segcache.engine.types import ChatRequest, EngineError

ANY_OBJECT: dict[str, Any] = {"type": "object"}


# Fixed JSON layout (as ``json.dumps`` writes it): with free whitespace a model can
# loop on newlines and spaces without ever finishing the value.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _json(schema: dict[str, Any]) -> str:
    """``%json {...}`` for a Lark rule, with segcache's layout unless the schema sets its own."""
    layout = {**JSON_LAYOUT, **(schema.get("x-guidance") or {})}
    return "%json " + json.dumps({**schema, "x-guidance": layout})


def _lark_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Lark string literal


def _call_schema(tools: list[dict[str, Any]], strict_only: bool) -> dict[str, Any]:
    """The JSON of one call: {"name": one of ``tools``, "arguments": its parameters}.
    Arguments follow the tool's schema when it is ``strict`` or ``strict_only`` is off."""
    options = []
    for tool in tools:
        fn = tool.get("function", {})
        params = fn.get("parameters") or ANY_OBJECT
        if strict_only and not fn.get("strict"):
            params = ANY_OBJECT
        options.append({"type": "object", "properties": {"name": {"const": fn["name"]},
                                                         "arguments": params},
                        "required": ["name", "arguments"], "additionalProperties": False})
    return options[0] if len(options) == 1 else {"anyOf": options}


def _calls_rule(schema: dict[str, Any], parallel: bool) -> str:
    call = f"{_lark_string(OPEN + chr(10))} {_json(schema)} {_lark_string(chr(10) + CLOSE)}"
    return f"calls: call\ncall: {call}\n" if not parallel else \
        f"calls: call ({_lark_string(chr(10))} call)*\ncall: {call}\n"


def _answer_schema(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    kind = (response_format or {}).get("type", "text")
    if kind == "json_object":
        return ANY_OBJECT
    if kind == "json_schema":
        return response_format["json_schema"].get("schema") or ANY_OBJECT
    return None


def grammar_for(req: ChatRequest) -> str | None:
    """The Lark grammar constraining ``req``'s reply, or None when it is free text
    (no response_format, and tools, if any, chosen freely: no strict schema, and
    parallel calls allowed)."""
    answer = _answer_schema(req.response_format)
    choice = req.tool_choice
    tools = req.tools if choice != "none" else []
    if isinstance(choice, dict):
        tools = [t for t in tools if t["function"]["name"] == choice["function"]["name"]]
    forced = choice == "required" or isinstance(choice, dict)
    strict = any(t.get("function", {}).get("strict") for t in tools)
    single = bool(tools) and not req.parallel_tool_calls
    if not forced and answer is None and not strict and not single:
        return None
    rules = []
    if tools:  # a named function is called once (as vLLM does), others as allowed
        parallel = req.parallel_tool_calls and not isinstance(choice, dict)
        rules.append(_calls_rule(_call_schema(tools, strict_only=not forced), parallel))
    if forced:
        return "start: calls\n" + "".join(rules)
    if answer is not None:
        rules.append(f"answer: {_json(answer)}\n")
    else:  # free text that does not start a call: a call has to follow its schema
        rules.append(f"answer: TEXT\nTEXT: /(?s:.+)/ & ~/(?s:.*{OPEN}.*)/\n")
    return ("start: calls | answer\n" if tools else "start: answer\n") + "".join(rules)


class Grammars:
    """Per engine: the llguidance view of the tokenizer (built on first use, ~0.3 s)."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int) -> None:
        self._hf = hf_tokenizer
        self.vocab_size = vocab_size
        self._lock = threading.Lock()
        self._tokenizer: llguidance.LLTokenizer | None = None

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.hf.from_tokenizer(self._hf, n_vocab=self.vocab_size)
            return self._tokenizer

    def compile(self, lark: str, param: str) -> llguidance.LLMatcher:
        """A matcher for ``lark``; raises EngineError (400, naming ``param``) when the
        grammar, or a JSON schema in it, is not usable."""
        grammar = llguidance.LLMatcher.grammar_from_lark(lark)
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        matcher = None if error else llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher is None or matcher.is_error():
            detail = error or matcher.get_error()
            raise EngineError(f"Invalid '{param}': the schema cannot be enforced ({detail})", param)
        return matcher

    def token_bytes(self, token: int) -> bytes:
        return self.tokenizer.decode_bytes([token])


def _numpy_row(logits: torch.Tensor) -> bool:
    return logits.is_cpu and logits.dtype == torch.float32


class Constraint:
    """One sequence's grammar state. Each step: whether a token is allowed next
    (``allows``) or which are (``mask`` a logits row), then ``advance`` with the token
    chosen (EOS included: it ends the grammar). The allowed set is computed at most
    once per state (and only when needed), by llguidance straight into the
    constraint's own bitmask."""

    def __init__(self, matcher: llguidance.LLMatcher, eos_ids: frozenset[int]) -> None:
        self.matcher = matcher
        self.eos_ids = eos_ids
        # [4 * ceil(vocab / 32)] uint8: llguidance's little-endian 32-bit words, so token
        # t is bit t % 8 of byte t // 8; sized by the logits' width on first use
        self._bits: np.ndarray | None = None
        self._fresh = False  # _bits holds the current state's set

    def copy(self) -> Constraint:
        return Constraint(self.matcher.deep_copy(), self.eos_ids)

    def _allowed(self, vocab_size: int) -> np.ndarray:
        """The current state's bitmask. A grammar that allows nothing (an error state)
        allows EOS: the sequence ends instead of sampling from an all -inf row."""
        if not self._fresh:
            if self._bits is None:
                self._bits = np.empty(4 * ((vocab_size + 31) // 32), dtype=np.uint8)
            self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
            if not self._bits.any():
                for t in self.eos_ids:
                    self._bits[t >> 3] |= 1 << (t & 7)
            self._fresh = True
        return self._bits

    def allows(self, token: int, vocab_size: int) -> bool:
        """Exactly whether ``mask`` allows ``token`` (``vocab_size``: the logits' width):
        from the parser alone (~1 us, where the whole allowed set takes 50-250 us),
        except where the two disagree and the allowed set answers. They disagree where
        the grammar forces bytes (``{"facts": [`` at the start of the bench's schema:
        the mask allows only their canonical first token, ``{"``, the parser any token
        that spells them, ``{`` too) and on EOS (the mask allows it where the JSON is
        complete, the parser may refuse it)."""
        if token in self.eos_ids or self.matcher.compute_ff_bytes():
            return bool((self._allowed(vocab_size)[token >> 3] >> (token & 7)) & 1)
        return self.matcher.validate_tokens([token]) == 1

    def greedy_choice(self, logits: torch.Tensor, tries: int = 4) -> int | None:
        """The token a greedy choice from ``mask(logits)`` makes (the first of the largest
        allowed logits), without the allowed set where that can be: the best tokens are
        asked about in turn (largest first, lower id first among equals), so the first
        one allowed is that choice; once the allowed set has been computed (or after
        ``tries`` refusals) the masked row's argmax is taken. None when ``logits`` is
        not a CPU float32 row: then ``mask`` it."""
        if not _numpy_row(logits):
            return None
        row = logits.numpy()  # [vocab], copied before the first write
        for i in range(tries):
            token = int(row.argmax())
            if self.allows(token, len(row)):
                return token
            if self._fresh:
                break
            row = row.copy() if i == 0 else row
            row[token] = -np.inf
        return int(self._masked(logits.numpy()).argmax())

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """A copy of ``logits`` [vocab] with every token the grammar forbids at -inf."""
        if _numpy_row(logits):  # numpy's select: a little faster than masked_fill here
            return torch.from_numpy(self._masked(logits.numpy()))
        keep = torch.from_numpy(self._keep(logits.shape[-1])).to(logits.device)
        return logits.masked_fill(keep.logical_not(), float("-inf"))

    def _keep(self, vocab_size: int) -> np.ndarray:
        """[vocab] bool: the allowed set."""
        return np.unpackbits(self._allowed(vocab_size), bitorder="little")[:vocab_size].view(bool)

    def _masked(self, row: np.ndarray) -> np.ndarray:
        return np.where(self._keep(len(row)), row, np.float32(-np.inf))

    def advance(self, token: int) -> None:
        self.matcher.consume_token(token)
        self._fresh = False

    @property
    def failed(self) -> bool:
        return self.matcher.is_error()
