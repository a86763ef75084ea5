"""The cache tiers through the HTTP API and the command line.

Fast tests run the tiny model in-process under a real uvicorn server; the
``slow`` ones run real ``segcache serve`` processes on the real model in float32
(restart, kill -9, fingerprint changes) and two of them sharing a real redis-server.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from segcache.cli import _config, build_parser
from segcache.config import CacheConfig, ServerConfig
from segcache.engine.types import ChatRequest, SamplingParams, SegmentInput
from segcache.kv.tiers import DiskTier
from tests import test_dashboard as dashboard
from tests.serve_process import ServeProcess
from tests.server_harness import running_server

chromium = dashboard.chromium  # the browser tests' fixture (skips without Chromium, fails under CI)

USER = [{"role": "user", "content": "Which rule matters most? Answer in one line."}]
RULES = "Global rules: answer in English, cite files, never invent APIs. " * 12
BACKEND = "Backend agent: Python, SQL, migrations, pytest. " * 6
FRONTEND = "Frontend agent: TypeScript, React, CSS, accessibility. " * 6
TASK_D = "Task: refactor the auth module into two files."
TASK_E = "Task: write docs for the login page."


def seg(i: str, content: str) -> dict:
    return {"id": i, "content": content}


# Seed 000's three agents: A+B+D, A+C+E, A+B+E.
AGENTS = [[seg("A", RULES), seg("B", BACKEND), seg("D", TASK_D)],
          [seg("A", RULES), seg("C", FRONTEND), seg("E", TASK_E)],
          [seg("A", RULES), seg("B", BACKEND), seg("E", TASK_E)]]


def ask(url: str, segments: list[dict], key: str = "x", max_tokens: int = 8) -> dict:
    """One greedy chat over plain HTTP (to the model the server serves); returns the JSON
    (asserting a 200)."""
    auth = {"Authorization": f"Bearer {key}"}
    model = httpx.get(url + "/v1/models", headers=auth).json()["data"][0]["id"]
    r = httpx.post(url + "/v1/chat/completions", timeout=600, headers=auth,
                   json={"model": model, "messages": USER, "segments": segments, "max_tokens": max_tokens,
                         "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


def seg_tiers(body: dict) -> list[str | None]:
    return [s["tier"] for s in body["usage"]["segcache"]["segments"] if s["kind"] == "segment"]


def text(body: dict) -> str:
    return body["choices"][0]["message"]["content"]


def metric_samples(url: str, key: str = "x") -> dict[tuple[str, tuple], float]:
    out = {}
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {key}"}).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def tier_stats(url: str, key: str = "x") -> dict:
    return httpx.get(url + "/v1/cache", headers={"Authorization": f"Bearer {key}"}).json()["tiers"]


def settle(url: str, key: str = "x", timeout_s: float = 120.0) -> None:
    """Wait until the server's write-through to every tier has landed (or been dropped)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        t = tier_stats(url, key)
        written = {name: s["puts"] + s["dropped"] + s["errors"] for name, s in t.items() if name != "store"}
        if all(n >= t["store"]["publishes"] - t["store"]["dropped"] for n in written.values()):
            return
        time.sleep(0.1)
    raise AssertionError(f"tier writes did not land: {tier_stats(url, key)}")


# ---------------------------------------------------------------------------- command line


def test_tier_flags_reach_the_config_and_help_says_what_is_stored(capsys, tmp_path):
    args = build_parser().parse_args(["serve", "--disk-cache", str(tmp_path), "--disk-bytes", "3GiB",
                                      "--redis-url", "redis://127.0.0.1:7/0", "--redis-ttl", "60"])
    cache = _config(args).cache
    assert (cache.disk_cache_dir, cache.disk_bytes, cache.redis_url, cache.redis_ttl_s) == \
        (tmp_path, 3 << 30, "redis://127.0.0.1:7/0", 60.0)
    assert _config(build_parser().parse_args(["serve"])).cache.disk_cache_dir is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for words in ("--disk-cache DIR", "--disk-bytes", "--redis-url URL", "--redis-ttl",
                  "no prompt text and no token ids are stored", "survives restarts"):
        assert words in out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--redis-ttl", "0"])
    assert "--redis-ttl" in capsys.readouterr().err


def test_bad_tier_settings_are_refused_with_the_field_named():
    with pytest.raises(ValueError, match="redis_url"):
        CacheConfig(redis_url="http://localhost")
    with pytest.raises(ValueError, match="disk_bytes"):
        CacheConfig(disk_bytes=-1)
    with pytest.raises(ValueError, match="redis_ttl_s"):
        CacheConfig(redis_ttl_s=0)


# ---------------------------------------------------------------------------- HTTP, tiny model




@pytest.fixture
def keys_file(tmp_path) -> Path:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": {"ka": "alice", "kb": "bob"}, "admin_keys": ["kops"]}))
    return path


def test_usage_stats_metrics_and_purge_over_http(tiny_engine_factory, tmp_path, redis_server, keys_file):
    cfg = CacheConfig(disk_cache_dir=tmp_path / "disk", redis_url=redis_server.url)
    server_cfg = ServerConfig(api_keys_file=keys_file)
    with running_server(tiny_engine_factory(cfg), server_cfg, cfg) as url:
        for key in ("ka", "kb"):
            first = ask(url, AGENTS[0], key)
            assert seg_tiers(first) == [None] * 3
        settle(url, "ka")
    # a second server on the same disk and Redis: RAM is empty, the tiers are not
    with running_server(tiny_engine_factory(cfg), server_cfg, cfg) as url:
        hit = ask(url, AGENTS[0], "ka")
        assert seg_tiers(hit) == ["disk"] * 3 and text(hit) == text(first)
        assert hit["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        stats = tier_stats(url, "ka")
        assert stats["disk"]["hits"] >= 3 and stats["disk"]["promotions"] >= 3
        assert stats["disk"]["entries"] > 0 and stats["redis"]["bytes"] is None
        m = metric_samples(url, "kops")
        assert m[("segcache_tier_hits_total", (("tier", "disk"),))] >= 3
        assert m[("segcache_tier_promotions_total", (("tier", "disk"),))] >= 3
        assert m[("segcache_tier_bytes", (("tier", "disk"),))] > 0
        assert ("segcache_tier_load_seconds_total", (("tier", "disk"),)) in m
        assert m[("segcache_tier_load_bytes_total", (("tier", "disk"),))] == stats["disk"]["load_bytes"] > 0
        assert ("segcache_tier_errors_total", (("tier", "redis"),)) in m
        assert ("segcache_tier_demotions_total", (("tier", "disk"),)) in m
        r = httpx.delete(url + "/v1/cache", headers={"Authorization": "Bearer kb"})
        assert r.status_code == 200
    with running_server(tiny_engine_factory(cfg), server_cfg, cfg) as url:
        assert seg_tiers(ask(url, AGENTS[0], "kb")) == [None] * 3  # purged on disk and in Redis
        assert seg_tiers(ask(url, AGENTS[1], "ka"))[0] == "disk"  # alice's entries stay
    with running_server(tiny_engine_factory(CacheConfig(redis_url=redis_server.url)), server_cfg) as url:
        assert seg_tiers(ask(url, AGENTS[0], "ka")) == ["redis"] * 3  # alice's entries untouched


def test_the_dashboard_shows_every_tier(tiny_engine_factory, tmp_path, redis_server, chromium):
    cfg = CacheConfig(disk_cache_dir=tmp_path / "disk", redis_url=redis_server.url)
    with running_server(tiny_engine_factory(cfg), ServerConfig(), cfg) as url:
        ask(url, AGENTS[0])
        settle(url)
    with running_server(tiny_engine_factory(cfg), ServerConfig(), cfg) as url:
        ask(url, AGENTS[0])  # promoted from disk
        dom = dashboard.render(chromium, url + "/dashboard", tmp_path / "profile")
        tiers = httpx.get(url + "/dashboard/data").json()["cache"]["tiers"]
    assert tiers["disk"]["promotions"] >= 3
    assert dom.by_id("tier-title").attrs.get("hidden") is None
    for name in ("disk", "redis"):
        hits = dashboard.card_value(dom, "tier-stats", f"{name}.hits")
        assert hits.attrs["data-value"] == str(tiers[name]["hits"])
        promoted = dashboard.card_value(dom, "tier-stats", f"{name}.promotions")
        assert promoted.attrs["data-value"] == str(tiers[name]["promotions"])
    assert dashboard.card_value(dom, "tier-stats", "disk.bytes").attrs["data-value"] == str(tiers["disk"]["bytes"])
    assert dashboard.card_value(dom, "tier-stats", "redis.bytes").text == "shared (not counted)"
    assert dashboard.card_value(dom, "tier-stats", "disk.load_ms").text.endswith(" ms")


# ---------------------------------------------------------------------------- real processes

REAL = ["--dtype", "float32", "--max-running", "2"]


def long_rules(n_tokens: int = 2000) -> str:
    """A compliance guide of about ``n_tokens`` tokens (SmolLM2's tokenizer)."""
    lines, i = [], 0
    while len(" ".join(lines)) < n_tokens * 4:
        lines.append(f"Rule {i}: files under module_{i % 37} must be reviewed by team {i % 11} "
                     f"before release {i % 5}.")
        i += 1
    return "\n".join(lines)


def cold_answer(real_engine, tenant: str, segments: list[dict], max_tokens: int = 8) -> str:
    """The in-process float32 engine's greedy answer, from a tenant nobody else uses."""
    segs = [SegmentInput(id=s["id"], content=s["content"]) for s in segments]
    r = real_engine.chat(ChatRequest(tenant, USER, segs, SamplingParams(max_tokens=max_tokens,
                                                                        temperature=0.0)))
    assert r.cached_tokens == 0
    return r.text


@pytest.mark.slow
def test_restart_on_the_same_disk_cache_is_a_full_hit_equal_to_cold(tmp_path):
    segments = [seg("guide", long_rules(2000)), seg("task", TASK_D)]
    disk = ["--disk-cache", str(tmp_path / "disk")]
    with ServeProcess(REAL + disk, log=tmp_path / "a.log") as srv:
        cold = ask(srv.url, segments)
        assert seg_tiers(cold) == [None, None]
        guide_tokens = cold["usage"]["segcache"]["segments"][0]["tokens"]
        assert guide_tokens > 1500
    with ServeProcess(REAL + disk, log=tmp_path / "b.log") as srv:
        warm = ask(srv.url, segments)
        assert seg_tiers(warm) == ["disk", "disk"]
        units = warm["usage"]["segcache"]["segments"]
        assert all(u["status"] == "hit" and u["tier"] == "disk" for u in units)  # user message too
        assert warm["usage"]["cached_prefix_tokens"] == sum(u["tokens"] for u in units)
        assert text(warm) == text(cold)
        disk_stats = tier_stats(srv.url)["disk"]
        assert disk_stats["promotions"] == len(units)
        assert disk_stats["hits"] + disk_stats["misses"] == len(units)  # each unit read once


@pytest.mark.slow
def test_kill_9_during_a_disk_write_then_start_serves_no_partial_entry(tmp_path, real_engine):
    segments = [seg("guide", long_rules(1500)), seg("task", TASK_E)]
    disk = tmp_path / "disk"
    srv = ServeProcess(REAL + ["--disk-cache", str(disk)], log=tmp_path / "a.log").start()
    try:
        caught = threading.Event()
        request = threading.Thread(target=lambda: _try(lambda: ask(srv.url, segments, max_tokens=64)),
                                   daemon=True)
        request.start()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not caught.is_set():
            if any(p.name.startswith(".tmp-") for p in disk.glob("*/*")):
                caught.set()
                break
            time.sleep(0.001)
        assert caught.is_set(), "no disk write was seen in flight"
    finally:
        srv.kill()  # kill -9 with the temporary file half written
    tier = DiskTier(disk, 20 << 30)  # what the next start finds
    assert tier.startup.removed_tmp >= 1
    tier.check_integrity()
    tier.close()
    with ServeProcess(REAL + ["--disk-cache", str(disk)], log=tmp_path / "b.log") as again:
        body = ask(again.url, segments)
        assert text(body) == cold_answer(real_engine, "kill9-cold", segments)
        rejected = tier_stats(again.url)["disk"]["rejected"]
        assert sum(rejected.values()) == 0  # nothing partial was ever indexed
    check = DiskTier(disk, 20 << 30)
    check.check_integrity()
    check.close()


def _try(fn) -> None:
    try:
        fn()
    except Exception:  # the server is killed under the request: that is the point
        pass


@pytest.mark.slow
@pytest.mark.parametrize("change", [["--prefill-chunk", "128"], ["--dtype", "bfloat16"]])
def test_a_fingerprint_change_on_restart_never_serves_old_entries(tmp_path, change):
    segments = [seg("A", RULES), seg("D", TASK_D)]
    disk = ["--disk-cache", str(tmp_path / "disk")]
    with ServeProcess(REAL + disk, log=tmp_path / "a.log") as srv:
        ask(srv.url, segments)
    args = REAL + disk + change  # argparse: the last --dtype wins
    with ServeProcess(args, log=tmp_path / "b.log") as srv:
        body = ask(srv.url, segments)
        assert seg_tiers(body) == [None, None]
        assert body["usage"]["cached_prefix_tokens"] == 0
        assert tier_stats(srv.url)["disk"]["hits"] == 0
    with ServeProcess(REAL + disk, log=tmp_path / "c.log") as srv:  # back: the old entries serve
        assert seg_tiers(ask(srv.url, segments)) == ["disk", "disk"]


def _check_budgets(url: str, cache_bytes: int, disk_bytes: int) -> None:
    m = metric_samples(url)
    assert m[("segcache_cache_resident_bytes", ())] <= cache_bytes
    assert m[("segcache_tier_bytes", (("tier", "disk"),))] <= disk_bytes


@pytest.mark.slow
def test_two_servers_share_kv_through_one_redis_and_survive_its_outage(tmp_path, real_engine, redis_server):
    cache_bytes, disk_bytes = 24 << 20, 48 << 20  # an agent's prompt is ~10 MB of float32 KV
    def args(name: str) -> list[str]:
        return REAL + ["--redis-url", redis_server.url, "--disk-cache", str(tmp_path / name),
                       "--disk-bytes", str(disk_bytes), "--cache-bytes", str(cache_bytes)]
    cold = [cold_answer(real_engine, f"redis-cold-{i}", a) for i, a in enumerate(AGENTS)]
    with ServeProcess(args("a"), log=tmp_path / "a.log") as a, \
            ServeProcess(args("b"), log=tmp_path / "b.log") as b:
        servers = [a, b]
        seen_redis = []
        for step in range(6):  # agents 1, 2, 3, 1, 2, 3 sent to A, B, A, B, A, B
            srv = servers[step % 2]
            body = ask(srv.url, AGENTS[step % 3])
            assert text(body) == cold[step % 3]
            seen_redis += [srv is b and t == "redis" for t in seg_tiers(body)]
            settle(srv.url)
            for s in servers:
                _check_budgets(s.url, cache_bytes, disk_bytes)
        assert any(seen_redis)  # B loaded what A computed
        assert tier_stats(b.url)["redis"]["hits"] > 0

        redis_server.stop()  # Redis goes away mid-run: no 5xx, answers unchanged
        for step in range(3):
            srv = servers[step % 2]
            assert text(ask(srv.url, AGENTS[step])) == cold[step]
        for srv in servers:  # a segment new to both: looked up and written while Redis is down
            ask(srv.url, [seg("A", RULES), seg("O", "Outage agent: keeps serving.")])
        redis_server.start()
        # Hits resume once the back-off window has passed: A computes a new agent, B loads it.
        deadline, resumed, n = time.monotonic() + 240, False, 0
        while time.monotonic() < deadline and not resumed:
            agent = [seg("A", RULES), seg("N", f"New agent {n}: reviews SQL migrations.")]
            ask(a.url, agent)
            settle(a.url)
            resumed = seg_tiers(ask(b.url, agent))[1] == "redis"
            n += 1
            time.sleep(0.5)
        assert resumed
        assert tier_stats(a.url)["redis"]["errors"] > 0 and tier_stats(b.url)["redis"]["errors"] > 0
