"""Grammar masks in batched decoding: the allowed set computed at most once per state,
into a bitmask; a greedy choice made without it where the parser can vouch for the
best tokens, a sampled one kept when the grammar allows it; requests with and without
constraints in one batch each answering as they do alone (greedy, float32); and the
CPU shortcuts of the choice itself (argmax, draws)."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
import torch

from segcache.engine.grammar import Constraint, grammar_for
from segcache.engine.sampling import argmax
from segcache.engine.types import ChatRequest, SamplingParams
from tests.test_structured_output import PERSON, USER, WEATHER, chat_together, schema_format


def _request(text: str, fmt=None, tools=(), tool_choice=None, **sampling) -> ChatRequest:
    return ChatRequest("t", [{"role": "user", "content": text}], response_format=fmt,
                       tools=list(tools), tool_choice=tool_choice,
                       sampling=SamplingParams(**{"max_tokens": 40, "temperature": 0, **sampling}))


@pytest.fixture
def count_sets(monkeypatch):
    """How many allowed sets (llguidance masks) the constraints computed."""
    computed = [0]
    allowed = Constraint._allowed

    def counted(self, vocab_size):
        computed[0] += not self._fresh
        return allowed(self, vocab_size)

    monkeypatch.setattr(Constraint, "_allowed", counted)
    return computed


def test_a_mixed_batch_decodes_every_request_as_alone(tiny_engine_factory):
    """Constrained (greedy, greedy with logprobs, sampled with n=2, a forced tool
    call) and plain requests decoding in the same steps: each gets exactly the tokens
    it gets alone on a cold engine, and the constrained ones validate."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    forced = _request("weather?", tools=[WEATHER], tool_choice=named, max_tokens=120)
    jobs = [_request("json please", schema_format(PERSON)),
            _request("plain please"),
            _request("an object", {"type": "json_object"}, logprobs=2),
            _request("sampled json", schema_format(PERSON), temperature=1.0, seed=7, n=2),
            _request("sampled plain", temperature=0.8, seed=3),
            forced]
    alone = [tiny_engine_factory().chat(r) for r in jobs]
    engine = tiny_engine_factory()
    steps = engine.scheduler.steps
    results = chat_together(engine, jobs)
    for i, cold in enumerate(alone):
        assert [c.token_ids for c in results[i].choices()] == [c.token_ids for c in cold.choices()], i
    assert results[2].logprobs == alone[2].logprobs
    decoded = sum(results[i].completion_tokens for i in range(len(jobs)))
    assert engine.scheduler.steps - steps < decoded  # some steps decoded several requests
    for choice in (results[0], *results[3].choices()):
        jsonschema.validate(json.loads(choice.text), PERSON)
    assert isinstance(json.loads(results[2].text), dict)
    (call,) = results[5].tool_calls
    assert call["function"]["name"] == "get_weather"


def test_the_greedy_shortcut_chooses_what_the_full_mask_does(tiny_engine_factory, count_sets):
    """Asking for logprobs makes every step mask its row (logprobs come from the masked
    logits); without them a greedy step computes the allowed set only when the parser
    cannot vouch for one of its best tokens. The tokens are the same, and inside the
    string (most of the reply) no set was computed."""
    engine = tiny_engine_factory()
    fmt = schema_format({"type": "object", "properties": {"note": {"type": "string"}},
                         "required": ["note"], "additionalProperties": False})
    masked = engine.chat(_request("a note", fmt, max_tokens=60, logprobs=0))
    assert count_sets[0] == masked.completion_tokens
    count_sets[0] = 0
    shortcut = engine.chat(_request("a note", fmt, max_tokens=60))
    assert shortcut.token_ids == masked.token_ids
    assert 0 < count_sets[0] < shortcut.completion_tokens / 2


def test_allows_and_mask_agree_with_llguidance(property_engine):
    """Along a sampled path, in every state: ``mask`` leaves finite exactly the tokens
    llguidance's own logit bias allows (recomputed after each token, not reused from
    the previous state); ``allows`` answers exactly as the mask for every token
    probed and for EOS, from the parser alone where no bytes are forced (where they
    are, the parser accepts tokens the mask refuses: ``{`` where the mask wants
    ``{"``); ``greedy_choice`` gives the masked row's argmax, without computing the
    allowed set where it can."""
    grammars, tok = property_engine.grammars, property_engine.tokenizer
    vocab, eos = property_engine.runtime.arch.vocab_size, tok.eos_ids
    c = Constraint(grammars.compile(grammar_for(_request("x", schema_format(PERSON))),
                                    "response_format"), eos)
    reference = c.matcher.deep_copy()
    brace = tok.encode("{")[0]
    assert reference.validate_tokens([brace]) == 1 and not c.allows(brace, vocab)
    g = torch.Generator().manual_seed(0)
    sizes, forced_states, shortcuts = set(), 0, set()
    for _ in range(40):
        logits = torch.randn(vocab, generator=g)
        expected = torch.from_numpy(np.frombuffer(reference.compute_logit_bias(), np.uint8)[:vocab] > 0)
        forced = bool(reference.compute_ff_bytes())
        probe = torch.nonzero(expected).flatten()[:50].tolist() + [argmax(logits), brace] + \
            torch.randint(vocab, (200,), generator=g).tolist()
        probe = [t for t in probe if t not in eos]
        c._fresh = False  # (white box) to see which answers needed the allowed set
        assert [c.allows(t, vocab) for t in probe] == [bool(expected[t]) for t in probe]
        assert c._fresh == forced  # the parser alone answered where no bytes are forced
        assert [c.allows(t, vocab) for t in eos] == [bool(expected[t]) for t in eos]
        rows = _rows_for_greedy_choice(logits, expected, eos)
        best = {}
        for kind, row in rows.items():
            c._fresh = False  # (white box) to see whether this choice computed the set
            best[kind] = c.greedy_choice(row)
            if not c._fresh:
                shortcuts.add((kind, forced))
        masked = c.mask(logits)
        finite = torch.isfinite(masked)
        assert torch.equal(finite, expected)
        assert torch.equal(masked[finite], logits[finite])
        for kind, row in rows.items():
            assert best[kind] == argmax(c.mask(row)), (kind, best[kind], argmax(c.mask(row)))
        token = argmax(masked)
        sizes.add(int(expected.sum()))
        forced_states += forced
        if token in eos:
            break
        c.advance(token)
        reference.consume_token(token)
    assert len(sizes) > 2 and forced_states > 1  # varied states, forced and free
    # rows answered without the allowed set: every kind, where no bytes are forced
    assert {"random", "third", "tie"} <= {kind for kind, forced in shortcuts if not forced}
    assert not any(forced for _, forced in shortcuts)
    assert ("eos", False) not in shortcuts  # EOS is asked of the allowed set


def test_greedy_choice_where_the_grammar_may_end(property_engine):
    """After ``1`` an integer may end or go on: with EOS the best logit the masked
    choice is EOS, and ``greedy_choice`` must not pass over it to a digit."""
    tok, vocab = property_engine.tokenizer, property_engine.runtime.arch.vocab_size
    c = Constraint(property_engine.grammars.compile(
        grammar_for(_request("x", schema_format({"type": "integer"}))), "response_format"),
        tok.eos_ids)
    one, two = tok.encode("1")[0], tok.encode("2")[0]
    c.advance(one)
    logits = torch.zeros(vocab)
    logits[min(tok.eos_ids)], logits[two] = 9.0, 8.0
    assert argmax(c.mask(logits)) == min(tok.eos_ids)
    assert c.greedy_choice(logits) == min(tok.eos_ids)
    logits[min(tok.eos_ids)] = 7.0  # now the digit leads, and is allowed
    assert c.greedy_choice(logits) == two == argmax(c.mask(logits))
    assert c.greedy_choice(logits.to(torch.bfloat16)) is None  # not a numpy row: mask it


def test_sampling_without_the_mask_draws_as_from_the_masked_row(property_engine, monkeypatch):
    """A token drawn from the unmasked row is kept when allowed, else the masked row is
    drawn from: the tokens still come out with the masked row's probabilities. After
    ``1`` an integer may end or go on; a refused token holds most of the mass."""
    from segcache.engine.decode import Decoder, Sequence
    from segcache.engine.sampling import Sampler

    tok, vocab = property_engine.tokenizer, property_engine.runtime.arch.vocab_size
    c = Constraint(property_engine.grammars.compile(
        grammar_for(_request("x", schema_format({"type": "integer"}))), "response_format"),
        tok.eos_ids)
    c.advance(tok.encode("1")[0])
    eos, two, three, letter = min(tok.eos_ids), tok.encode("2")[0], tok.encode("3")[0], tok.encode("a")[0]
    logits = torch.full((vocab,), -1e4)
    logits[[letter, eos, two, three]] = torch.tensor([2.0, 1.0, 1.0, 0.0])
    expected = torch.softmax(torch.tensor([1.0, 1.0, 0.0]), -1).tolist()  # eos, 2, 3
    masks = [0]
    mask = Constraint.mask
    monkeypatch.setattr(Constraint, "mask", lambda self, row: (masks.__setitem__(0, masks[0] + 1),
                                                                mask(self, row))[1])
    seq = Sequence(0, torch.empty(0), 0, Sampler(SamplingParams(temperature=1.0, seed=11)), None, c)
    draws = [Decoder._constrained(seq, logits)[1] for _ in range(3000)]
    for token, p in zip((eos, two, three), expected, strict=True):
        assert abs(draws.count(token) / len(draws) - p) < 0.03, (token, draws.count(token), p)
    assert letter not in draws
    assert 0.4 < masks[0] / len(draws) < 0.7  # ~53% of the first draws were the refused letter


def _rows_for_greedy_choice(logits: torch.Tensor, expected: torch.Tensor,
                            eos) -> dict[str, torch.Tensor]:
    """Rows whose masked argmax ``greedy_choice`` must find: the random one; one
    where refused tokens lead (the best allowed token is third); one where two allowed
    tokens tie for the best (the lower id wins); one led by EOS."""
    ok, refused = torch.nonzero(expected).flatten(), torch.nonzero(~expected).flatten()
    rows = {"random": logits}
    if len(ok) >= 2:
        rows["third"] = logits.clone()
        rows["third"][refused[:2]] = torch.tensor([9.0, 8.0])
        rows["third"][ok[-1]] = 7.0
        rows["tie"] = logits.clone()
        rows["tie"][ok[-1]] = rows["tie"][ok[0]] = 9.0
    rows["eos"] = logits.clone()
    rows["eos"][min(eos)] = 9.0
    return rows


def test_argmax_is_torch_argmax():
    """The CPU float32 shortcut picks what ``torch.argmax`` picks: the first of equal
    maxima, an all -inf row, and the fallback dtypes."""
    g = torch.Generator().manual_seed(1)
    rows = [torch.randn(49152, generator=g) for _ in range(5)]
    tied = torch.zeros(100)
    tied[[7, 40, 90]] = 3.0
    rows += [tied, torch.full((10,), float("-inf")), rows[0].to(torch.bfloat16),
             torch.randn(8, 300, generator=g)[3]]  # a row of a batch (a view)
    for row in rows:
        assert argmax(row) == int(torch.argmax(row))
    assert argmax(tied) == 7


@pytest.fixture(scope="module")
def property_engine(tokenizer):
    from segcache.config import CacheConfig
    from segcache.engine.engine import Engine
    from tests.tiny import tiny_runtime

    engine = Engine(tiny_runtime(), tokenizer, CacheConfig(), "tiny")
    yield engine
    engine.close(drain=False)


@pytest.mark.slow
def test_greedy_shortcut_on_the_real_model(real_engine, count_sets):
    """The real model picks allowed tokens itself where the answer is free (the
    values): the shortcut answers as the fully masked run does, computing fewer
    allowed sets."""
    fmt = schema_format(PERSON)
    req = ChatRequest("grammar-masks", USER, response_format=fmt,
                      sampling=SamplingParams(max_tokens=50, temperature=0))
    masked_req = ChatRequest("grammar-masks", USER, response_format=fmt,
                             sampling=SamplingParams(max_tokens=50, temperature=0, logprobs=0))
    masked = real_engine.chat(masked_req)
    count_sets[0] = 0
    shortcut = real_engine.chat(req)
    assert shortcut.token_ids == masked.token_ids
    jsonschema.validate(json.loads(shortcut.text), PERSON)
    assert count_sets[0] < shortcut.completion_tokens  # (PERSON's keys are forced bytes)


def test_sampler_draws_follow_the_distribution():
    """The CPU draw (inverse cumulative sum) gives each token its probability, never a
    token of probability 0 (before, after or between the others), and the same tokens
    again for the same seed."""
    from segcache.engine.sampling import Sampler

    probs = torch.zeros(1000)
    probs[[3, 500, 998]] = torch.tensor([0.2, 0.5, 0.3])
    sampler = Sampler(SamplingParams(temperature=1.0, seed=5))
    draws = [sampler._draw(probs * 7.0) for _ in range(5000)]  # any positive sum
    assert set(draws) == {3, 500, 998}
    for token, p in ((3, 0.2), (500, 0.5), (998, 0.3)):
        assert abs(draws.count(token) / len(draws) - p) < 0.025
    again = Sampler(SamplingParams(temperature=1.0, seed=5))
    assert [again._draw(probs * 7.0) for _ in range(200)] == draws[:200]


def test_sampler_draw_edges():
    """Zero-probability tokens around a single one are never drawn; a nan row is
    refused as torch.multinomial refuses it (not turned into some token)."""
    from segcache.engine.sampling import Sampler

    sampler = Sampler(SamplingParams(temperature=1.0, seed=0))
    assert {sampler._draw(torch.tensor([0.0, 1.0, 0.0, 0.0])) for _ in range(200)} == {1}
    with pytest.raises(RuntimeError):
        sampler._draw(torch.tensor([float("nan"), 1.0]))
