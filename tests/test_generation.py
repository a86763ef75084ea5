"""Sampling, streaming detokenization, stop strings, limits, and the engine's
request path on the tiny model."""

from __future__ import annotations

import pytest
import torch

from segcache.engine.detok import TextStream
from segcache.engine.sampling import Sampler
from segcache.engine.types import (
    ChatRequest,
    ContextOverflowError,
    EngineError,
    SamplingParams,
)


def test_sampler_greedy_and_topk1_agree():
    logits = torch.randn(100, generator=torch.Generator().manual_seed(0))
    best = int(logits.argmax())
    assert Sampler(SamplingParams(temperature=0.0)).sample(logits) == best
    assert Sampler(SamplingParams(temperature=1.0, top_k=1, seed=3)).sample(logits) == best


def test_sampler_seed_reproducible_and_top_p_restricts():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    p = SamplingParams(temperature=1.0, seed=42)
    a = [Sampler(p).sample(logits) for _ in range(3)]
    assert len(set(a)) == 1
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.05, seed=1))
    allowed = set(torch.topk(logits, 60).indices.tolist())
    assert all(s.sample(logits) in allowed for _ in range(50))


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0),
                                 dict(top_k=-2), dict(stop=("a", "b", "c", "d", "e"))])
def test_sampling_params_validated(bad):
    with pytest.raises(EngineError):
        SamplingParams(**bad)


def test_text_stream_holds_back_stop_prefix():
    vocab = {1: "Hel", 2: "lo ", 3: "EN", 4: "D now"}
    stream = TextStream(vocab.get, stop=("END",))
    out = [stream.push(i) for i in (1, 2, 3)]
    assert "".join(out) == "Hello "  # "EN" is held back: it may become "END"
    out.append(stream.push(4))
    assert stream.stopped and stream.text == "Hello "
    assert "".join(out) + stream.flush() == "Hello "


def test_text_stream_waits_for_complete_utf8():
    pieces = {1: "caf", 2: None, 3: "é"}  # 2: the first byte of "é", not final yet

    stream = TextStream(pieces.get)
    assert stream.push(1) == "caf"
    assert stream.push(2) == ""
    assert stream.push(3) == "é"
    assert stream.ids == [1, 2, 3] and stream.text == "café"


MULTIBYTE = "naïve café → 日本語のテキスト 🎉👩‍💻 Ελληνικά done"


def test_streamed_text_equals_one_shot_decode_on_the_real_tokenizer(tokenizer):
    """Characters of 2, 3 and 4 UTF-8 bytes (and a ZWJ sequence) split across byte-level
    tokens: the streamed pieces concatenate to exactly the one-shot decode, and no
    piece holds half a character."""
    ids = tokenizer.encode(MULTIBYTE)
    assert len(ids) > len(MULTIBYTE.split())  # multibyte characters really span tokens
    assert sum(1 for i in ids if "\ufffd" in tokenizer.decode([i])) >= 4
    stream = TextStream(tokenizer.decode_stream())
    pieces = [stream.push(i) for i in ids]
    pieces.append(stream.flush())
    assert "".join(pieces) == tokenizer.decode(ids) == MULTIBYTE
    assert stream.text == MULTIBYTE
    assert not any("\ufffd" in p for p in pieces)


def test_streamed_text_with_a_stop_string_on_the_real_tokenizer(tokenizer):
    ids = tokenizer.encode(MULTIBYTE)
    stream = TextStream(tokenizer.decode_stream(), stop=("のテ",))
    out = ""
    for i in ids:
        out += stream.push(i)
        if stream.stopped:
            break
    out += stream.flush()
    assert out == stream.text == "naïve café → 日本語"


def test_streamed_text_of_special_and_incomplete_tokens(tokenizer):
    """Special tokens are skipped as in ``decode``; a reply that ends inside a character
    keeps the complete text only."""
    ids = tokenizer.encode("<|im_start|>é🎉<|im_end|>", special=True)  # the control tokens themselves
    stream = TextStream(tokenizer.decode_stream())
    streamed = "".join(stream.push(i) for i in ids) + stream.flush()
    assert streamed == tokenizer.decode(ids) == "é🎉"
    cut = tokenizer.encode("ok 🎉")[:-1]  # the emoji's last byte token missing
    stream = TextStream(tokenizer.decode_stream())
    assert "".join(stream.push(i) for i in cut) + stream.flush() == "ok"  # " " went with the emoji


def test_generation_respects_max_tokens_and_streams(tiny_engine_factory):
    engine = tiny_engine_factory()
    chunks: list[str] = []
    req = ChatRequest("t", [{"role": "user", "content": "hello"}], [],
                      SamplingParams(max_tokens=6, temperature=0.0))
    r = engine.chat(req, on_text=chunks.append)
    assert r.completion_tokens <= 6
    assert "".join(chunks) == r.text
    if r.finish_reason == "length":
        assert r.completion_tokens == 6
    again = engine.chat(req)
    assert again.token_ids == r.token_ids  # greedy is deterministic


def test_stop_string_ends_generation(tiny_engine_factory):
    engine = tiny_engine_factory()
    req = ChatRequest("t", [{"role": "user", "content": "hello"}], [],
                      SamplingParams(max_tokens=12, temperature=0.0))
    free = engine.chat(req)
    assert len(free.text) > 3, "tiny model should produce some text"
    stop = free.text[2:4]
    stopped = engine.chat(ChatRequest("t", req.messages, [], SamplingParams(
        max_tokens=12, temperature=0.0, stop=(stop,))))
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.find(stop)]


def test_over_long_prompt_is_refused_before_compute(tiny_engine_factory):
    engine = tiny_engine_factory()
    calls = []
    orig = engine.runtime.prefill
    engine.runtime.prefill = lambda *a, **k: calls.append(1) or orig(*a, **k)
    req = ChatRequest("t", [{"role": "user", "content": "word " * 1500}], [],
                      SamplingParams(max_tokens=1000))
    with pytest.raises(ContextOverflowError) as e:
        engine.chat(req)
    assert "context window of 2048" in e.value.message
    assert calls == []


def test_cancellation_stops_generation(tiny_engine_factory):
    engine = tiny_engine_factory()
    seen = []
    req = ChatRequest("t", [{"role": "user", "content": "hello"}], [],
                      SamplingParams(max_tokens=50, temperature=0.0, stop=()))
    r = engine.chat(req, on_text=seen.append, is_cancelled=lambda: len(seen) >= 1)
    assert r.finish_reason in ("cancelled", "stop")
    assert r.completion_tokens < 50
