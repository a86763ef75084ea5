"""What a request may ask of this model, checked before any compute (``Limits``):
each check raises an ``EngineError`` (a 4xx at the server) that names the field and
says what to change."""

from __future__ import annotations

from segcache.engine.types import ChatRequest, ContextOverflowError, EngineError, SamplingParams


def chat_chars(req: ChatRequest) -> int:
    """Characters of text a chat request brings (contents, tool calls, tools)."""
    n = sum(len(s.content or "") for s in req.segments)
    for m in req.messages:
        content = m.get("content")
        n += len(content) if isinstance(content, str) else 0
        n += sum(len(str(c)) for c in m.get("tool_calls") or ())
    return n + sum(len(str(t)) for t in req.tools)


class Limits:
    """The model's vocabulary and context window, and the most characters one token
    covers (so text can be refused by its length alone, before tokenizing)."""

    def __init__(self, vocab_size: int, context_window: int, max_token_chars: int) -> None:
        self.vocab_size = vocab_size
        self.context_window = context_window
        self.max_token_chars = max_token_chars

    def check_sampling(self, sampling: SamplingParams) -> None:
        vocab = self.vocab_size
        bad = [t for t, _ in sampling.logit_bias if t >= vocab]
        if bad:
            raise EngineError(f"Invalid key in 'logit_bias': {bad[0]} is not a token id of this "
                              f"model (its ids are 0..{vocab - 1})", "logit_bias")

    def check_token_ids(self, ids: tuple[int, ...], param: str) -> None:
        if not ids:
            raise EngineError(f"{param} must not be empty", param)
        if any(not 0 <= t < self.vocab_size for t in ids):
            raise EngineError(f"{param} holds a token id outside this model's vocabulary "
                              f"(0..{self.vocab_size - 1})", param)

    def check_text_size(self, n_chars: int, param: str) -> None:
        """Refuse text that cannot fit the context window, from its length alone (no
        token covers more than ``max_token_chars`` characters)."""
        at_least = n_chars // self.max_token_chars
        if at_least > self.context_window:
            raise ContextOverflowError(
                f"the request holds {n_chars} characters of text: at least {at_least} tokens, "
                f"over the model's context window of {self.context_window} tokens; send less "
                "text", param)

    def check_context(self, prompt_tokens: int, max_tokens: int) -> None:
        if prompt_tokens + max_tokens > self.context_window:
            raise ContextOverflowError(
                f"the prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}: together "
                f"{prompt_tokens + max_tokens}, over the model's context window of "
                f"{self.context_window} tokens; shorten the prompt or lower max_tokens", "max_tokens")
