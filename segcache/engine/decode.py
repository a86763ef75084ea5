"""Decoding one request's choices from its prompt's last logits.

Each choice is a ``Sequence`` with its own KV buffer (choice 0 decodes in the
request's buffer; the others in copies of its prompt slots: the prompt is
computed once), sampler, text stream and, for constrained requests, grammar
state. A step chooses a token for every live sequence from its own logits row
(bias, then grammar mask, then sampling; a choice the grammar allows, greedy or
drawn from the whole distribution, needs no mask), then yields one ``DecodeWork``
per sequence: the scheduler runs them in the same batched step as other requests'.

Per sequence, as before ``n`` existed: EOS or a stop string ends it without a
decode; otherwise its token is decoded, also after the last one (``max_tokens``),
so its buffer holds the KV of every generated token, ready to be kept as a reply.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from segcache.engine.detok import TextStream
from segcache.engine.grammar import Constraint
from segcache.engine.sampling import Sampler
from segcache.engine.scheduler import DecodeWork
from segcache.engine.types import TextDelta, TokenLogprob

Describe = Callable[[int], tuple[str, bytes]]  # token id -> (text, bytes)


@dataclass(eq=False)
class Sequence:
    index: int
    kv: torch.Tensor  # [n_layers, 2, n_kv_heads, capacity, head_dim]
    pos: int  # slot of the next token to decode
    sampler: Sampler
    stream: TextStream
    constraint: Constraint | None = None
    logprobs: list[TokenLogprob] | None = None  # None: not asked for
    token: int | None = None  # chosen, waiting to be decoded
    sampled: int = 0
    finish: str | None = None
    ttft: float = 0.0
    _pending: list[TokenLogprob] = field(default_factory=list)  # not yet sent with text


class Decoder:
    """Drives the ``Sequence``s of one request; ``emit(delta)`` gets each piece of
    final text as a ``TextDelta`` (choice index, logprobs of its tokens)."""

    def __init__(self, eos_ids: frozenset[int], describe: Describe,
                 emit: Callable[[TextDelta], None] | None, t0: float) -> None:
        self.eos_ids = eos_ids
        self.describe = describe
        self.emit = emit
        self.t0 = t0

    def run(self, seqs: list[Sequence], logits: torch.Tensor, max_tokens: int,
            is_cancelled: Callable[[], bool] | None):
        """A job-generator fragment: yields decode work until every sequence is done."""
        rows = {s: logits for s in seqs}
        while True:
            live = [s for s in seqs if s.finish is None]
            for s in live:
                self._choose(s, rows[s])
            if is_cancelled is not None and is_cancelled():
                for s in seqs:
                    s.finish = s.finish or "cancelled"
            live = [s for s in live if s.finish is None]
            if not live:
                break
            works = [DecodeWork(s.token, s.kv, s.pos) for s in live]
            yield works[0] if len(works) == 1 else works
            for s, w in zip(live, works, strict=True):
                rows[s] = w.logits
                s.pos += 1
                if s.sampled == max_tokens:
                    s.finish = "length"
        for s in seqs:
            self._send(s, s.stream.flush(), final=True)

    def _choose(self, s: Sequence, logits: torch.Tensor) -> None:
        logits = s.sampler.adjust(logits)
        if s.constraint is None:
            token = s.sampler.sample(logits)
        else:
            logits, token = self._constrained(s, logits)
        s.sampled += 1
        s.ttft = s.ttft or time.perf_counter() - self.t0
        if s.constraint is not None:
            s.constraint.advance(token)
        if token in self.eos_ids:
            s.finish = "stop"
            return
        if s.logprobs is not None:
            entry = self._logprob(logits, token, s.sampler.params.logprobs or 0)
            s.logprobs.append(entry)
            s._pending.append(entry)
        delta = s.stream.push(token)
        if s.stream.stopped and s.logprobs is not None:
            _drop_stop_tokens(s)
        self._send(s, delta)
        if s.stream.stopped or (s.constraint is not None and s.constraint.failed):
            s.finish = "stop"
        s.token = token

    @staticmethod
    def _constrained(s: Sequence, logits: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(the logits the token was chosen from, the token) under ``s``'s grammar,
        masking the row only when needed (without logprobs, which come from the masked
        row). Greedy: the masked row's best token is found among the row's best
        (``Constraint.greedy_choice``). Sampled from the whole distribution (no top-k,
        top-p): a token drawn from the unmasked row is kept if the grammar allows it,
        else one is drawn from the masked row; a token then comes out with probability
        p / (mass of the allowed tokens), as from the masked row, and a model that
        follows the format keeps its first draw."""
        p, c = s.sampler.params, s.constraint
        if s.logprobs is None and p.greedy:
            token = c.greedy_choice(logits)
            if token is not None:
                return logits, token
        elif s.logprobs is None and p.top_k == 0 and p.top_p >= 1.0:
            token = s.sampler.sample(logits)
            if c.allows(token, logits.shape[-1]):
                return logits, token
        logits = c.mask(logits)
        return logits, s.sampler.sample(logits)

    def _send(self, s: Sequence, text: str, final: bool = False) -> None:
        """Emit ``text`` with the logprobs of the tokens not yet sent (tokens still
        held back, like part of a UTF-8 character, wait for their text)."""
        if not text and not (final and s._pending):
            return
        if self.emit is not None:
            self.emit(TextDelta(text, s.index, tuple(s._pending)))
        s._pending = []

    def _logprob(self, logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
        lp = torch.log_softmax(logits.float(), -1)
        top = ()
        if k:
            values, ids = torch.topk(lp, k)
            top = tuple(self._entry(int(i), float(v)) for v, i in zip(values, ids, strict=True))
        return self._entry(token, float(lp[token]), top)

    def _entry(self, token: int, logprob: float, top: tuple[TokenLogprob, ...] = ()) -> TokenLogprob:
        text, raw = self.describe(token)
        return TokenLogprob(token, text, tuple(raw), max(logprob, -9999.0), top)


def _drop_stop_tokens(s: Sequence) -> None:
    """After a stop string: keep the logprobs of the tokens that start inside the
    returned text (the stop string's own tokens are not part of the reply)."""
    keep, at = 0, 0
    for e in s.logprobs:
        if at >= len(s.stream.text):
            break
        at += len(e.token)
        keep += 1
    dropped = len(s.logprobs) - keep
    del s.logprobs[keep:]
    s._pending = s._pending[:max(0, len(s._pending) - dropped)]
