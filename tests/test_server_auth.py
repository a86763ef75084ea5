"""API keys map to tenants; the tenant never comes from the body."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from openai import OpenAI

from segcache.config import CacheConfig, ServerConfig
from segcache.server import create_app
from tests.fakes import FakeEngine
from tests.server_harness import running_server

USER = [{"role": "user", "content": "hi"}]
SEGMENTS = {"segments": [{"id": "rules", "content": "shared rules " * 20}]}


@pytest.fixture
def engine():
    return FakeEngine()


@pytest.fixture
def base_url(engine, tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": {"sk-alpha-0001": "alpha", "sk-beta-00002": "beta"}}))
    with running_server(engine, ServerConfig(api_keys_file=keys)) as url:
        yield url


def client(base_url: str, key: str) -> OpenAI:
    return OpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0)


def test_missing_and_unknown_keys_are_401(base_url, engine):
    r = httpx.post(base_url + "/v1/chat/completions", json={"messages": USER})
    assert r.status_code == 401
    err = r.json()["error"]
    assert err["code"] == "invalid_api_key" and "Authorization: Bearer" in err["message"]

    with pytest.raises(openai.AuthenticationError) as exc:
        client(base_url, "sk-wrong-key-123").chat.completions.create(model="fake-model", messages=USER)
    assert "sk-wrong-key-123" not in exc.value.message  # masked
    for path in ("/v1/models", "/v1/cache", "/v1/segments/x"):
        assert httpx.get(base_url + path).status_code == 401
    assert engine.calls == []


def test_key_maps_to_tenant_and_body_cannot_override(base_url, engine):
    client(base_url, "sk-alpha-0001").chat.completions.create(
        model="fake-model", messages=USER, user="beta", extra_body={"tenant": "beta"}
    )
    assert engine.last_chat.tenant == "alpha"
    client(base_url, "sk-beta-00002").completions.create(model="fake-model", prompt="x")
    assert engine.calls == [("chat", "alpha"), ("complete", "beta")]


def test_tenants_do_not_share_cache(base_url):
    alpha, beta = client(base_url, "sk-alpha-0001"), client(base_url, "sk-beta-00002")

    def cached(c: OpenAI) -> int:
        r = c.chat.completions.create(model="fake-model", messages=USER, extra_body=SEGMENTS)
        return r.usage.prompt_tokens_details.cached_tokens

    assert cached(alpha) == 0
    assert cached(beta) == 0  # alpha's segments are invisible to beta
    assert cached(alpha) == 40


def test_open_routes_need_no_key(base_url):
    assert httpx.get(base_url + "/health").status_code == 200
    assert httpx.get(base_url + "/dashboard").status_code == 200


def test_metrics_need_an_admin_key_once_keys_are_configured(engine, tmp_path):
    """/metrics counts every tenant's traffic: a tenant's key is not enough."""
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": {"sk-alpha-0001": "alpha"}, "admin_keys": ["sk-ops-1"]}))
    cfg = ServerConfig(api_keys_file=keys, metrics_key="sk-ops-2")
    with running_server(engine, cfg) as url:
        assert httpx.get(url + "/metrics").status_code == 401
        r = httpx.get(url + "/metrics", headers={"authorization": "Bearer sk-alpha-0001"})
        assert r.status_code == 403 and "admin key" in r.json()["error"]["message"]
        assert httpx.get(url + "/metrics", headers={"authorization": "Bearer nope"}).status_code == 401
        for admin in ("sk-ops-1", "sk-ops-2"):
            r = httpx.get(url + "/metrics", headers={"authorization": f"Bearer {admin}"})
            assert r.status_code == 200 and "segcache_requests_total" in r.text
    with running_server(engine) as url:  # no keys: open, as before
        assert httpx.get(url + "/metrics").status_code == 200


def test_no_keys_file_means_local_tenant(engine):
    with running_server(engine) as url:
        client(url, "anything").chat.completions.create(model="fake-model", messages=USER)
    assert engine.last_chat.tenant == "local"


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("{nope", "not valid JSON"),
        ('{"sk-a": "a"}', '{"keys"'),
        ('{"keys": {"sk-a": ""}}', "non-empty tenant"),
    ],
)
def test_bad_keys_file_is_refused_at_start(tmp_path, content, words):
    path = tmp_path / "keys.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=words.replace("{", r"\{")):
        create_app(FakeEngine(), ServerConfig(api_keys_file=path), CacheConfig())
