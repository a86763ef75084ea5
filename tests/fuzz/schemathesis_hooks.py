"""Loaded by the schemathesis CLI (SCHEMATHESIS_HOOKS) in tests/test_schema_fuzz.py.

``positive_data_acceptance`` with the stated exceptions no schema can express
(``segcache/server/openapi.py``), each a 400 naming its field: a prompt plus
``max_tokens`` over the context window (``context_length_exceeded``, as
OpenAI's API), a ``tool_choice`` naming a function missing from ``tools``, a
``logit_bias`` id beyond the vocabulary, tool-call ``arguments`` that are not
a JSON document, and a JSON schema the grammar library cannot enforce. Every other schema-valid request must be accepted."""

from __future__ import annotations

import json

import schemathesis
from schemathesis.core.failures import Failure


@schemathesis.check
def positive_data_accepted_but_context(ctx, response, case):
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code < 400:
        return None
    if response.status_code in (401, 403, 404, 409, 429, 503, 504):
        return None  # states of the server, not of the request's shape
    try:
        error = json.loads(response.content)["error"]
        code, param, message = error.get("code"), error.get("param") or "", error.get("message", "")
    except (ValueError, KeyError, TypeError, AttributeError):
        code, param, message = None, "", ""
    if response.status_code == 400 and _cross_field(code, param, message):
        return None
    raise Failure(operation=case.operation.label, title="Schema-valid request rejected",
                  message=f"status {response.status_code}: {response.text[:300]}")


def _cross_field(code: str | None, param: str, message: str) -> bool:
    """A refusal the document says it cannot express (see the module docstring)."""
    return (code == "context_length_exceeded"
            or (param == "tool_choice.function.name" and "is not one of 'tools'" in message)
            or (param == "logit_bias" and "is not a token id of this model" in message)
            or (param.endswith(".function.arguments") and "JSON" in message)
            or (param in ("response_format", "tools") or param.startswith("tools["))
            and "schema" in message.lower())
