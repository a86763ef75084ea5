"""``--request-log FILE``: one JSON line per chat request, in the shape
``segcache lint`` reads (``{"request": body, "timestamp", "tenant", "response",
"usage"}``), so a deployment can lint its own traffic."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from segcache.engine.types import GenerationResult


class RequestLog:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8", buffering=1)  # line-buffered
        self._lock = threading.Lock()

    def write(self, tenant: str, body: dict[str, Any], result: GenerationResult) -> None:
        record = {"timestamp": time.time(), "tenant": tenant, "request": body,
                  "response": result.text, "usage": result.usage()}
        line = json.dumps(record, ensure_ascii=False)
        with self._lock:
            self._file.write(line + "\n")

    def close(self) -> None:
        self._file.close()
