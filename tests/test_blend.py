"""Non-prefix reuse (CacheBlend): the selective recomputation itself, on the tiny
model and on the real one, and the engine path around it (standalone entries,
telemetry, tenants, blending off)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from segcache.config import CacheConfig
from segcache.engine.types import ChatRequest, SamplingParams, SegmentInput
from tests.tiny import tiny_runtime

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
# The tiny model has 2 layers: c = 0 leaves layer 1 for the selective pass (a larger c
# would be clamped to the last layer, computing every token everywhere).
TINY = CacheConfig(blend_layer=0)
USER = [{"role": "user", "content": "Summarise the rules above in one line."}]
X = "Rule one: every function has a docstring that says what it returns. " * 6
Y = "Rule two: tests name the behaviour they check, not the function. " * 5
Z = "Rule three: errors say what to fix, and where. " * 4


def _standalone(rt, sink: list[int], block: list[int]) -> torch.Tensor:
    """The block computed right behind ``sink``, keys un-rotated (as the engine stores it)."""
    ids = sink + block
    kv = rt.new_kv(len(ids))
    with torch.inference_mode():
        rt.prefill(torch.tensor(ids), torch.arange(len(ids)), kv, 0)
    return rt.unrope_keys(kv[:, :, :, len(sink):], torch.arange(len(sink), len(ids)))


def _blend_logits(rt, prefix: list[int], block: list[int], tail: list[int], handle, ratio: float,
                  layer: int = 1, filter_from: int | None = None):
    """Exact prefill of ``prefix``, then ``block`` (reused from ``handle``) + ``tail`` blended."""
    n = len(prefix) + len(block) + len(tail)
    kv = rt.new_kv(n)
    with torch.inference_mode():
        rt.prefill(torch.tensor(prefix), torch.arange(len(prefix)), kv, 0)
        rt.place_keys(kv, handle, len(prefix))
        reused = torch.zeros(len(block) + len(tail), dtype=torch.bool)
        reused[:len(block)] = True
        ids = torch.tensor(block + tail)
        logits, recomputed = rt.blend(ids, torch.arange(len(prefix), n), kv, len(prefix), reused,
                                      layer, ratio, filter_from)
    return logits[-1], recomputed, kv


def _full_logits(rt, ids: list[int]):
    kv = rt.new_kv(len(ids))
    with torch.inference_mode():
        logits = rt.prefill(torch.tensor(ids), torch.arange(len(ids)), kv, 0)
    return logits[-1], kv


@pytest.mark.parametrize("layer", [0, 1, 3])
def test_ratio_one_equals_full_prefill_tiny(layer):
    rt = tiny_runtime()
    g = torch.Generator().manual_seed(1)
    sink, prefix, block, tail = ([int(t) for t in torch.randint(3, 200, (n,), generator=g)]
                                 for n in (3, 40, 30, 5))
    handle = _standalone(rt, sink, block)
    got, recomputed, kv = _blend_logits(rt, sink + prefix, block, tail, handle, 1.0, layer)
    ref, kv_ref = _full_logits(rt, sink + prefix + block + tail)
    assert bool(recomputed.all())
    assert (got - ref).abs().max().item() < 1e-4
    assert (kv - kv_ref).abs().max().item() < 1e-4  # every layer's K/V is the fresh one


def test_rope_placement_is_exact_at_the_original_position_tiny():
    """Reused at the position it was computed for, behind the same sink, with no
    recomputation: the same logits as computing it there (the prefix path)."""
    rt = tiny_runtime()
    g = torch.Generator().manual_seed(2)
    sink, block, tail = ([int(t) for t in torch.randint(3, 200, (n,), generator=g)]
                         for n in (3, 50, 4))
    handle = _standalone(rt, sink, block)
    got, recomputed, _ = _blend_logits(rt, sink, block, tail, handle, 0.0)
    ref, _ = _full_logits(rt, sink + block + tail)
    assert int(recomputed.sum()) == len(tail)
    assert (got - ref).abs().max().item() < 1e-4


def test_moved_segment_error_shrinks_with_the_ratio():
    """Layer 0 for everyone, layer 1 (the tiny model's last) selective."""
    rt = tiny_runtime()
    g = torch.Generator().manual_seed(3)
    sink, prefix, block, tail = ([int(t) for t in torch.randint(3, 200, (n,), generator=g)]
                                 for n in (3, 60, 40, 3))
    handle = _standalone(rt, sink, block)
    ref, _ = _full_logits(rt, sink + prefix + block + tail)
    errs = {}
    for ratio in (0.0, 0.25, 1.0):
        got, recomputed, _ = _blend_logits(rt, sink + prefix, block, tail, handle, ratio, 0)
        assert int(recomputed[:len(block)].sum()) == round(ratio * len(block))
        assert bool(recomputed[len(block):].all())  # tokens without reused KV: always
        errs[ratio] = (got - ref).abs().max().item()
    assert errs[0.0] > 1e-3  # the moved KV really differs from the fresh one
    assert errs[1.0] < 1e-4
    assert errs[0.25] < errs[0.0]


def test_gradual_filtering_chooses_among_the_earlier_layers_choice_tiny():
    """Layers 0..F for every token, then the kept share shrinks from 2r at F to r at C:
    the tokens recomputed at the end are ceil(r * reused) of the top 2r chosen at
    layer F (what a one-step blend scored at F keeps), the others keep their reused
    K/V in every layer after F; F >= C is the one-step blend, and r = 1 a full prefill."""
    from dataclasses import replace

    from tests.tiny import TINY as TINY_ARCH
    rt = tiny_runtime(arch=replace(TINY_ARCH, n_layers=6))
    g = torch.Generator().manual_seed(4)
    sink, prefix, block, tail = ([int(t) for t in torch.randint(3, 200, (n,), generator=g)]
                                 for n in (3, 30, 80, 4))
    handle = _standalone(rt, sink, block)
    pre = sink + prefix
    at_f, rec_f, _ = _blend_logits(rt, pre, block, tail, handle, 0.3, layer=1)  # one step at F = 1
    got, rec, kv = _blend_logits(rt, pre, block, tail, handle, 0.15, layer=4, filter_from=1)
    assert int(rec[:len(block)].sum()) == 12  # ceil(0.15 * 80)
    assert bool(rec[len(block):].all())
    assert bool((rec & ~rec_f).sum() == 0)  # chosen among layer 1's top 2r (24 tokens)
    assert int(rec_f[:len(block)].sum()) == 24
    dropped = (~rec_f[:len(block)]).nonzero().squeeze(1) + len(pre)
    placed = rt.new_kv(len(pre) + len(block) + len(tail))
    rt.place_keys(placed, handle, len(pre))
    for layer in range(2, 6):  # dropped at layer 1: the reused K/V stay
        assert torch.equal(kv[layer][:, :, dropped], placed[layer][:, :, dropped])
    one_step, rec_one, _ = _blend_logits(rt, pre, block, tail, handle, 0.15, layer=4)
    same, rec_same, _ = _blend_logits(rt, pre, block, tail, handle, 0.15, layer=4, filter_from=4)
    assert torch.equal(one_step, same) and torch.equal(rec_one, rec_same)
    assert not torch.equal(rec_one, rec)  # choosing at layer 4 among all is another choice
    full, _, _ = _blend_logits(rt, pre, block, tail, handle, 1.0, layer=4, filter_from=1)
    ref, _ = _full_logits(rt, pre + block + tail)
    assert (full - ref).abs().max().item() < 1e-4


def test_last_token_must_be_computed():
    rt = tiny_runtime()
    kv = rt.new_kv(4)
    with pytest.raises(ValueError, match="last token"):
        rt.blend(torch.tensor([5, 6, 7, 8]), torch.arange(4), kv, 0,
                 torch.tensor([False, False, True, True]), 1, 0.5)


# ---------------------------------------------------------------- engine, tiny model
def _chat(engine, tenant, segments, messages=USER):
    return engine.chat(ChatRequest(tenant, messages, segments, GREEDY))


def _wait_standalone(engine, tenant: str, n: int, timeout: float = 20.0) -> None:
    """Standalone entries of a chat request are computed by a background job."""
    end = time.monotonic() + timeout
    while engine.cache_stats(tenant)["standalone"]["entries"] < n:
        assert time.monotonic() < end, "standalone entries were not computed"
        time.sleep(0.02)


def anywhere(seg_id: str, content: str) -> SegmentInput:
    return SegmentInput(seg_id, content, reuse="anywhere")


def test_marked_segment_is_blended_at_a_new_position(tiny_engine_factory):
    engine = tiny_engine_factory(TINY)
    first = _chat(engine, "t", [anywhere("x", X)])
    assert [s.status for s in first.segments] == ["miss", "miss"]
    _wait_standalone(engine, "t", 1)
    r = _chat(engine, "t", [SegmentInput("y", Y), anywhere("x", X)])
    status = {s.id: s for s in r.segments}
    assert status["y"].status == "miss" and status["x"].status == "blended"
    n_x = status["x"].tokens
    # template lead (1 token: the joiner) + ceil(0.15 * the rest)
    assert status["x"].recomputed == 1 + -(-(n_x - 1) * 15 // 100)
    usage = r.usage()
    assert usage["cached_prefix_tokens"] == 0  # exact prefix hits only
    assert usage["segcache"]["blended_tokens"] == n_x
    assert usage["segcache"]["recomputed_tokens"] == status["x"].recomputed
    assert usage["segcache"]["computed_tokens"] == r.prompt_tokens - n_x + status["x"].recomputed
    # y (before the blend point) is exact and was inserted; nothing after it was.
    again = _chat(engine, "t", [SegmentInput("y", Y), SegmentInput("z", Z)])
    assert again.segments[0].status == "hit"
    engine.tree.check_integrity()
    assert all(n.pins == 0 for n in engine.tree.nodes())


def test_a_purge_drops_the_standalone_work_still_queued(tiny_engine_factory):
    """A request's standalone blocks are computed by a background job after it answers;
    a purge that comes first leaves the tenant's cache empty (the job inserts nothing),
    so a client that purges before every request measures a cold server."""
    from segcache.engine.scheduler import WaitFor

    def gated(engine):
        gate = ("test", "gate")
        job = engine.blender.standalone_job

        def held(*args):
            while gate in engine._inflight:
                yield WaitFor(gate)
            return (yield from job(*args))

        with engine._lock:
            engine._inflight[gate] = -1
        engine.blender.standalone_job = held
        return lambda: engine._inflight.pop(gate)

    def idle(engine):
        end = time.monotonic() + 20
        while engine.scheduler.load() != {"running": 0, "waiting": 0}:
            assert time.monotonic() < end
            time.sleep(0.02)

    control = tiny_engine_factory(TINY)
    release = gated(control)
    _chat(control, "t", [anywhere("x", X)])
    with control._lock:
        release()
    _wait_standalone(control, "t", 1)  # without a purge the job inserts its block
    engine = tiny_engine_factory(TINY)
    release = gated(engine)
    _chat(engine, "t", [anywhere("x", X)])
    engine.purge("t")
    with engine._lock:
        release()
    idle(engine)
    assert engine.cache_stats("t")["standalone"]["entries"] == 0
    engine.tree.check_integrity()


def test_unmarked_segment_is_not_blended_unless_auto(tiny_engine_factory):
    marked = tiny_engine_factory(TINY)
    _chat(marked, "t", [SegmentInput("x", X)])
    time.sleep(0.2)
    assert marked.cache_stats("t")["standalone"]["entries"] == 0
    r = _chat(marked, "t", [SegmentInput("y", Y), SegmentInput("x", X)])
    assert [s.status for s in r.segments][:2] == ["miss", "miss"]

    auto = tiny_engine_factory(CacheConfig(blend="auto", blend_layer=0))
    _chat(auto, "t", [SegmentInput("x", X)])
    _wait_standalone(auto, "t", 1)
    r = _chat(auto, "t", [SegmentInput("y", Y), SegmentInput("x", X)])
    assert [s.status for s in r.segments][:2] == ["miss", "blended"]


def test_blending_off_leaves_the_exact_prefix_path_unchanged(tiny_engine_factory):
    on, off = tiny_engine_factory(TINY), tiny_engine_factory(CacheConfig(blend="off", blend_layer=0))
    for engine in (on, off):
        _chat(engine, "t", [anywhere("x", X)])
    _wait_standalone(on, "t", 1)
    time.sleep(0.2)
    assert off.cache_stats("t")["standalone"]["entries"] == 0
    r_off = _chat(off, "t", [SegmentInput("y", Y), anywhere("x", X)])
    assert [s.status for s in r_off.segments][:2] == ["miss", "miss"]
    assert r_off.usage()["segcache"]["blended_tokens"] == 0
    # an exact prefix hit is the same with blending on or off
    hit_on = _chat(on, "t", [anywhere("x", X), SegmentInput("z", Z)])
    hit_off = _chat(off, "t", [anywhere("x", X), SegmentInput("z", Z)])
    assert hit_on.segments[0].status == hit_off.segments[0].status == "hit"
    assert hit_on.token_ids == hit_off.token_ids
    assert hit_on.cached_tokens == hit_off.cached_tokens


def test_standalone_entries_never_cross_tenants(tiny_engine_factory):
    engine = tiny_engine_factory(TINY)
    _chat(engine, "alice", [anywhere("x", X)])
    _wait_standalone(engine, "alice", 1)
    r = _chat(engine, "bob", [SegmentInput("y", Y), anywhere("x", X)])
    assert [s.status for s in r.segments][:2] == ["miss", "miss"]
    # purging alice drops her standalone entries too
    engine.purge("alice")
    assert engine.cache_stats("alice")["standalone"]["entries"] == 0


def test_warm_computes_standalone_entries_inline(tiny_engine_factory):
    engine = tiny_engine_factory(TINY)
    engine.warm("t", [anywhere("x", X), SegmentInput("y", Y)])
    stats = engine.cache_stats("t")["standalone"]
    assert stats["entries"] == 1 and stats["bytes"] > 0
    r = _chat(engine, "t", [SegmentInput("z", Z), anywhere("x", X)])
    assert [s.status for s in r.segments][:2] == ["miss", "blended"]


def test_blend_entries_share_the_byte_budget(tiny_engine_factory):
    engine = tiny_engine_factory(TINY)
    _chat(engine, "t", [anywhere("x", X)])
    _wait_standalone(engine, "t", 1)
    budget = engine.tree.resident_bytes + engine.radix.resident_bytes
    small = tiny_engine_factory(CacheConfig(cache_bytes=budget // 2, blend_layer=0))
    for content in (X, Y, Z):
        _chat(small, "t", [anywhere("s", content)])
        time.sleep(0.3)
        assert small.tree.resident_bytes + small.radix.resident_bytes <= budget // 2
    small.tree.check_integrity()


# ---------------------------------------------------------------- real model
@pytest.fixture(scope="module")
def blend_engines(real_engine):
    """Engines over the real float32 runtime with blend ratios 1.0 and 0.0."""
    from segcache.engine.engine import Engine

    made = {r: Engine(real_engine.runtime, real_engine.tokenizer, CacheConfig(blend_ratio=r), "real")
            for r in (1.0, 0.0)}
    yield made
    for engine in made.values():
        engine.close(drain=False)


DOCS = {
    "json": "The json module encodes Python objects as JSON text and decodes JSON text "
            "into Python objects; dumps returns a string and loads parses one.",
    "csv": "The csv module reads and writes tabular data in comma separated values format; "
           "csv.reader iterates over rows and csv.writer writes them.",
    "gzip": "The gzip module compresses and decompresses files in the gzip format; "
            "gzip.open returns a file object like the built-in open.",
}
QUESTION = [{"role": "user", "content": "Which module parses comma separated values?"}]


def _docs(order: list[str]) -> list[SegmentInput]:
    return [SegmentInput(k, DOCS[k], reuse="anywhere") for k in order]


def test_real_model_ratio_one_matches_a_cold_prefill(blend_engines, real_engine):
    engine = blend_engines[1.0]
    engine.warm("t", _docs(["json", "csv", "gzip"]))
    moved = engine.chat(ChatRequest("t", QUESTION, _docs(["gzip", "json", "csv"]), GREEDY))
    assert [s.status for s in moved.segments if s.kind == "segment"] == ["blended"] * 3
    assert moved.recomputed_tokens == moved.blended_tokens  # ratio 1: everything recomputed
    cold = real_engine.chat(ChatRequest("blend-cold", QUESTION, [SegmentInput(k, DOCS[k])
                                        for k in ["gzip", "json", "csv"]], GREEDY))
    real_engine.purge("blend-cold")
    assert moved.token_ids == cold.token_ids
    assert moved.text.strip()


def test_real_model_zero_ratio_at_the_original_position_is_the_prefix_path(blend_engines,
                                                                           real_engine):
    """The first segment reused where it was computed (right behind the sink) with
    no recomputation: the same greedy tokens as the exact prefix path."""
    engine = blend_engines[0.0]
    engine.warm("z", _docs(["csv"]))
    engine.purge("z")  # drop the tree node and the entry; compute the entry alone again
    engine.warm("z", _docs(["csv"]))
    # keep only the standalone entry: drop the tree path so the walk misses
    ns = engine.namespace("z")
    engine.tree.purge(ns)
    r = engine.chat(ChatRequest("z", QUESTION, _docs(["csv"]), GREEDY))
    assert r.segments[0].status == "blended"
    assert r.segments[0].recomputed == len(engine.blender._sink)  # only its template lead
    exact = real_engine.chat(ChatRequest("z-exact", QUESTION, [SegmentInput("csv", DOCS["csv"])],
                                         GREEDY))
    real_engine.purge("z-exact")
    assert r.token_ids == exact.token_ids


# ---------------------------------------------------------------- HTTP, real model
def test_http_blend_usage_streaming_metrics_and_isolation(real_engine):
    """Through uvicorn and the openai client: a marked segment sent again at
    another position is blended; usage (JSON and the final SSE chunk), /v1/cache
    and /metrics say so; another API key's tenant never gets it."""
    import json as _json

    import httpx
    from openai import OpenAI

    from segcache.config import ServerConfig
    from segcache.engine.engine import Engine
    from tests.server_harness import running_server

    engine = Engine(real_engine.runtime, real_engine.tokenizer, CacheConfig(), "real")
    keys = {"keys": {"key-a": "alice", "key-b": "bob"}, "admin_keys": ["key-ops"]}
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        _json.dump(keys, f)
    try:
        with running_server(engine, ServerConfig(api_keys_file=f.name)) as url:
            alice = OpenAI(base_url=url + "/v1", api_key="key-a", max_retries=0)
            bob = OpenAI(base_url=url + "/v1", api_key="key-b", max_retries=0)
            docs = [{"id": k, "content": v, "reuse": "anywhere"} for k, v in DOCS.items()]
            warm = httpx.post(url + "/v1/cache/warm", json={"segments": docs},
                              headers={"Authorization": "Bearer key-a"}, timeout=120)
            assert warm.status_code == 200, warm.text
            moved = [docs[2], docs[0], docs[1]]

            def ask(client, stream=False):
                return client.chat.completions.create(
                    model="real", messages=QUESTION, max_tokens=6, temperature=0, stream=stream,
                    stream_options={"include_usage": True} if stream else None,
                    extra_body={"segments": moved})

            r = ask(alice)
            ext = r.usage.model_extra
            statuses = [s["status"] for s in ext["segcache"]["segments"] if s["kind"] == "segment"]
            assert statuses == ["blended"] * 3
            assert ext["cached_prefix_tokens"] == 0
            blended = ext["segcache"]["blended_tokens"]
            assert blended == sum(s["tokens"] for s in ext["segcache"]["segments"]
                                  if s["status"] == "blended")
            assert 0 < ext["segcache"]["recomputed_tokens"] < blended
            chunks = list(ask(alice, stream=True))
            final = [c for c in chunks if c.usage is not None][-1]
            assert final.usage.model_extra["segcache"]["blended_tokens"] == blended
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text == r.choices[0].message.content
            rb = ask(bob)
            assert rb.usage.model_extra["segcache"]["blended_tokens"] == 0
            stats = httpx.get(url + "/v1/cache", headers={"Authorization": "Bearer key-a"}).json()
            assert stats["standalone"]["entries"] == 3
            metrics = httpx.get(url + "/metrics", headers={"Authorization": "Bearer key-ops"}).text
            line = next(x for x in metrics.splitlines()
                        if x.startswith("segcache_blended_tokens_total"))
            assert float(line.split()[-1]) == 2 * blended
            bad = httpx.post(url + "/v1/chat/completions", headers={"Authorization": "Bearer key-a"},
                             json={"messages": QUESTION,
                                   "segments": [{"id": "x", "content": "y", "reuse": "everywhere"}]})
            assert bad.status_code == 400 and "reuse" in bad.text
    finally:
        engine.close(drain=False)
        Path(f.name).unlink()


def test_cancelled_blend_releases_every_pin(tiny_engine_factory):
    engine = tiny_engine_factory(TINY)
    engine.warm("t", [anywhere("x", X)])
    calls = {"n": 0}

    def cancelled() -> bool:  # the client goes away right after the first token
        calls["n"] += 1
        return calls["n"] > 1

    req = ChatRequest("t", USER, [SegmentInput("y", Y), anywhere("x", X)],
                      SamplingParams(max_tokens=20, temperature=0.0))
    r = engine.chat(req, is_cancelled=cancelled)
    assert r.finish_reason == "cancelled"
    engine.tree.check_integrity()
    assert all(n.pins == 0 for n in engine.tree.nodes())
    # the standalone entry is still there and serves the next request
    again = _chat(engine, "t", [SegmentInput("z", Z), anywhere("x", X)])
    assert [s.status for s in again.segments][:2] == ["miss", "blended"]


def test_a_queued_standalone_job_is_not_waited_for(tiny_engine_factory):
    """A request must not wait for a standalone entry whose job is still queued
    (it could be queued behind the request itself on a full engine): the segment
    is then computed in place."""
    import threading

    engine = tiny_engine_factory(TINY)
    ns_s = engine.blender.standalone_namespace(engine.namespace("t"))
    from segcache.kv.hashing import segment_digest

    engine._inflight[("standalone:" + ns_s, segment_digest(X))] = 10**9  # no such job runs
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault(
        "r", _chat(engine, "t", [SegmentInput("y", Y), anywhere("x", X)])))
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the request waited for a job that never runs"
    assert [s.status for s in out["r"].segments][:2] == ["miss", "miss"]


def test_blend_runs_layer_by_layer_while_streams_decode(tiny_engine_factory):
    """While another request decodes, a blend runs a layer per tick (decode steps in
    between) and gives what it gives on an idle engine."""
    import threading

    from segcache.config import SchedulerConfig

    def engine_with_entry(pause_s: float):
        engine = tiny_engine_factory(TINY, scheduler=SchedulerConfig(decode_pause_s=pause_s))
        engine.warm("t", [anywhere("x", X)])
        return engine

    idle = engine_with_entry(1e9)
    want = _chat(idle, "t", [SegmentInput("y", Y), anywhere("x", X)])
    busy = engine_with_entry(1e-9)
    calls: list[tuple[bool, int]] = []
    runner = busy.scheduler.runner
    orig = runner.prefill

    def record(work, n, pause_s=None):
        orig(work, n, pause_s)
        if type(work).__name__ == "BlendWork":
            calls.append((work.slices is not None, busy.scheduler.steps))

    runner.prefill = record
    stream = threading.Thread(target=busy.chat, args=(ChatRequest(
        "s", [{"role": "user", "content": "Count."}], sampling=SamplingParams(max_tokens=1500,
                                                                            temperature=0.0)),))
    stream.start()
    while busy.scheduler.steps == 0:
        time.sleep(0.001)
    got = _chat(busy, "t", [SegmentInput("y", Y), anywhere("x", X)])
    stream.join()
    n_layers = busy.runtime.arch.n_layers
    assert len(calls) == n_layers and [mid for mid, _ in calls] == [True] * (n_layers - 1) + [False]
    assert len({steps for _, steps in calls}) == n_layers  # a decode step between layers
    assert got.token_ids == want.token_ids
    assert [s.as_dict() for s in got.segments] == [s.as_dict() for s in want.segments]
    busy.tree.check_integrity()


def test_the_first_move_blends_at_once(tiny_engine_factory):
    """Issue 16: a block used just before and moved now is blended from the KV the
    first request computed (keys un-rotated as it ends), with no background job."""
    engine = tiny_engine_factory(TINY)
    engine.blender.schedule = lambda *a, **k: None  # no background job at all
    _chat(engine, "t", [anywhere("x", X), anywhere("y", Y)])
    assert engine.cache_stats("t")["standalone"]["entries"] == 2
    r = _chat(engine, "t", [SegmentInput("z", Z), anywhere("y", Y), anywhere("x", X)])
    status = {s.id: s.status for s in r.segments}
    assert status == {"z": "miss", "y": "blended", "x": "blended", "messages[0]": "miss"}
    # the derived entry is the first request's KV, keys un-rotated: placed back at its
    # first position it is exactly that KV
    ns_s = engine.blender.standalone_namespace(engine.namespace("t"))
    x_entry = engine.tree.peek(ns_s, [r.segments[2].hash])[0]
    x_node = engine.tree.peek(engine.namespace("t"), [r.segments[2].hash])[0]
    kv = engine.runtime.new_kv(x_node.n_tokens)
    lead = x_node.n_tokens - x_entry.n_tokens
    engine.runtime.place_keys(kv[:, :, :, :], x_entry.handle, lead)
    assert torch.allclose(kv[:, :, :, lead:x_node.n_tokens], x_node.handle[:, :, :, lead:], atol=1e-5)
    engine.tree.check_integrity()


REPO_TEMPLATE = """You are an AI documentation assistant. Write the documentation of the object below.

The path of the document is {path}. The project is segcache.

The code of the object:

```python
{code}
```

It calls these objects, whose code is:

{refs}

Write the documentation in English."""

FUNCS = {name: f'''def {name}(items, key=None):
    """{name}: walk the items and keep what the key selects."""
    out = []
    for item in items:
        if key is None or key(item):
            out.append(item)
    # {name} keeps the order of the input and never copies an item
    return out
''' for name in ("select", "gather", "pick_all", "keep_some")}


def repo_prompt(path: str, code: str, refs: list[str]) -> list[dict]:
    blocks = "\n\n".join(f"```python\n{FUNCS[r]}```" for r in refs)
    return [{"role": "user", "content": REPO_TEMPLATE.format(path=path, code=FUNCS[code], refs=blocks)}]


def test_plain_prompt_blocks_that_move_are_blended_with_blend_auto(tiny_engine_factory):
    """Issue 16: a RepoAgent-style plain prompt (no segments): with --blend auto its
    text is cut into content-defined chunks, and the reference blocks that moved
    (after another path, in another order) are blended, not recomputed."""
    engine = tiny_engine_factory(CacheConfig(blend="auto", blend_layer=0))
    first = engine.chat(ChatRequest("t", repo_prompt("a/x.py", "select", ["gather", "pick_all"]),
                                    sampling=GREEDY))
    assert {u.kind for u in first.segments} == {"chunk"}
    assert all(u.id.startswith("messages[0].chunks[") for u in first.segments)
    r = engine.chat(ChatRequest("t", repo_prompt("b/longer/path/y.py", "keep_some",
                                                 ["pick_all", "gather"]), sampling=GREEDY))
    by_status: dict[str, int] = {}
    for u in r.segments:
        by_status[u.status] = by_status.get(u.status, 0) + u.tokens
    assert by_status.get("blended", 0) >= 0.4 * r.prompt_tokens, by_status
    assert r.usage()["segcache"]["blended_tokens"] == by_status["blended"]
    # the same prompt with blending off: nothing but the template's head is reused
    off = tiny_engine_factory(CacheConfig(blend="off"))
    off.chat(ChatRequest("t", repo_prompt("a/x.py", "select", ["gather", "pick_all"]), sampling=GREEDY))
    plain = off.chat(ChatRequest("t", repo_prompt("b/longer/path/y.py", "keep_some",
                                                  ["pick_all", "gather"]), sampling=GREEDY))
    assert plain.cached_tokens < 0.2 * plain.prompt_tokens
    engine.tree.check_integrity()


@pytest.mark.slow
def test_real_model_repoagent_plain_prompts_blend_moved_code(real_engine):
    """Issue 16 on the real model: RepoAgent's own template as plain text (the bench's
    repo-docs workload, flat), no marks, --blend auto: code blocks seen before are
    blended where they now stand (gradual filtering, the default), the fixed
    instruction at the head is a prefix hit, and the first answer token agrees with a
    full prefill's (what scripts/blend_eval.py measures as top-1 agreement)."""
    from segcache.bench.runner import request_body
    from segcache.bench.workloads import WorkloadOptions, repo_docs
    from segcache.engine.engine import Engine

    def engine_with(blend):
        return Engine(real_engine.runtime, real_engine.tokenizer, CacheConfig(blend=blend),
                      real_engine.model_name)

    warm = engine_with("auto")
    requests = repo_docs(WorkloadOptions(objects=4, code_tokens=120))
    agree = blended = prompt = 0
    try:
        for i, req in enumerate(requests):
            messages, _ = request_body(req, "flat")
            sampling = SamplingParams(max_tokens=1, temperature=0.0)
            r = warm.chat(ChatRequest("t", messages, [], sampling))
            assert {u.kind for u in r.segments} <= {"chunk", "message"}
            if i == 0:
                continue
            # The fixed instruction heads every prompt as a chunk of its own (chunking
            # rule 4): an exact prefix hit, although the object named after it is new.
            assert r.segments[0].status == "hit" and r.cached_tokens == r.segments[0].tokens > 0
            cold = engine_with("auto")
            c = cold.chat(ChatRequest("t", messages, [], sampling))
            cold.close(drain=False)
            assert c.prompt_tokens == r.prompt_tokens
            blended += r.blended_tokens
            prompt += r.prompt_tokens
            agree += r.token_ids == c.token_ids
    finally:
        warm.close(drain=False)
    assert blended >= 0.3 * prompt, (blended, prompt)
    assert agree >= len(requests) - 2, agree  # the first token, as a full prefill's


def test_an_empty_message_under_blend_auto_keeps_its_template_in_its_own_unit(tiny_engine_factory):
    """Its template text must be keyed: [S, "", Q] and [S, Q] are other tokens, so the
    second must not hit the first's chain."""
    engine = tiny_engine_factory(CacheConfig(blend="auto", blend_layer=0))
    system = {"role": "system", "content": "Rules."}
    a = engine.chat(ChatRequest("t", [system, {"role": "user", "content": ""},
                                      {"role": "user", "content": "Q"}], sampling=GREEDY))
    b = engine.chat(ChatRequest("t", [system, {"role": "user", "content": "Q"}], sampling=GREEDY))
    assert len(a.segments) == 3 and a.chain != b.chain
    assert b.segments[1].status != "hit"
    cold = tiny_engine_factory(CacheConfig(blend="auto", blend_layer=0))
    assert cold.chat(ChatRequest("t", [system, {"role": "user", "content": "Q"}],
                                 sampling=GREEDY)).token_ids == b.token_ids
