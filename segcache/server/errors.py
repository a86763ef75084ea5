"""Every error leaves the server in OpenAI's shape::

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

with a message that says what to fix. Handlers here turn engine refusals,
validation failures and unknown routes into that shape; unexpected exceptions
become a generic 500 in ``middleware.RequestAccounting`` (traceback logged,
never sent).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from segcache.engine.types import EngineError

log = logging.getLogger(__name__)


class APIError(Exception):
    """A request the HTTP layer refuses before reaching the engine."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type or error_type(status)


def error_type(status: int) -> str:
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_body(
    message: str,
    status: int,
    *,
    param: str | None = None,
    code: str | None = None,
    type: str | None = None,
) -> dict[str, Any]:
    return {
        "error": {
            # Message and param may quote the request: kept encodable (lone surrogates escaped).
            "message": _encodable(message),
            "type": type or error_type(status),
            "param": None if param is None else _encodable(param),
            "code": code,
        }
    }


def _encodable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(
    message: str, status: int, *, param: str | None = None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(error_body(message, status, param=param, code=code), status_code=status)


def engine_error_body(exc: EngineError) -> dict[str, Any]:
    # The base EngineError's code repeats the type; OpenAI leaves such codes null.
    code = None if exc.code == error_type(exc.status) else exc.code
    return error_body(exc.message, exc.status, param=exc.param, code=code)


def api_error_body(exc: APIError) -> dict[str, Any]:
    return error_body(exc.message, exc.status, param=exc.param, code=exc.code, type=exc.type)


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(api_error_body(exc), status_code=exc.status)

    async def on_engine_error(_: Request, exc: EngineError) -> JSONResponse:
        headers = None
        retry = getattr(exc, "retry_after_s", None)
        if retry is not None:  # 429: tell the client when to come back
            headers = {"Retry-After": str(retry)}
        return JSONResponse(engine_error_body(exc), status_code=exc.status, headers=headers)

    async def on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        try:
            message, param = describe_validation_errors(exc.errors())
        except Exception:  # describing must never turn a 400 into a 500
            log.exception("could not describe validation errors")
            message, param = "Invalid request body", None
        return error_response(message, 400, param=param)

    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"Unknown path {request.url.path}; see /docs for the API"
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        response = error_response(message, exc.status_code)
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:  # every method of the path, not only the first route's
            response.headers["Allow"] = ", ".join(_allowed_methods(request))
        return response

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(EngineError, on_engine_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)


def _allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in request.app.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match != Match.NONE and getattr(route, "methods", None):
            methods |= set(route.methods)
    return sorted(methods)


# Pydantic puts the name of the union member it tried into ``loc``
# ("str", "list[ContentPart]", "function-after[...]"); a client wants the field.
_TAG_WORDS = {"str", "int", "float", "bool", "list", "dict", "none", "null"}


def _is_type_tag(part: Any) -> bool:
    if not isinstance(part, str):
        return False
    return part in _TAG_WORDS or part[:1].isupper() or any(c in part for c in "[-,( ")


def field_path(loc: tuple[Any, ...]) -> str:
    """``("body", "messages", 0, "content")`` -> ``messages[0].content``."""
    parts = [p for p in loc if not _is_type_tag(p)]
    if parts and parts[0] == "body":
        parts = parts[1:]
    path = ""
    for p in parts:
        path += f"[{p}]" if isinstance(p, int) else (f".{p}" if path else str(p))
    return path


def describe_validation_errors(errors: list[dict[str, Any]] | Any) -> tuple[str, str | None]:
    """One message naming the first bad field (and what each union member wanted)."""
    errors = list(errors)
    if not errors:
        return "Invalid request body", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        loc = first.get("loc", ())
        where = f" at character {loc[1]}" if len(loc) > 1 and isinstance(loc[1], int) else ""
        return f"Request body is not valid JSON ({detail}{where})", None
    param = field_path(tuple(first.get("loc", ())))
    if not param:
        if first.get("type") == "missing":
            return "Request body is required: send a JSON object", None
        return "Request body must be a JSON object sent with 'Content-Type: application/json'", None
    same_field = [e for e in errors if field_path(tuple(e.get("loc", ()))) == param]
    wanted = list(dict.fromkeys(_phrase(e) for e in same_field))
    if wanted == ["field required"]:
        message = f"Missing required field '{param}'"
    else:
        message = f"Invalid '{param}': " + ", or ".join(wanted)
    others = len({field_path(tuple(e.get("loc", ()))) for e in errors}) - 1
    if others:
        message += f" (and {others} more invalid field{'s' if others > 1 else ''})"
    return message, param


def _phrase(error: dict[str, Any]) -> str:
    if error.get("type") == "missing":
        return "field required"
    msg = str(error.get("msg", "invalid value"))
    return msg[:1].lower() + msg[1:]
