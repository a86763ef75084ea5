"""Shared fixtures. The real model is loaded once per session; `make test`
converts it beforehand (`segcache prepare`), so tests never download anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from segcache.config import CacheConfig, Config, ModelConfig, read_environment


def _cache_dir() -> Path:
    return read_environment().cache_dir


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    from segcache.model.weights import resolve_model

    return resolve_model(None, _cache_dir(), progress=False).directory


@pytest.fixture(scope="session")
def tokenizer(real_model_dir):
    from segcache.model.tokenizer import ChatTokenizer

    return ChatTokenizer.load(real_model_dir, (2,))


@pytest.fixture(scope="session")
def real_engine():
    """The real default model in float32 (the exactness reference). Tests that use
    it must leave the cache as they found it or use their own tenant."""
    from segcache.engine.engine import Engine

    return Engine.load(Config(model=ModelConfig(dtype="float32", cache_dir=_cache_dir()),
                              cache=CacheConfig()), progress=False)


@pytest.fixture(scope="session")
def kernels(tmp_path_factory):
    """The block kernels (csrc/), built once per session in a temporary folder. Where they
    cannot be had the kernel tests skip, except under CI (``CI`` set), where a missing or
    broken build fails them: CI must never pass while serving on the slow path."""
    from segcache.model.kernels import probe_kernels

    probe = probe_kernels(tmp_path_factory.mktemp("kernels"))
    if probe.kernels is None:
        message = f"block kernels {probe.status}: {probe.reason}\n{probe.log}"
        if read_environment().ci:
            pytest.fail(message)
        pytest.skip(message)
    return probe.kernels


@pytest.fixture
def tiny_engine_factory(tokenizer):
    """Build an engine over the tiny random model with a given CacheConfig."""
    from segcache.engine.engine import Engine
    from tests.tiny import tiny_runtime

    engines = []

    def make(cache: CacheConfig | None = None, clock=None, **kw):
        extra = {"clock": clock} if clock is not None else {}
        engine = Engine(tiny_runtime(), tokenizer, cache or CacheConfig(), "tiny", **extra, **kw)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close(drain=False)


@pytest.fixture
def base_url(engine):
    """A real uvicorn server on a free port over the module's ``engine`` fixture."""
    from tests.server_harness import running_server

    with running_server(engine) as url:
        yield url


@pytest.fixture
def client(base_url):
    """The real ``openai`` client pointed at ``base_url``."""
    from openai import OpenAI

    return OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0)


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server on a free port (tests/tier_helpers.RedisServer), stopped after."""
    from tests.tier_helpers import RedisServer

    (tmp_path / "redis").mkdir()
    srv = RedisServer(tmp_path / "redis")
    srv.start()
    yield srv
    srv.stop()
