"""Segment-aligned tokenization: boundaries are token boundaries, and a segment's
ids depend only on its content."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from segcache.model.tokenizer import SEGMENT_JOINER, TemplateError

# Rare code points outside the vocabulary decode lossily; that is the tokenizer, not alignment.
TEXT = st.text(st.characters(max_codepoint=0x2FFF, exclude_categories=("Cs", "Co", "Cc")),
               min_size=1, max_size=60)


def test_plain_chat_matches_template_tokenization(tokenizer):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    parts = tokenizer.prompt_parts(msgs, [])
    ids = [i for p in parts for i in p.ids]
    ref = tokenizer.hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    ref = ref["input_ids"] if hasattr(ref, "keys") else ref
    assert ids == list(ref)
    assert [p.kind for p in parts] == ["template", "message", "template"]


@settings(max_examples=40, deadline=None)
@given(a=TEXT, b=TEXT, c=TEXT, user=TEXT)
def test_segment_ids_depend_only_on_content(tokenizer, a, b, c, user):
    msgs = [{"role": "user", "content": user}]
    enc = [tokenizer.encode(x) for x in (a, b, c)]
    parts1 = tokenizer.prompt_parts(msgs, [enc[0], enc[1]])
    parts2 = tokenizer.prompt_parts(msgs, [enc[2], enc[1], enc[0]])
    seg1 = {p.index: p.ids for p in parts1 if p.kind == "segment"}
    seg2 = {p.index: p.ids for p in parts2 if p.kind == "segment"}
    # Same content -> same ids, whatever its neighbours and position.
    assert seg1[0] == seg2[2] == tuple(enc[0])
    assert seg1[1] == seg2[1] == tuple(enc[1])
    # Every boundary is a token boundary: the prompt is exactly the concatenation of
    # independently tokenized pieces, and decodes back to the rendered template text.
    rendered = tokenizer.render([{"role": "system", "content": a + SEGMENT_JOINER + b}] + msgs)
    ids = [i for p in parts1 for i in p.ids]
    assert tokenizer.hf.decode(ids) == rendered


def test_segments_merge_into_existing_system_message(tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    parts = tokenizer.prompt_parts(msgs, [tokenizer.encode("RULES")])
    text = tokenizer.hf.decode([i for p in parts for i in p.ids])
    assert text.startswith("<|im_start|>system\nRULES\n\nBe brief.<|im_end|>")
    assert text.count("<|im_start|>system") == 1


def test_template_that_rewrites_content_is_rejected(tokenizer):
    import copy

    import pytest

    tok = copy.copy(tokenizer)
    tok.hf = copy.copy(tokenizer.hf)
    tok.hf.chat_template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    with pytest.raises(TemplateError):
        tok.prompt_parts([{"role": "user", "content": "hi"}], [])
