"""Tokenizer and chat template, with segment-aligned tokenization.

The chat template is rendered with sentinel strings in place of every segment
and every message content; the rendered text is split at the sentinels and each
piece is tokenized on its own. A prompt is therefore a list of parts whose
boundaries are token boundaries by construction, and a segment's token ids
depend only on its content (no token ever straddles two parts).

Only the template's own text is tokenized with special tokens recognised. Contents
(messages, segments, the tools block) are plain text: ``<|im_end|>`` written by a
user is the characters ``<``, ``|``, ``im``, ... and cannot end a turn or forge one,
as in OpenAI's API. The digest (part of the model fingerprint, hence of every
cache namespace) names this rule, so KV computed under another never matches.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

SEGMENT_JOINER = "\n\n"
_SENTINEL = "\ue000segcache:{kind}:{index}\ue001"
_SENTINEL_RE = re.compile("\ue000segcache:(seg|msg):(\\d+)\ue001")
_GIL_FREE_CHARS = 8192  # longer texts are tokenized with the GIL released
# Bump when the rule for tokenizing contents changes (it is part of the digest).
CONTENT_TOKENIZATION = "\ncontents: plain text, special tokens inert (v2)"


class TemplateError(ValueError):
    """The chat template cannot render this conversation (e.g. roles it rejects)."""


@dataclass(frozen=True)
class PromptPart:
    """A run of prompt tokens. ``kind`` says where it came from: template text,
    a segment (``index`` into the request's segments) or a message content
    (``index`` into the messages)."""

    kind: Literal["template", "segment", "message"]
    index: int
    ids: tuple[int, ...]


class ChatTokenizer:
    """A Hugging Face fast tokenizer plus its chat template."""

    def __init__(self, hf_tokenizer: Any, eos_ids: tuple[int, ...] = ()) -> None:
        self.hf = hf_tokenizer
        # The Rust tokenizer's encode/decode take it immutably, so the engine thread
        # can decode while request threads encode (the Python wrapper may not).
        self._fast = hf_tokenizer.backend_tokenizer
        # A copy that reads special-token strings as plain text (set once, never toggled:
        # request threads encode concurrently).
        self._plain = type(self._fast).from_str(self._fast.to_str())
        self._plain.encode_special_tokens = True
        if not getattr(hf_tokenizer, "chat_template", None):
            raise TemplateError("the tokenizer has no chat template")
        ids = set(eos_ids)
        if hf_tokenizer.eos_token_id is not None:
            ids.add(int(hf_tokenizer.eos_token_id))
        self.eos_ids = frozenset(ids)
        blob = (hf_tokenizer.backend_tokenizer.to_str() + hf_tokenizer.chat_template
                + CONTENT_TOKENIZATION).encode()
        self.digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        self.vocab_size = len(hf_tokenizer)
        # No token covers more characters than its vocabulary string has (byte-level
        # BPE: one character per byte), so a text of n characters has at least
        # n / max_token_chars tokens: enough to refuse a huge text before tokenizing it.
        self.max_token_chars = max(len(t) for t in self._fast.get_vocab(with_added_tokens=True))

    @classmethod
    def load(cls, directory: Path, eos_ids: tuple[int, ...] = ()) -> ChatTokenizer:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(directory)), eos_ids)

    def encode(self, text: str, special: bool = False) -> list[int]:
        """Token ids of ``text`` with no special tokens added. ``special``: special
        tokens written in the text (``<|im_start|>``) are recognised, for the
        template's own text and raw completion prompts; else they are plain text."""
        if not text:
            return []
        tok = self._fast if special else self._plain
        if len(text) < _GIL_FREE_CHARS:
            return tok.encode(text, add_special_tokens=False).ids
        # encode_batch tokenizes without the GIL: a long text holds up no other thread.
        return tok.encode_batch([text], add_special_tokens=False)[0].ids

    def decode(self, ids: list[int] | tuple[int, ...]) -> str:
        return self._fast.decode(list(ids), skip_special_tokens=True)

    def decode_stream(self) -> Callable[[int], str | None]:
        """A new incremental decoder for one reply: call it with each token id in
        turn; it returns the text that id made final, or None while a multi-byte
        character is incomplete. The returns concatenate to ``decode`` of all the
        ids, and each call decodes a short window of ids, not the whole reply
        (the ``tokenizers`` library's ``DecodeStream``)."""
        from tokenizers.decoders import DecodeStream

        stream, fast = DecodeStream(skip_special_tokens=True), self._fast
        return lambda token_id: stream.step(fast, token_id)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The template applied to ``messages`` as plain text."""
        try:
            return self.hf.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as exc:  # jinja raises TemplateError/TypeError/... for bad input
            raise TemplateError(f"the chat template rejected these messages: {exc}") from exc

    def prompt_parts(self, messages: list[dict[str, Any]], segment_ids: list[list[int]],
                     add_generation_prompt: bool = True,
                     trailing_ids: list[list[int]] = (),
                     pieces: list[list[str]] | None = None) -> list[PromptPart]:
        """Segment-aligned prompt for ``segments`` (already tokenized, in order)
        followed by ``messages``.

        Segments are joined with ``SEGMENT_JOINER`` at the start of the first
        system message (one is created if there is none); ``trailing_ids`` (more
        segments, indexed after ``segment_ids``) go after that system message's
        text, as Qwen-style templates place tool declarations. ``pieces[i]``: texts
        whose concatenation is message i's content, each tokenized on its own (a
        piece boundary is a token boundary); the parts of kind "message" are then
        numbered by piece, in order, not by message. Raises TemplateError if the
        template does not keep contents verbatim.
        """
        render_msgs = [dict(m) for m in messages]
        contents: dict[tuple[str, int], list[int]] = {}
        n = 0
        for i, m in enumerate(render_msgs):
            texts = pieces[i] if pieces is not None else [m.get("content") or ""]
            m["content"] = "".join(_SENTINEL.format(kind="msg", index=n + k) for k in range(len(texts)))
            for k, text in enumerate(texts):
                contents[("msg", n + k)] = self.encode(text)
            n += len(texts)
        for i, ids in enumerate([*segment_ids, *trailing_ids]):
            contents[("seg", i)] = list(ids)
        lead = [_SENTINEL.format(kind="seg", index=i) for i in range(len(segment_ids))]
        trail = [_SENTINEL.format(kind="seg", index=len(segment_ids) + i)
                 for i in range(len(trailing_ids))]
        if render_msgs and render_msgs[0].get("role") == "system":
            if lead or trail:
                render_msgs[0]["content"] = SEGMENT_JOINER.join([*lead, render_msgs[0]["content"],
                                                                 *trail])
        elif lead or trail:
            render_msgs.insert(0, {"role": "system", "content": SEGMENT_JOINER.join(lead + trail)})
        return self._split(self.render(render_msgs, add_generation_prompt), contents)

    @functools.cached_property
    def renders_name(self) -> bool:
        """Whether the chat template puts a message's ``name`` in front of the model
        (most do not: SmolLM2's and Qwen's drop it). A field it drops must not be
        part of a unit's digest (``kv.autoseg.message_digest``)."""
        def text(name: str) -> str:
            return self.render([{"role": "user", "content": "x", "name": name},
                                {"role": "assistant", "content": "y", "name": name}], False)
        try:
            return text("segcache-a") != text("segcache-b")
        except TemplateError:
            return False

    def _split(self, text: str, contents: dict[tuple[str, int], list[int]]) -> list[PromptPart]:
        parts: list[PromptPart] = []
        seen: set[tuple[str, int]] = set()
        pos = 0
        for m in _SENTINEL_RE.finditer(text):
            if m.start() > pos:
                parts.append(PromptPart("template", -1,
                                         tuple(self.encode(text[pos:m.start()], special=True))))
            key = (m.group(1), int(m.group(2)))
            if key in seen:
                raise TemplateError("the chat template repeats a message content; cannot align segments")
            seen.add(key)
            kind = "segment" if key[0] == "seg" else "message"
            parts.append(PromptPart(kind, key[1], tuple(contents[key])))
            pos = m.end()
        if pos < len(text):
            parts.append(PromptPart("template", -1, tuple(self.encode(text[pos:], special=True))))
        if seen != set(contents):
            raise TemplateError("the chat template does not keep message contents verbatim; "
                                "segments cannot be aligned with it")
        return [p for p in parts if p.ids or p.kind != "template"]
