"""Pure ASGI middleware (no BaseHTTPMiddleware: it breaks streaming and
disconnect detection).

- ``RequestAccounting`` (outermost): counts every request by route template
  and status, and turns an unexpected exception into a generic 500 in
  OpenAI's shape with the traceback logged, never sent.
- ``BodyLimit``: refuses a body over ``max_request_bytes`` with 413 before any
  route parses it, then replays the body it read to the app.
"""

from __future__ import annotations

import logging

from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from segcache.server.errors import error_response
from segcache.server.metrics import ServerMetrics

log = logging.getLogger(__name__)

_BODY_METHODS = {"POST", "PUT", "PATCH"}


class RequestAccounting:
    def __init__(self, app: ASGIApp, metrics: ServerMetrics, paths: list[str]) -> None:
        self.app = app
        self.metrics = metrics
        # Route templates, for requests refused before routing (413).
        self.templates = [(compile_path(p)[0], p) for p in paths]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = False

        async def send_and_watch(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        except Exception:
            log.exception("unhandled error in %s %s", scope["method"], scope["path"])
            status = 500
            if not started:
                response = error_response(
                    "The server had an error while processing your request; "
                    "it has been logged. Retry, or report it if it persists.",
                    500,
                )
                await response(scope, receive, send)
        finally:
            self.metrics.requests.labels(route=self._route(scope), status=str(status)).inc()

    def _route(self, scope: Scope) -> str:
        route = scope.get("route")
        if route is not None and hasattr(route, "path"):
            return route.path
        for regex, template in self.templates:
            if regex.match(scope["path"]):
                return template
        return "unmatched"


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(declared, scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(None, scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _refuse(self, size: int | None, scope: Scope, receive: Receive, send: Send) -> None:
        sent = f"{size} bytes" if size is not None else "more than that"
        response = error_response(
            f"Request body too large: {sent} sent, the limit is {self.max_bytes} bytes "
            "(send long segments once, then refer to them by hash or name)",
            413,
            code="request_too_large",
        )
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that yields ``body`` once, then defers to the real one (which
    reports the client's disconnect)."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
