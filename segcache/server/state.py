"""What every route needs, held on ``app.state.server``."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from segcache.config import CacheConfig, ServerConfig
from segcache.engine.types import EngineClient
from segcache.server.errors import APIError
from segcache.server.metrics import ServerMetrics


@dataclass
class ServerState:
    engine: EngineClient  # segcache.engine.engine.Engine, or the tests' FakeEngine
    cfg: ServerConfig
    cache_cfg: CacheConfig
    metrics: ServerMetrics
    api_keys: dict[str, str] | None  # None: no auth, one local tenant
    model_name: str  # the name responses carry (cfg.model_name or engine.model_name)
    request_log: Any = None  # segcache.server.request_log.RequestLog when --request-log is set
    admin_keys: frozenset[str] = frozenset()  # for /metrics (auth.require_admin)

    @property
    def served_names(self) -> tuple[str, ...]:
        """Every name a request's ``model`` may use: the served name, then its aliases."""
        return (self.model_name, *self.cfg.model_aliases)

    @property
    def system_fingerprint(self) -> str:
        """OpenAI's ``system_fingerprint``: changes whenever the model fingerprint does
        (weights, dtype, tokenizer, template, KV layout), so cached answers can be told apart."""
        return "fp_" + hashlib.sha256(str(self.engine.fingerprint).encode()).hexdigest()[:12]

    def check_model(self, model: str | None) -> None:
        """None is the served model; a name not served is a 404, as vLLM answers."""
        if model is not None and model not in self.served_names:
            raise APIError(f"The model `{model}` does not exist. This server serves "
                           f"{', '.join(f'`{n}`' for n in self.served_names)} (GET /v1/models).",
                           status=404, param="model", code="model_not_found")


def server_state(request: Request) -> ServerState:
    return request.app.state.server
