"""The FastAPI application: ``create_app`` wires state, middleware, error
handlers and routes; ``serve`` runs it under uvicorn.

Nothing here imports torch: the engine object passed in is the only way the
server reaches the model. Its methods block, so routes call them in worker
threads.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import uvicorn
from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

import segcache
from segcache.config import CacheConfig, ServerConfig
from segcache.engine.types import EngineClient
from segcache.server import routes_cache, routes_openai, routes_ops
from segcache.server.auth import load_admin_keys, load_api_keys
from segcache.server.errors import install_error_handlers
from segcache.server.metrics import ServerMetrics
from segcache.server.middleware import BodyLimit, RequestAccounting
from segcache.server.openapi import install_openapi
from segcache.server.request_log import RequestLog
from segcache.server.state import ServerState

log = logging.getLogger(__name__)


def create_app(engine: EngineClient, cfg: ServerConfig, cache_cfg: CacheConfig) -> FastAPI:
    """An app serving ``engine``. Raises ValueError if the API keys file is unusable."""
    api_keys = load_api_keys(cfg.api_keys_file) if cfg.api_keys_file is not None else None
    admin_keys = load_admin_keys(cfg.api_keys_file) if cfg.api_keys_file is not None else frozenset()
    if cfg.metrics_key:
        admin_keys |= {cfg.metrics_key}
    app = FastAPI(
        title="segcache",
        version=segcache.__version__,
        summary="OpenAI-compatible LLM server with a segment-tree KV cache",
    )
    metrics = ServerMetrics(engine)
    app.state.server = ServerState(
        engine=engine,
        cfg=cfg,
        cache_cfg=cache_cfg,
        metrics=metrics,
        api_keys=api_keys,
        model_name=cfg.model_name or engine.model_name,
        request_log=RequestLog(cfg.request_log) if cfg.request_log is not None else None,
        admin_keys=admin_keys,
    )
    install_error_handlers(app)
    install_openapi(app, getattr(engine, "context_window", None), getattr(engine, "vocab_size", None))
    routers = [routes_openai.router, routes_cache.router, routes_ops.router]
    for router in routers:
        app.include_router(router)
    # Added last = outermost: accounting sees the 413s that BodyLimit sends.
    app.add_middleware(BodyLimit, max_bytes=cfg.max_request_bytes)
    paths = [route.path for router in routers for route in router.routes]
    app.add_middleware(RequestAccounting, metrics=metrics, paths=paths)
    if cfg.cors_origins:  # outermost: preflights are answered before auth and accounting
        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins),
                           allow_methods=["*"], allow_headers=["*"])
    return app


def serve(engine: EngineClient, cfg: ServerConfig, cache_cfg: CacheConfig) -> None:
    """Serve until interrupted."""
    if not logging.getLogger().handlers:  # the CLI may have configured logging already
        logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    app = create_app(engine, cfg, cache_cfg)
    name = app.state.server.model_name
    auth = f"API keys from {cfg.api_keys_file}" if cfg.api_keys_file else "no auth"
    log.info("segcache serving %s at http://%s:%d/v1 (%s)", name, cfg.host, cfg.port, auth)
    # uvicorn stops accepting on SIGINT/SIGTERM, waits for running requests, then
    # raises the signal again under the handler it found: this one, so that a drained
    # shutdown on SIGTERM ends with exit status 0 rather than death by the signal.
    main = threading.current_thread() is threading.main_thread()  # signals: main thread only
    previous = signal.signal(signal.SIGTERM, _drained) if main else None
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")
    finally:
        close = getattr(engine, "close", None)
        if close is not None:
            close(drain=True)
        if main:
            signal.signal(signal.SIGTERM, previous)


def _drained(signum: int, frame: Any) -> None:
    log.info("stopped on signal %d after draining", signum)
