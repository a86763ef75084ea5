"""What goes into and comes out of the engine. No torch here: the server imports
these to shape requests and responses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


class EngineError(Exception):
    """A request the engine refuses; ``status`` is the HTTP status the server returns,
    ``param`` names the offending field (OpenAI error shape)."""

    status = 400
    code = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class SegmentMismatchError(EngineError):
    """A client-supplied hash differs from the content's sha256 (400)."""


class SegmentUnknownError(EngineError):
    """A segment sent without content that the server does not hold (409)."""

    status = 409
    code = "segment_not_cached"


class NotFoundError(EngineError):
    status = 404
    code = "not_found"


class QuotaExceededError(EngineError):
    """State the tenant keeps on the server (registered segments) would pass its bound (413)."""

    status = 413
    code = "quota_exceeded"


class OverloadedError(EngineError):
    """The queue is full (429); ``retry_after_s`` goes into ``Retry-After``."""

    status = 429
    code = "server_overloaded"

    def __init__(self, message: str, retry_after_s: int = 2) -> None:
        super().__init__(message, None)
        self.retry_after_s = retry_after_s


class RequestTimeoutError(EngineError):
    status = 504
    code = "request_timeout"


class ShuttingDownError(EngineError):
    status = 503
    code = "shutting_down"


class ContextOverflowError(EngineError):
    """Prompt + max_tokens exceed the model's context window (400)."""

    code = "context_length_exceeded"


MAX_TOP_LOGPROBS = 20  # OpenAI's limit
MAX_CHOICES = 16  # each choice holds its own copy of the prompt's KV while decoding


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    logprobs: int | None = None  # None: off; k: each token's logprob and the k most likely
    n: int = 1  # choices sampled independently from one prompt

    def __post_init__(self) -> None:
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise EngineError(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}",
                              "top_logprobs")
        if not 1 <= self.n <= MAX_CHOICES:
            raise EngineError(f"n must be between 1 and {MAX_CHOICES}", "n")
        if self.max_tokens < 1:
            raise EngineError("max_tokens must be >= 1", "max_tokens")
        if not 0.0 <= self.temperature <= 2.0:
            raise EngineError("temperature must be between 0 and 2", "temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise EngineError("top_p must be in (0, 1]", "top_p")
        if self.top_k < 0:
            raise EngineError("top_k must be >= 0", "top_k")
        if len(self.stop) > 4:
            raise EngineError("at most 4 stop sequences are allowed", "stop")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass(frozen=True)
class SegmentInput:
    """One entry of ``segments[]``. ``content`` may be None when the server already
    holds the segment (by ``hash``) or it is registered under ``name``."""

    id: str
    content: str | None = None
    hash: str | None = None
    name: str | None = None
    ttl_s: float | None = None
    # "anywhere": also keep a position-independent copy of its KV, reused (blended)
    # wherever the segment appears later; "prefix" (None): exact prefix reuse only.
    reuse: Literal["prefix", "anywhere"] | None = None


@dataclass(frozen=True)
class ChatRequest:
    tenant: str
    messages: list[dict[str, Any]]
    segments: list[SegmentInput] = field(default_factory=list)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    tools: list[dict[str, Any]] = field(default_factory=list)
    # "none" keeps the tools in the prompt (a stable prefix) but never parses calls;
    # "required" or {"type": "function", "function": {"name": N}} forces a call.
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True  # False: at most one call per reply
    # OpenAI's: None / {"type": "text"}, {"type": "json_object"}, or
    # {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}
    response_format: dict[str, Any] | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token and its log-probability, from the logits its choice was
    made from (after ``logit_bias`` and any grammar mask, before temperature);
    ``top``: the most likely tokens at that step, best first."""

    token_id: int
    token: str
    bytes: tuple[int, ...]
    logprob: float
    top: tuple[TokenLogprob, ...] = ()


class TextDelta(str):
    """A piece of generated text as the engine streams it: a plain ``str`` (what
    single-choice callers read) that also says which choice it belongs to and the
    logprobs of the tokens it completes (when they were asked for)."""

    choice: int  # the choice's index (not ``index``: ``str.index`` is a method)
    logprobs: tuple[TokenLogprob, ...]

    def __new__(cls, text: str, choice: int = 0,
                logprobs: tuple[TokenLogprob, ...] = ()) -> TextDelta:
        obj = super().__new__(cls, text)
        obj.choice, obj.logprobs = choice, logprobs
        return obj


@dataclass
class Choice:
    """One of a request's ``n`` generated replies."""

    index: int
    text: str
    finish_reason: str
    token_ids: list[int] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # None: not asked for


@dataclass(frozen=True)
class SegmentUsage:
    id: str
    hash: str
    status: Literal["hit", "partial", "miss", "blended"]
    tokens: int
    kind: Literal["segment", "tools", "message", "chunk"] = "segment"
    recomputed: int | None = None  # "blended": how many of its tokens were recomputed
    reused: int | None = None  # "partial": how many of its first tokens came from the cache
    # where a hit's KV came from; None for a unit computed (a miss) or blended
    tier: Literal["ram", "disk", "redis"] | None = None

    def as_dict(self) -> dict[str, Any]:
        d = {"id": self.id, "hash": self.hash, "status": self.status, "tokens": self.tokens,
             "kind": self.kind, "tier": self.tier}
        if self.recomputed is not None:
            d["recomputed"] = self.recomputed
        if self.reused is not None:
            d["reused"] = self.reused
        return d


@dataclass
class GenerationResult:
    text: str
    finish_reason: Literal["stop", "length", "cancelled", "tool_calls"]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    chain: str
    segments: list[SegmentUsage]
    ttft_s: float
    total_s: float
    token_ids: list[int] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    tools_count: int = 0
    tools_digest: str | None = None
    # chain after the stable part of the prompt (segments, tools, system messages)
    prefix_chain: str = ""
    logprobs: list[TokenLogprob] | None = None  # of choice 0; None: not asked for
    # Every choice when the request asked for n > 1 (choice 0 is also the fields above);
    # ``completion_tokens`` counts them all, the prompt is counted once.
    more_choices: list[Choice] = field(default_factory=list)

    def choices(self) -> list[Choice]:
        first = Choice(0, self.text, self.finish_reason, self.token_ids, self.tool_calls,
                       self.logprobs)
        return [first, *self.more_choices]

    @property
    def blended_tokens(self) -> int:
        """Prompt tokens whose KV came from a segment computed in another position."""
        return sum(s.tokens for s in self.segments if s.status == "blended")

    @property
    def computed_tokens(self) -> int:
        """Prompt tokens that ran through every layer for this request."""
        return self.prompt_tokens - self.cached_tokens - self.blended_tokens + self.recomputed_tokens

    @property
    def recomputed_tokens(self) -> int:
        """Of ``blended_tokens``, those recomputed (all layers) for this context."""
        return sum(s.recomputed or 0 for s in self.segments if s.status == "blended")

    def usage(self) -> dict[str, Any]:
        """OpenAI ``usage`` plus segcache's extensions."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "cached_prefix_tokens": self.cached_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
            "segcache": {
                "chain": self.chain,
                "prefix_chain": self.prefix_chain,
                "computed_tokens": self.computed_tokens,
                "blended_tokens": self.blended_tokens,
                "recomputed_tokens": self.recomputed_tokens,
                "segments": [s.as_dict() for s in self.segments],
            },
        }


@dataclass(frozen=True)
class WarmResult:
    cached_segments: int
    root_hash: str
    segments: list[SegmentUsage]
