"""Routing policies and the simulator (segcache.deploy): exact figures on a small
fixed trace (worked out by hand below), the bounded-load spill rule, consistent
hashing on a cold fleet, and chain digests equal to the engine tree's."""

from __future__ import annotations

import json
import time

import pytest

from segcache.cli import main
from segcache.deploy.chain import RouteKey, request_chain, simulated_namespace
from segcache.deploy.routing import (
    PrefixPolicy,
    RayPrefixPolicy,
    ReplicaView,
    make_policy,
    rendezvous_order,
)
from segcache.deploy.simulate import LruChainCache, simulate

A, B, C = "a" * 100, "b" * 50, "c" * 50


def body(segments: list[str], question: str, max_tokens: int = 10) -> dict:
    return {"segments": [{"id": f"s{i}", "content": c} for i, c in enumerate(segments)],
            "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens}


def keys(bodies: list[dict]) -> list[RouteKey]:
    # 1 char = 1 token, so every figure below is a character count.
    return [request_chain(b, simulated_namespace(), chars_per_token=1) for b in bodies]


# A+B, A+C, A+B, A+C; each prompt 100 + 50 + 2 = 152 tokens, decode budget 10.
TRACE = keys([body([A, B], "x1"), body([A, C], "x2"), body([A, B], "x3"), body([A, C], "x4")])


def test_route_key_counts_units_and_budget():
    k = TRACE[0]
    assert k.tokens == (100, 50, 2) and k.prompt_tokens == 152 and k.decode_tokens == 10
    assert TRACE[2].chain[:2] == k.chain[:2] and TRACE[2].chain[2] != k.chain[2]
    assert TRACE[1].chain[0] == k.chain[0] and TRACE[1].chain[1] != k.chain[1]


def test_simulator_figures_with_generous_slack_keep_everything_home():
    """Defaults: nothing is ever over the bound, so all four requests go to the
    rendezvous home of A. Hits: 0, 100 (A), 150 (A+B), 150 (A+C) = 400 of 608; the home
    computes 152+10, 52+10, 2+10, 2+10 = 248 tokens, the other replica nothing."""
    r = simulate(TRACE, 2, "prefix")
    home = int(rendezvous_order(TRACE[0].first, ["r0", "r1"])[0][1])
    assert (r.hit_tokens, r.prompt_tokens) == (400, 608)
    assert r.work[home] == 248 and r.work[1 - home] == 0
    assert r.max_mean_load == pytest.approx(2.0)
    assert r.single_hit_rate == pytest.approx(400 / 608) and r.hit_rate_vs_single == pytest.approx(1.0)


def test_overload_spills_by_the_documented_rule():
    """Balance 1.25: request 2 (A+C) costs its owner 52+10 = 62 on top of 162, and 224 <=
    1.25 * 224 / 2 + 512 fits; with slack 0 it still fits, 224 <= 140 + 100 (the 100 tokens of
    A the owner holds: a spill would recompute them). Balance 1, slack 0 and no cold-start
    rule (idle_factor 0): 224 > 224 / 2 + 100 = 212, so it goes to the idle
    replica (cost 162). Request 3 (A+B) costs the home 12: 174 <= 336 / 2 + 150 fits;
    request 4 (A+C) goes to the other, which holds A+C (150 tokens, more than the home's
    100): 174 <= 348 / 2 + 150. Hits 0 + 0 + 150 + 150 = 300; work 174 each."""
    for slack in (512, 0):
        r = simulate(TRACE, 2, "prefix", balance=1.25, slack_tokens=slack)
        assert (r.hit_tokens, sorted(r.work)) == (400, [0, 248])
    r = simulate(TRACE, 2, "prefix", balance=1.0, slack_tokens=0, idle_factor=0)
    assert r.hit_tokens == 300 and r.work == [174, 174] and r.max_mean_load == pytest.approx(1.0)
    assert r.hit_rate_vs_single == pytest.approx(300 / 400)


def test_a_holder_may_run_over_the_bound_by_what_a_spill_would_recompute():
    """A+B+x: prompt 151, decode 10. The owner holds A+B (150 tokens), so the request costs
    it 11; the other replica (load 100, not idle: no cold-start rule) would pay 161. Slack 0:
    the owner fits while L + 11 <= 1.25 * (L + 100 + 11) / 2 + 150, i.e. L <= 555.67 (without
    the 150, L <= 155.67). At L = 556 the other takes it: 261 <= 1.25 * 817 / 2."""
    k = keys([body([A, B], "x")])[0]
    policy = PrefixPolicy(balance=1.25, slack_tokens=0)

    def first(owner_load: int) -> str:
        return policy.rank(k, [ReplicaView("owner", set(k.chain[:2]), owner_load),
                               ReplicaView("other", set(), 100)])[0]

    assert first(156) == first(555) == "owner"
    assert first(556) == "other"


def test_cold_start_keeps_a_shared_prefix_home_while_a_replica_is_idle():
    """Four replicas, three idle. P+x: prompt 100 + 31 + 1 = 132, decode 10, cold 142. The home
    holds P (100 tokens): the request costs it 42. With load L the balanced bound (slack 0)
    is 1.25 * (L + 42) / 4 + 100, so L <= 103 fits; the cold-start rule (an idle replica holds
    none of it) lets the home take it while L + 42 <= 2 * 142, i.e. L <= 242. Once no replica
    is idle (the others at load 10) the balanced bound alone decides: 1.25 * (L + 72) / 4 + 100."""
    k = keys([body(["p" * 100, "x" * 31], "a")])[0]
    assert (k.prompt_tokens, k.decode_tokens) == (132, 10)
    policy = PrefixPolicy(balance=1.25, slack_tokens=0, idle_factor=2)
    ids = ["home", "c1", "c2", "c3"]

    def first(home_load: int, others: int = 0, pol: PrefixPolicy = policy) -> str:
        views = [ReplicaView("home", {k.chain[0]}, home_load)] + [ReplicaView(r, set(), others) for r in ids[1:]]
        return pol.rank(k, views)[0]

    next_in_ring = [r for r in rendezvous_order(k.first, ids) if r != "home"][0]
    assert first(103) == first(242) == "home"
    assert first(243) == next_in_ring
    assert first(104, pol=PrefixPolicy(balance=1.25, slack_tokens=0, idle_factor=0)) == next_in_ring
    assert first(104, others=10) == "home"  # 146 <= 1.25 * 176 / 4 + 100 = 155
    assert first(200, others=10) == next_in_ring  # 242 > 1.25 * 272 / 4 + 100 = 185; no one idle


def test_a_new_first_segment_goes_to_the_least_loaded_replica_that_fits():
    """Nobody holds the request (cold 161): the idle replica fits, one at load 50 fits too
    (211 <= 1.25 * (350 + 161) / 3 + 0 = 212.9), one at 300 does not. Least load first,
    whatever the hash order says; the hash order only breaks ties."""
    k = keys([body([A, B], "x")])[0]
    ring = rendezvous_order(k.first, ["r0", "r1", "r2"])
    load = {ring[0]: 50, ring[1]: 300, ring[2]: 0}
    views = [ReplicaView(rid, set(), load[rid]) for rid in ring]
    assert PrefixPolicy(balance=1.25, slack_tokens=0).rank(k, views) == [ring[2], ring[0], ring[1]]
    assert PrefixPolicy().rank(k, [ReplicaView(rid) for rid in ring]) == ring  # all idle: hash order


# Two teams, each: a shared 100-token block, a 31-token agent block, a 1-token question.
P0, P1, X = "p" * 100, "q" * 100, "x" * 30
TEAMS = keys([body([P0, X + "0"], "a"), body([P0, X + "1"], "b"), body([P1, X + "2"], "c"),
              body([P1, X + "3"], "d")])


def test_two_teams_whose_first_segments_hash_to_one_replica_get_one_replica_each():
    """Both first segments rank r1 first. Request a: all idle, hash order: r1 (142). b: r1
    holds P0 (cost 42): 184 <= 1.25 * 184 / 2 + 512 + 100. c: nobody holds P1; r0 is idle,
    r1 fits too (326 <= 1.25 * 326 / 2 + 512), least load: r0. d: r0 holds P1. Hits 100 + 100,
    work 184 each. (The rule before 2026-12-02, first fit in hash order, sent all four to r1:
    work [0, 368]; with slack 0 it spread team P0 on both replicas: 0 hits.)"""
    assert rendezvous_order(TEAMS[0].first, ["r0", "r1"])[0] == "r1"
    assert rendezvous_order(TEAMS[2].first, ["r0", "r1"])[0] == "r1"
    for slack in (512, 0):
        r = simulate(TEAMS, 2, "prefix", slack_tokens=slack)
        assert (r.hit_tokens, r.prompt_tokens, r.work) == (200, 528, [184, 184])
        assert r.hit_rate_vs_single == pytest.approx(1.0)


def test_cold_start_rule_on_a_fixed_trace():
    """Four replicas, slack 0: three requests of team P (cold 142), then three teams with one
    request each (cold 141, first segments hashed to r2, r1, r3). Team P's home r1 keeps its
    second and third requests by the cold-start rule (184, 226 <= 2 * 142) while the others
    are idle, and the three new teams take one idle replica each: hits 200, work
    [141, 226, 141, 141]. Without the rule (idle_factor 0) P's second request spills to an
    idle replica, which the last team then lacks: hits 100, work [141, 184, 142, 282]."""
    trace = keys([body([P0, X + "0"], "a"), body([P0, X + "1"], "b"), body([P0, X + "2"], "c"),
                  body(["s" * 100, X], "d"), body(["t" * 100, X], "e"), body(["u" * 100, X], "f")])
    r = simulate(trace, 4, "prefix", slack_tokens=0)
    assert (r.hit_tokens, r.work) == (200, [141, 226, 141, 141])
    r = simulate(trace, 4, "prefix", slack_tokens=0, idle_factor=0)
    assert (r.hit_tokens, r.work) == (100, [141, 184, 142, 282])


def test_prefix_meets_the_scale_out_target_on_the_bench_workloads(tmp_path, capsys):
    """Issue 18's target: 8 teams of each workload over 4 and 8 replicas, ``prefix`` keeps >= 90%
    of the hit rate of one replica with the whole cache at max/mean load <= 1.25 (fan-out on 8
    replicas was 83.9% before the cold-start and least-load rules)."""
    out = tmp_path / "sim.json"
    assert main(["route", "simulate", "multi-agent,agent-loop,fan-out", "--replicas", "4,8", "--policy",
                 "prefix", "--copies", "8", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["idle_factor"] == 2.0 and len(data["results"]) == 6
    for r in data["results"]:
        assert r["hit_rate_vs_single"] >= 0.9 and r["max_mean_load"] <= 1.25, r


def test_baselines_on_the_fixed_trace():
    # round-robin: r0, r1, r0 (A+B warm), r1 (A+C warm) -> 300; least-load goes the same way.
    for policy in ("round-robin", "least-load"):
        r = simulate(TRACE, 2, policy)
        assert (r.hit_tokens, r.work) == (300, [174, 174]), policy
    # ray-prefix: request 1 goes to r0 (fewest characters, lowest id); every later one matches
    # r0's history by >= 10% of its text, so all go there (imbalanced_threshold = inf).
    r = simulate(TRACE, 2, "ray-prefix")
    assert (r.hit_tokens, r.work) == (400, [248, 0])


def test_lru_cache_model_evicts_least_recent_chains():
    cache = LruChainCache(capacity=160)
    assert cache.serve(TRACE[0]) == 0  # holds A, B, x1: 152 tokens
    assert cache.serve(TRACE[1]) == 100  # A hit; adds C, x2 (204): evicts x1, then B
    assert TRACE[0].chain[1] not in cache and TRACE[0].chain[0] in cache
    assert cache.tokens == 152
    assert cache.serve(TRACE[2]) == 100  # B was evicted: only A hits
    # the same replay through the simulator: capacity 160 on one replica
    r = simulate(TRACE, 1, "prefix", cache_tokens=160)
    assert r.hit_tokens == 100 + 100 + 100


def test_cold_fleet_spreads_by_consistent_hash():
    ids = [f"r{i}" for i in range(4)]
    policy = make_policy("prefix")
    firsts = [f"first segment {i} " * 20 for i in range(40)]
    placed = {}
    for i, first in enumerate(firsts):
        k = keys([body([first, B], f"q{i}")])[0]
        choice = policy.rank(k, [ReplicaView(rid) for rid in ids])[0]
        assert choice == rendezvous_order(k.first, ids)[0]
        placed[first] = choice
    assert set(placed.values()) == set(ids)  # spread, not piled on one replica
    # same first segment, different rest: same home
    k2 = keys([body([firsts[0], C], "other")])[0]
    assert policy.rank(k2, [ReplicaView(rid) for rid in ids])[0] == placed[firsts[0]]


def test_owner_overloaded_goes_to_another_holder_then_to_the_ring():
    k = keys([body([A, B], "x")])[0]
    policy = PrefixPolicy(balance=1.25, slack_tokens=0)
    full, partial = set(k.chain[:2]), {k.chain[0]}
    views = [ReplicaView("owner", full, 1000), ReplicaView("holder", partial, 100),
             ReplicaView("cold1", set(), 100), ReplicaView("cold2", set(), 100)]
    assert policy.rank(k, views)[0] == "holder"  # owner over 1.25 x mean; holder has A
    views[1].load = 1000
    ring = [rid for rid in rendezvous_order(k.first, ["owner", "holder", "cold1", "cold2"])
            if rid.startswith("cold")]
    assert policy.rank(k, views)[0] == ring[0]  # no holder fits: consistent hash on A
    views[0].load = 0
    assert policy.rank(k, views)[0] == "owner"  # owner no longer overloaded
    assert sorted(policy.rank(k, views)) == ["cold1", "cold2", "holder", "owner"]


def test_ray_prefix_falls_back_to_the_smallest_tree_below_the_match_threshold():
    policy = RayPrefixPolicy()
    views = [ReplicaView("r0"), ReplicaView("r1")]
    k1, k2 = keys([body([A], "x"), body([B], "y")])
    policy.on_sent(k1, "r0")
    assert policy.rank(keys([body([A, C], "z")])[0], views)[0] == "r0"  # match 96/152 >= 10%
    assert policy.rank(k2, views)[0] == "r1"  # no match: fewest characters


def test_chain_digests_are_the_engine_tree_chains(tiny_engine_factory):
    from segcache.engine.types import ChatRequest, SamplingParams, SegmentInput

    engine = tiny_engine_factory()
    b = {"segments": [{"id": "g", "content": "Global rules. " * 5}, {"id": "t", "content": "Task."}],
         "messages": [{"role": "user", "content": "Hi"}],
         "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}
    engine.chat(ChatRequest("default", b["messages"], [SegmentInput(**s) for s in b["segments"]],
                            SamplingParams(max_tokens=2, temperature=0), tools=b["tools"]))
    k = request_chain(b, engine.namespace("default"))
    assert len(k.chain) == 4  # two segments, the tools block, one message
    assert all(engine.tree.get_by_chain(c) is not None for c in k.chain)
    # a leading system message comes before the tools block; named replies keep their key
    b2 = {"messages": [{"role": "system", "content": "Rules."}, {"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": "Hello.", "name": "bot"},
                       {"role": "user", "content": "Go on."}], "tools": b["tools"]}
    engine.chat(ChatRequest("default", b2["messages"], [], SamplingParams(max_tokens=2, temperature=0),
                            tools=b2["tools"]))
    k2 = request_chain(b2, engine.namespace("default"))
    assert len(k2.chain) == 5 and all(engine.tree.get_by_chain(c) is not None for c in k2.chain)


def test_chain_digests_follow_the_chunks_of_blend_auto(tiny_engine_factory):
    from segcache.config import CacheConfig
    from segcache.engine.types import ChatRequest, SamplingParams

    engine = tiny_engine_factory(CacheConfig(blend="auto", blend_layer=0))
    text = "\n\n".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(6)) + "\n\nExplain."
    messages = [{"role": "user", "content": text}]
    engine.chat(ChatRequest("default", messages, [], SamplingParams(max_tokens=2, temperature=0)))
    k = request_chain({"messages": messages}, engine.namespace("default"), chunks=True)
    assert len(k.chain) > 1 and all(engine.tree.get_by_chain(c) is not None for c in k.chain)


def test_route_simulate_cli_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "sim.json"
    assert main(["route", "simulate", "multi-agent,fan-out", "--replicas", "2,3", "--policy",
                 "prefix,round-robin,least-load,ray-prefix", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "hit rate" in text and "ray-prefix" in text and "max/mean" in text and "fan-out" in text
    data = json.loads(out.read_text())
    assert len(data["results"]) == 16
    assert {r["policy"] for r in data["results"]} == {"prefix", "round-robin", "least-load", "ray-prefix"}
    assert {r["trace"]: r["requests"] for r in data["results"]} == {"multi-agent": 9, "fan-out": 8}
    # one replica with the whole cache is the same reference for every policy of a trace
    assert len({(r["trace"], r["replicas"], r["single_hit_rate"]) for r in data["results"]}) == 4


def test_route_simulate_reads_a_request_log(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps({"tenant": "t", "request": b, "response": "ok"})
                             for b in (body([A, B], "1"), body([A, B], "2"))) + "\nnot json\n")
    assert main(["route", "simulate", str(log), "--replicas", "2", "--chars-per-token", "1",
                 "--json", str(tmp_path / "o.json")]) == 0
    r = json.loads((tmp_path / "o.json").read_text())["results"][0]
    assert (r["requests"], r["prompt_tokens"], r["hit_tokens"]) == (2, 302, 150)


def test_route_simulate_refuses_an_unknown_trace(capsys):
    assert main(["route", "simulate", "no-such-workload"]) == 2
    assert "TRACE must be a workload" in capsys.readouterr().err


def test_route_simulate_refuses_a_negative_idle_factor(capsys):
    assert main(["route", "simulate", "fan-out", "--idle-factor", "-1"]) == 2
    assert "idle_factor must be >= 0, got -1.0" in capsys.readouterr().err


def test_ray_app_builder_checks_its_arguments():
    from segcache.deploy.ray_app import app_builder

    app = app_builder({"replicas": "2", "routing": "least-load", "cpus_per_replica": "0.5"})
    assert app is not None
    with pytest.raises(ValueError, match="routing policy must be one of"):
        app_builder({"routing": "random"})
    with pytest.raises(ValueError, match="unknown arguments"):
        app_builder({"replica": "2"})


class _Replica:
    def __init__(self, rid: str, warm=(), load: int = 0):
        from types import SimpleNamespace

        self.replica_id = SimpleNamespace(unique_id=rid)
        self.routing_stats = {"warm": list(warm), "load": load}


def _pending(key: RouteKey):
    from types import SimpleNamespace

    return SimpleNamespace(kwargs={"route": key.to_kwargs()}, routing_context=SimpleNamespace(should_backoff=False))


def test_ray_router_ranks_every_replica_backs_off_and_remembers_what_it_sent():
    """SegmentRouter (the Ray Serve router) without a cluster: reported warm chains pick the
    replica; a request it just sent counts as warm (and as load) before the next report."""
    import asyncio

    from segcache.deploy.ray_router import SegmentRouter

    router = SegmentRouter.__new__(SegmentRouter)  # the policy state only: no Ray controller
    router.initialize_state(policy="prefix")
    k1, k2 = keys([body([A, B], "x1"), body([A, B], "x2")])
    replicas = [_Replica("r0"), _Replica("r1", warm=k1.chain[:1])]  # r1 reports A warm
    pending = _pending(k1)
    ranks = asyncio.run(router.choose_replicas(replicas, pending))
    assert [[r.replica_id.unique_id for r in rank] for rank in ranks] == [["r1"], ["r0"]]
    assert pending.routing_context.should_backoff  # all full: Ray backs off, not spins
    # send k1 to r0 instead (say r1 was full): r0 now holds A+B+x1 as far as the router knows
    router.on_request_routed(pending, replicas[0].replica_id, None)
    ranks = asyncio.run(router.choose_replicas(replicas, _pending(k2)))
    assert ranks[0][0].replica_id.unique_id == "r0"  # longest chain: A+B on r0 beats A on r1
    assert router._view(replicas[0], time.monotonic()).load == k1.prompt_tokens + k1.decode_tokens


def test_a_sent_request_stops_counting_once_a_later_report_covers_it():
    """A sequential client: the request sent before has finished and two reports came
    since; it must not count as load any more (it sent the next request away from its
    warm replica in a real 2-replica run)."""
    from segcache.deploy.ray_router import SegmentRouter

    router = SegmentRouter.__new__(SegmentRouter)
    router.initialize_state(policy="prefix")
    k1, k2 = keys([body([A, B], "x1"), body([A, B], "x2")])
    r0 = _Replica("r0")
    r0.routing_stats["seq"] = 5
    router._view(r0, time.monotonic())  # the router has seen report 5
    router.on_request_routed(_pending(k1), r0.replica_id, None)
    assert router._view(r0, time.monotonic()).load == k1.prompt_tokens + k1.decode_tokens
    r0.routing_stats = {"warm": list(k1.chain), "load": 0, "seq": 6}  # may predate the request
    assert router._view(r0, time.monotonic()).load > 0
    r0.routing_stats = {"warm": list(k1.chain), "load": 0, "seq": 7}  # computed after it
    assert router._view(r0, time.monotonic()).load == 0
    assert set(k1.chain) <= router._view(r0, time.monotonic()).warm


def test_a_sent_request_counts_only_what_it_costs_that_replica():
    """Load is tokens to compute: a request whose prefix is warm on the replica it was sent
    to adds its new tokens and decode budget, not its whole prompt."""
    import asyncio

    from segcache.deploy.ray_router import SegmentRouter

    router = SegmentRouter.__new__(SegmentRouter)
    router.initialize_state(policy="prefix")
    k1, k2 = keys([body([A, B], "x1"), body([A, B], "x2")])
    r0 = _Replica("r0", warm=k1.chain)
    pending = _pending(k2)
    asyncio.run(router.choose_replicas([r0], pending))
    router.on_request_routed(pending, r0.replica_id, None)
    warm = sum(n for c, n in zip(k2.chain, k2.tokens, strict=True) if c in set(k1.chain))
    assert warm > 0
    assert router._view(r0, time.monotonic()).load == k2.prompt_tokens - warm + k2.decode_tokens
