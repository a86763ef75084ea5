"""Request schemas of the HTTP API (OpenAI's shapes plus segcache's extensions)
and their translation into engine requests. No torch here.

Validation is strict (``"5"`` is not a number, ``1.5`` is not an integer; ``2.0``,
JSON's spelling of 2 as well, is), as OpenAI's API is, and follows OpenAI's rules
where they go beyond types (``tool_choice`` needs ``tools`` and must name one of
them, ``logit_bias`` keys are token ids, assistant tool-call ``arguments`` are JSON).
Every body first passes one check for what no field type catches (lone UTF-16
surrogates anywhere, nesting too deep). Fields that OpenAI defines but segcache
does not implement are accepted and ignored (``frequency_penalty``,
``presence_penalty``, ``user``, ``metadata``, ...) so existing clients keep
working; ``tools`` are declared to the model in a canonical system-prompt block
(see ``segcache.kv.autoseg``) and calls in its output come back as
``tool_calls``; the few whose absence would silently change the answer (``echo``,
``suffix``, image content) are refused with a 400 that names them.

``model`` is optional (absent means the served model); a name the server does
not serve is a 404, checked by the routes (they know the served names).

``max_tokens`` defaults to 256 when a request gives neither ``max_tokens`` nor
``max_completion_tokens``.

Every request body is checked as a whole before its fields are (``_Body``): text
anywhere in it (messages, segments, prompts, tools, names, stop strings) must be
valid Unicode (no lone UTF-16 surrogates, which JSON's ``\\ud800`` escapes can
carry but UTF-8 cannot encode) and nested at most ``MAX_NESTING`` levels deep, so
no text reaches the tokenizer, the digests or the template that they cannot take.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from segcache.engine.types import ChatRequest, SamplingParams, SegmentInput
from segcache.server.errors import APIError

DEFAULT_MAX_TOKENS = 256
MAX_NESTING = 64  # JSON levels; deeper bodies are refused before anything walks them
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what a 64-bit generator seed can hold
_SURROGATE = re.compile("[\ud800-\udfff]")


class _Schema(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


def check_text(value: Any) -> None:
    """Raise APIError (400, ``param`` = the field) for the first string in ``value``
    (any JSON value, keys included) holding a lone surrogate, or for nesting deeper
    than ``MAX_NESTING``. Iterative: a hostile body cannot exhaust the stack."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, path, depth = stack.pop()
        if depth > MAX_NESTING:
            raise APIError(f"'{path}' is nested more than {MAX_NESTING} levels deep",
                           param=path or None)
        if isinstance(item, str):
            if not item.isascii() and (bad := _SURROGATE.search(item)):
                raise APIError(
                    f"Invalid '{path or 'body'}': text contains a lone UTF-16 surrogate "
                    f"(\\u{ord(bad.group()):04x} at character {bad.start()}), which is not valid "
                    "Unicode; send UTF-8 text or a \\ud83d\\ude00-style surrogate pair",
                    param=path or None)
        elif isinstance(item, dict):
            for key, sub in item.items():
                where = f"{path}.{key}" if path else str(key)
                stack.append((key, where, depth + 1))
                if isinstance(sub, _NESTED):
                    stack.append((sub, where, depth + 1))
        elif isinstance(item, list):
            stack.extend((sub, f"{path}[{i}]", depth + 1) for i, sub in enumerate(item)
                         if isinstance(sub, _NESTED))


_NESTED = (str, dict, list)  # what check_text has to look into


class _Body(_Schema):
    """A whole request body: its text is checked before any field is parsed."""

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, data: Any) -> Any:
        check_text(data)  # APIError passes through pydantic to the error handler
        if isinstance(data, dict):  # JSON's 2.0 is the integer 2 (number fields take ints)
            data = {k: int(v) if isinstance(v, float) and v.is_integer() else v
                    for k, v in data.items()}
        return data


class StreamOptions(_Schema):
    include_usage: bool = False


class Segment(_Schema):
    """One entry of ``segments[]``: content, or a reference by ``hash`` or ``name``
    to a segment the server already holds."""

    id: str | None = None
    content: str | None = None
    hash: str | None = None
    name: str | None = None
    ttl: float | None = Field(default=None, gt=0, description="seconds until the segment expires")
    reuse: Literal["prefix", "anywhere"] | None = Field(
        default=None,
        description='"anywhere": also reuse this segment\'s KV at other positions (blended, '
                    'a fraction recomputed); "prefix" (default): exact prefix reuse only')

    def to_engine(self, index: int) -> SegmentInput:
        if self.content is None and self.hash is None and self.name is None:
            raise APIError(
                f"segments[{index}] needs 'content', or a 'hash' or 'name' of a segment "
                "the server already holds",
                param=f"segments[{index}]",
            )
        seg_id = self.id or self.name or self.hash
        if seg_id is None:
            raise APIError(f"segments[{index}] needs an 'id'", param=f"segments[{index}].id")
        return SegmentInput(
            id=seg_id, content=self.content, hash=self.hash, name=self.name, ttl_s=self.ttl,
            reuse=self.reuse,
        )


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    type: str
    text: str | None = None


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    name: str
    arguments: str = Field(description="the call's arguments as a JSON string")


class ToolCall(BaseModel):
    """One of an assistant message's ``tool_calls`` (as OpenAI returned it)."""

    model_config = ConfigDict(strict=True, extra="allow")

    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    # As OpenAI: "developer" is the new name of "system", "function" the old one of "tool".
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def to_engine(self, index: int) -> dict[str, Any]:
        """A plain dict for the chat template, with OpenAI's role aliases resolved."""
        role = {"developer": "system", "function": "tool"}.get(self.role, self.role)
        msg: dict[str, Any] = {"role": role, "content": self._text(index)}
        for key in ("name", "tool_call_id"):
            value = getattr(self, key)
            if value is not None:
                msg[key] = value
        if self.tool_calls is not None:
            msg["tool_calls"] = [c.model_dump(exclude_none=True) for c in self.tool_calls]
        self._check_call_arguments(index)
        return msg

    def _check_call_arguments(self, index: int) -> None:
        """OpenAI requires each call's ``arguments`` to be a JSON document in a string."""
        for j, call in enumerate(self.tool_calls or []):
            args = call.function.arguments
            if not isinstance(args, str):
                continue
            try:
                json.loads(args)
            except ValueError as exc:
                where = f"messages[{index}].tool_calls[{j}].function.arguments"
                raise APIError(f"Invalid '{where}': not valid JSON ({exc}); send the "
                               "arguments the model produced, a JSON object as a string",
                               param=where) from exc

    def _text(self, index: int) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        pieces = []
        for j, part in enumerate(self.content):
            where = f"messages[{index}].content[{j}]"
            if part.type != "text":
                kind = "image" if "image" in part.type else f"'{part.type}'"
                raise APIError(
                    f"{where}: {kind} content is not supported; this model reads text only "
                    "(send parts of type 'text')",
                    param=where,
                )
            if part.text is None:
                raise APIError(f"{where}: a 'text' part needs a 'text' string", param=where)
            pieces.append(part.text)
        return "".join(pieces)


class _GenerationRequest(_Body):
    """Fields shared by chat and text completions."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(default=None, description="segcache extension; 0 = off")
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX,
                             description="64-bit: -2**63 .. 2**64-1")
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = None  # null and absent mean 1
    user: str | None = None
    logit_bias: dict[str, Any] | None = None

    def check_supported(self) -> None:
        if self.stream_options is not None and not self.stream:  # as OpenAI does
            raise APIError(
                "'stream_options' is only allowed when 'stream' is true", param="stream_options"
            )

    def sampling(self, max_tokens: int | None, logprobs: int | None = None) -> SamplingParams:
        """Raises EngineError (400) for out-of-range values."""
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(
            max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            seed=self.seed,
            stop=tuple(stop),
            logit_bias=parse_logit_bias(self.logit_bias),
            logprobs=logprobs,
            n=1 if self.n is None else self.n,
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class Tool(_Schema):
    model_config = ConfigDict(strict=True, extra="allow")

    type: Literal["function"] = "function"
    function: dict[str, Any]

    def as_dict(self, index: int) -> dict[str, Any]:
        if not isinstance(self.function.get("name"), str) or not self.function["name"]:
            raise APIError(f"tools[{index}].function needs a 'name' string",
                           param=f"tools[{index}].function.name")
        return self.model_dump(exclude_none=True)


class ChatCompletionRequest(_GenerationRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    segments: list[Segment] = Field(default_factory=list, description="segcache extension")
    tools: list[Tool] | None = Field(default=None, min_length=1)
    tool_choice: str | dict[str, Any] | None = None

    def to_engine(self, tenant: str, max_segments: int) -> ChatRequest:
        self.check_supported()
        tool_choice = check_tool_choice(self.tool_choice, self.tools)
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError("Invalid 'top_logprobs': it needs 'logprobs' set to true",
                           param="top_logprobs")
        check_segment_count(self.segments, max_segments)
        max_tokens = self.max_completion_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return ChatRequest(
            tenant=tenant,
            messages=[m.to_engine(i) for i, m in enumerate(self.messages)],
            segments=[s.to_engine(i) for i, s in enumerate(self.segments)],
            sampling=self.sampling(self.max_tokens if max_tokens is None else max_tokens,
                                   logprobs),
            tools=[t.as_dict(i) for i, t in enumerate(self.tools or [])],
            tool_choice=tool_choice,
            parallel_tool_calls=self.parallel_tool_calls is not False,
            response_format=check_response_format(self.response_format),
        )


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None

    def prompt_inputs(self) -> list[str | list[int]]:
        """The prompts, each text or token ids (OpenAI's four shapes of ``prompt``)."""
        self.check_supported()
        if self.echo:
            raise APIError("echo is not supported: the response holds the completion only "
                           "(prepend the prompt yourself)", param="echo")
        if self.suffix:
            raise APIError("suffix is not supported: this model has no fill-in-the-middle "
                           "format; put all the text in 'prompt'", param="suffix")
        if self.best_of not in (None, 1):
            raise APIError(f"best_of={self.best_of} is not supported; only 1 (use 'n' for "
                           "several completions)", param="best_of")
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], int):
            return [list(self.prompt)]
        if not 1 <= len(self.prompt) <= MAX_PROMPTS:
            raise APIError(f"prompt is a list of {len(self.prompt)} prompts; send 1 to "
                           f"{MAX_PROMPTS}", param="prompt")
        return list(self.prompt)

    def completion_sampling(self) -> SamplingParams:
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_COMPLETION_LOGPROBS:
            raise APIError(f"Invalid 'logprobs': {self.logprobs}; it is the number of most "
                           f"likely tokens to return, 0 to {MAX_COMPLETION_LOGPROBS}",
                           param="logprobs")
        return self.sampling(self.max_tokens, self.logprobs)


MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions
MAX_PROMPTS = 16  # prompts in one /v1/completions request (run one after another)


class WarmRequest(_Body):
    model: str | None = None
    segments: list[Segment] = Field(min_length=1)

    def to_engine(self, max_segments: int) -> list[SegmentInput]:
        check_segment_count(self.segments, max_segments)
        return [s.to_engine(i) for i, s in enumerate(self.segments)]


class PutSegmentRequest(_Body):
    content: str
    ttl: float | None = Field(default=None, gt=0, description="seconds until the segment expires")


def check_segment_count(segments: list[Segment], max_segments: int) -> None:
    if len(segments) > max_segments:
        raise APIError(
            f"too many segments: {len(segments)} sent, at most {max_segments} are allowed "
            "per request (merge adjacent segments that always travel together)",
            param="segments",
        )


TOOL_CHOICES = ("none", "auto", "required")


def check_tool_choice(choice: str | dict[str, Any] | None,
                      tools: list[Tool] | None) -> str | dict[str, Any] | None:
    """OpenAI's rules: a ``tool_choice`` needs ``tools``; a string is one of
    ``TOOL_CHOICES``; an object is ``{"type": "function", "function": {"name": N}}``
    with N one of the tools. Returns the choice as the engine takes it."""
    if choice is None:
        return None
    if not tools:
        raise APIError("Invalid value for 'tool_choice': 'tool_choice' is only allowed when "
                       "'tools' are specified", param="tool_choice")
    if isinstance(choice, str):
        if choice not in TOOL_CHOICES:
            raise APIError(f"Invalid value for 'tool_choice': {choice!r}. Supported values are: "
                           "'none', 'auto', 'required', or an object naming a function",
                           param="tool_choice")
        return choice
    if choice.get("type") != "function":
        raise APIError("Invalid 'tool_choice': an object needs \"type\": \"function\" and "
                       "\"function\": {\"name\": ...}", param="tool_choice.type")
    fn = choice.get("function")
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or not name:
        raise APIError("Invalid 'tool_choice': missing 'function.name', the function to call",
                       param="tool_choice.function.name")
    names = [t.function.get("name") for t in tools]
    if name not in names:
        raise APIError(f"Invalid 'tool_choice': function {name!r} is not one of 'tools' "
                       f"({', '.join(map(str, names))})", param="tool_choice.function.name")
    return {"type": "function", "function": {"name": name}}


LOGIT_BIAS_LIMIT = 100.0


def parse_logit_bias(bias: dict[str, Any] | None) -> tuple[tuple[int, float], ...]:
    """``{"123": -100}`` -> ((123, -100.0),). Keys are token ids written as integers,
    values numbers in [-100, 100] (OpenAI's range); the engine checks the ids
    against the vocabulary."""
    out = []
    for key, value in (bias or {}).items():
        if not key.strip().lstrip("-").isdigit():
            raise APIError(f"Invalid key in 'logit_bias': {key!r}; keys are token ids "
                           "(integers written as strings)", param="logit_bias")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise APIError(f"Invalid value in 'logit_bias' for {key!r}: {value!r}; values "
                           "are numbers from -100 to 100", param="logit_bias")
        if not -LOGIT_BIAS_LIMIT <= value <= LOGIT_BIAS_LIMIT:
            raise APIError(f"Invalid value in 'logit_bias' for {key!r}: {value}; values "
                           "are numbers from -100 to 100", param="logit_bias")
        token = int(key)
        if token < 0:
            raise APIError(f"Invalid key in 'logit_bias': {key!r}; token ids are >= 0",
                           param="logit_bias")
        out.append((token, float(value)))
    return tuple(sorted(out))


RESPONSE_FORMATS = ("text", "json_object", "json_schema")


def check_response_format(fmt: dict[str, Any] | None) -> dict[str, Any] | None:
    """OpenAI's shapes: {"type": "text"} (None for the engine), {"type": "json_object"},
    {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}.
    Whether the schema can be enforced is the engine's check."""
    if fmt is None or fmt.get("type") == "text":
        return None
    kind = fmt.get("type")
    if kind not in RESPONSE_FORMATS:
        raise APIError(f"Invalid value for 'response_format.type': {kind!r}. Supported values "
                       "are: 'text', 'json_object' and 'json_schema'", param="response_format.type")
    if kind == "json_object":
        return {"type": "json_object"}
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise APIError("Missing required parameter: 'response_format.json_schema' (an object "
                       "with 'name' and 'schema')", param="response_format.json_schema")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise APIError("Missing required parameter: 'response_format.json_schema.name'",
                       param="response_format.json_schema.name")
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise APIError("Invalid 'response_format.json_schema.schema': expected a JSON Schema "
                       "object", param="response_format.json_schema.schema")
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema,
                                                    "strict": spec.get("strict") is True}}
