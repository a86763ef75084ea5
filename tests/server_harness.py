"""Run the real app under a real uvicorn server on a free port, in a thread.

    with running_server(engine) as base_url:
        OpenAI(base_url=base_url + "/v1", api_key="x").chat.completions.create(...)

Works with the real engine as well as ``tests.fakes.FakeEngine``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from segcache.config import CacheConfig, ServerConfig
from segcache.server import create_app


@contextmanager
def running_server(
    engine: Any,
    cfg: ServerConfig | None = None,
    cache_cfg: CacheConfig | None = None,
    startup_timeout_s: float = 10.0,
) -> Iterator[str]:
    """Yields ``http://127.0.0.1:<port>``; ``cfg.host``/``cfg.port`` are ignored."""
    app = create_app(engine, cfg or ServerConfig(), cache_cfg or CacheConfig())
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
