"""Loaded by the schemathesis CLI (SCHEMATHESIS_HOOKS) in tests/test_schema_fuzz.py.

``positive_data_acceptance`` with one stated exception: a schema-valid request
whose prompt plus ``max_tokens`` exceeds the context window is refused (400,
``context_length_exceeded``), as OpenAI's API does; a schema cannot know a
prompt's token count. Every other schema-valid request must be accepted."""

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
        code = json.loads(response.content)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = None
    if response.status_code == 400 and code == "context_length_exceeded":
        return None
    raise Failure(operation=case.operation.label, title="Schema-valid request rejected",
                  message=f"status {response.status_code}: {response.text[:300]}")
