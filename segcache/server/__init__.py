"""HTTP layer: an OpenAI-compatible API over an engine, plus segcache's cache
controls. Entry points: ``create_app(engine, cfg, cache_cfg)`` and
``serve(engine, cfg, cache_cfg)``.

Modules: ``app`` (wiring, uvicorn), ``protocol`` (request schemas),
``responses`` (response objects, SSE), ``generation`` (engine thread <->
event loop), ``routes_openai`` / ``routes_cache`` / ``routes_ops``, ``auth``,
``errors``, ``metrics``, ``middleware``, ``state``.
"""

from segcache.server.app import create_app, serve

__all__ = ["create_app", "serve"]
