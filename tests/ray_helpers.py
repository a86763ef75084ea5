"""What the Ray Serve tests ship to their engine replicas (importable by reference in
the replica processes: the fixture puts the repository on their PYTHONPATH)."""

from __future__ import annotations

from segcache.config import CacheConfig, read_environment


def tiny_engine():
    """An engine over the tiny random model and the real tokenizer (as ``tiny_engine_factory``)."""
    from segcache.engine.engine import Engine
    from segcache.model.tokenizer import ChatTokenizer
    from segcache.model.weights import resolve_model
    from tests.tiny import tiny_runtime

    model_dir = resolve_model(None, read_environment().cache_dir, progress=False).directory
    return Engine(tiny_runtime(), ChatTokenizer.load(model_dir, (2,)), CacheConfig(blend="off"), "tiny")
