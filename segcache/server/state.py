"""What every route needs, held on ``app.state.server``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import Request

from segcache.config import CacheConfig, ServerConfig
from segcache.server.metrics import ServerMetrics


@dataclass
class ServerState:
    engine: Any  # segcache.engine.engine.Engine; typed loosely so tests can pass a fake
    cfg: ServerConfig
    cache_cfg: CacheConfig
    metrics: ServerMetrics
    api_keys: dict[str, str] | None  # None: no auth, one local tenant
    model_name: str  # the name responses carry (cfg.model_name or engine.model_name)
    request_log: Any = None  # segcache.server.request_log.RequestLog when --request-log is set
    admin_keys: frozenset[str] = frozenset()  # for /metrics (auth.require_admin)


def server_state(request: Request) -> ServerState:
    return request.app.state.server
