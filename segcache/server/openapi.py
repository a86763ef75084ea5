"""The OpenAPI document, made to say what the server does (schemathesis checks it
against the live server in ``tests/test_schema_fuzz.py``).

FastAPI's generated document is corrected in one place:

- errors are 400 in OpenAI's shape (``Error``), never FastAPI's 422; each
  operation lists the statuses it can answer (401 without a valid key once keys
  are configured, 404/409 for segments the server does not hold, 413 for a body
  or a registry over its limit, 429 when the queue is full, 503/504);
- ``Authorization: Bearer`` is declared (optional: keys may be off);
- generation answers ``text/event-stream`` when ``stream`` is true, ``/metrics``
  is Prometheus text;
- constraints the server enforces with its own messages (in ``protocol`` or the
  engine) are written into the request schemas, so a body the document allows
  is a body the server accepts (a prompt too long for the context window aside:
  no schema can know its token count).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from segcache.engine.types import MAX_CHOICES, MAX_TOP_LOGPROBS
from segcache.server.protocol import MAX_COMPLETION_LOGPROBS, MAX_PROMPTS, SEED_MAX, SEED_MIN

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {
            "message": {"type": "string", "description": "what is wrong and how to fix it"},
            "type": {"type": "string"},
            "param": {"type": ["string", "null"], "description": "the offending field"},
            "code": {"type": ["string", "null"]},
        },
    }},
}

_WHY = {
    "400": "Invalid request: the message says what to fix, `param` names the field",
    "401": "Missing or unknown API key (only when API keys are configured)",
    "403": "A tenant's key where an admin key is needed",
    "404": "Unknown model, segment name or path",
    "409": "A segment sent by hash only that this tenant's cache does not hold; send its content",
    "413": "Request body, or this tenant's registered segments, over the limit",
    "429": "Queue full (or this tenant's share of it); see Retry-After",
    "503": "Shutting down",
    "504": "The request did not finish in time",
}

_GENERATION = ["400", "401", "404", "409", "413", "429", "503", "504"]
_ERRORS: dict[tuple[str, str], list[str]] = {
    ("post", "/v1/chat/completions"): _GENERATION,
    ("post", "/v1/completions"): ["400", "401", "404", "413", "429", "503", "504"],
    ("post", "/v1/cache/warm"): _GENERATION,
    ("get", "/v1/models"): ["401"],
    ("get", "/v1/models/{model_id}"): ["401", "404"],
    ("get", "/v1/cache"): ["401"],
    ("delete", "/v1/cache"): ["401"],
    ("put", "/v1/segments/{name}"): ["400", "401", "413"],
    ("get", "/v1/segments/{name}"): ["401", "404"],
    ("delete", "/v1/segments/{name}"): ["401", "404"],
    ("get", "/metrics"): ["401", "403"],
}

_SEGMENT_ID = {"type": "string", "minLength": 1}
_HASH = {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$"}
_NAME = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"}


def install_openapi(app: FastAPI, context_window: int | None = None, vocab_size: int | None = None) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, summary=app.summary,
                              routes=app.routes)
            app.openapi_schema = corrected(doc, context_window, vocab_size)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def corrected(doc: dict[str, Any], context_window: int | None = None,
              vocab_size: int | None = None) -> dict[str, Any]:
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas["Error"] = ERROR_SCHEMA
    doc["components"]["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer",
                   "description": "an API key from the keys file (when keys are configured)"}}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            _correct_operation(path, method, op)
    _constrain_requests(schemas, context_window, vocab_size)
    return doc


def _correct_operation(path: str, method: str, op: dict[str, Any]) -> None:
    responses = op["responses"]
    responses.pop("422", None)
    for status in _ERRORS.get((method, path), []):
        responses[status] = {"description": _WHY[status], "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    if path.startswith("/v1/"):
        op["security"] = [{"bearer": []}, {}]  # {}: keys may be off
    if path == "/metrics":
        op["security"] = [{"bearer": []}, {}]
        responses["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}
        responses["200"]["description"] = "Prometheus text exposition"
    if path in ("/v1/chat/completions", "/v1/completions"):
        responses["200"]["content"]["text/event-stream"] = {"schema": {
            "type": "object", "required": ["data"], "properties": {"data": {"type": "string"}},
            "description": "with stream: true, server-sent events (each a JSON chunk in `data`), "
                           "the last `data: [DONE]`"}}
    if path == "/v1/segments/{name}" and method == "put":
        op["parameters"][0]["schema"] = {**_NAME, "title": "Name"}


def _constrain_requests(schemas: dict[str, Any], context_window: int | None,
                        vocab_size: int | None = None) -> None:
    tokens: dict[str, Any] = {"type": "integer", "minimum": 1}
    if context_window is not None:  # the prompt takes at least one more
        tokens["maximum"] = context_window - 1
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        props = schemas[name]["properties"]
        _nullable(props, "max_tokens", tokens)
        _nullable(props, "temperature", {"type": "number", "minimum": 0, "maximum": 2})
        _nullable(props, "top_p", {"type": "number", "exclusiveMinimum": 0, "maximum": 1})
        _nullable(props, "top_k", {"type": "integer", "minimum": 0})
        _nullable(props, "seed", {"type": "integer", "minimum": SEED_MIN, "maximum": SEED_MAX})
        _nullable(props, "n", {"type": "integer", "minimum": 1, "maximum": MAX_CHOICES})
        props["stop"]["anyOf"] = [{"type": "string"}, {"type": "null"},
                                  {"type": "array", "items": {"type": "string"}, "maxItems": 4}]
        # stream_options only together with stream: true (as OpenAI's API requires)
        schemas[name]["dependentSchemas"] = {"stream_options": {
            "required": ["stream"], "properties": {"stream": {"const": True}}}}
    chat = schemas["ChatCompletionRequest"]["properties"]
    _nullable(chat, "max_completion_tokens", tokens)
    _nullable(chat, "logprobs", {"type": "boolean"})
    _nullable(chat, "top_logprobs", {"type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS})
    # top_logprobs only with logprobs: true
    schemas["ChatCompletionRequest"]["dependentSchemas"]["top_logprobs"] = {
        "required": ["logprobs"], "properties": {"logprobs": {"const": True}}}
    completion = schemas["CompletionRequest"]["properties"]
    token_id: dict[str, Any] = {"type": "integer", "minimum": 0}
    if vocab_size is not None:
        token_id["maximum"] = vocab_size - 1
    ids = {"type": "array", "items": token_id, "minItems": 1}
    completion["prompt"]["anyOf"] = [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1,
         "maxItems": MAX_PROMPTS},
        ids,
        {"type": "array", "items": ids, "minItems": 1, "maxItems": MAX_PROMPTS}]
    _nullable(completion, "echo", {"type": "boolean", "const": False})
    _nullable(completion, "suffix", {"type": "string", "maxLength": 0})
    _nullable(completion, "logprobs", {"type": "integer", "minimum": 0,
                                       "maximum": MAX_COMPLETION_LOGPROBS})
    _nullable(completion, "best_of", {"type": "integer", "minimum": 1, "maximum": 1})
    # A segment is its content (with an id) or a reference by hash or name.
    segment = schemas["Segment"]
    segment["properties"]["hash"]["anyOf"] = [_HASH, {"type": "null"}]
    # Content sent with a hash must hash to it, which no schema can say: the document
    # allows content or a hash, never both (the server also takes a matching pair).
    segment["dependentSchemas"] = {"content": {"not": {"required": ["hash"]}}}
    segment["anyOf"] = [
        {"required": ["content", "id"], "properties": {"content": {"type": "string"},
                                                       "id": _SEGMENT_ID}},
        {"required": ["hash"], "properties": {"hash": _HASH}},
        {"required": ["name"], "properties": {"name": _SEGMENT_ID}}]  # its id by default
    schemas["Tool"]["properties"]["function"] = {
        "type": "object", "required": ["name"], "additionalProperties": True,
        "properties": {"name": {"type": "string", "minLength": 1}}}
    part = schemas["ContentPart"]
    part["properties"]["type"] = {"type": "string", "enum": ["text"]}
    part["properties"]["text"] = {"type": "string"}
    part["required"] = ["type", "text"]


def _nullable(props: dict[str, Any], name: str, schema: dict[str, Any]) -> None:
    props[name] = {**{k: v for k, v in props[name].items() if k not in ("anyOf", "type")},
                   "anyOf": [schema, {"type": "null"}]}
