"""API keys and tenants.

``ServerConfig.api_keys_file`` names a JSON file mapping keys to tenants::

    {"keys": {"sk-team-a-1": "team-a", "sk-team-a-2": "team-a", "sk-ci": "ci"}}

Without a file, authentication is off and every request belongs to the tenant
``"local"``. With a file, every ``/v1/*`` request needs
``Authorization: Bearer <key>`` with a listed key, else 401. The tenant comes
only from the key, never from the request body: it scopes the KV cache and
the segment registry, so one tenant can never read another's cache.

``/metrics`` counts every tenant's traffic, so once keys are configured it needs
an admin key (401 without a key, 403 with a tenant's): the file's optional
``"admin_keys": ["<key>", ...]`` or ``--metrics-key``. Without keys it is open.
``/health`` and ``/dashboard`` stay open (cache-wide numbers only).
"""

from __future__ import annotations

import json
from pathlib import Path

from fastapi import Request

from segcache.server.errors import APIError

LOCAL_TENANT = "local"


def load_api_keys(path: Path | str) -> dict[str, str]:
    """Read the key file; raises ValueError saying what is wrong with it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read API keys file {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"API keys file {path} is not valid JSON: {exc}") from exc
    keys = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(keys, dict) or not keys:
        raise ValueError(
            f'API keys file {path} must hold {{"keys": {{"<key>": "<tenant>", ...}}}} '
            "with at least one key"
        )
    for key, tenant in keys.items():
        if not key or not isinstance(tenant, str) or not tenant:
            raise ValueError(f"API keys file {path}: key {key[:6]!r}... needs a non-empty tenant")
    return dict(keys)


def load_admin_keys(path: Path | str) -> frozenset[str]:
    """The keys file's optional ``"admin_keys"`` list (keys for ``/metrics``)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    admin = data.get("admin_keys", [])
    if not isinstance(admin, list) or not all(isinstance(k, str) and k for k in admin):
        raise ValueError(f'API keys file {path}: "admin_keys" must be a list of non-empty strings')
    return frozenset(admin)


def require_admin(request: Request) -> None:
    """FastAPI dependency for ``/metrics``: an admin key once any keys are configured."""
    state = request.app.state.server
    if state.api_keys is None and not state.admin_keys:
        return
    key = _bearer(request)
    if key in state.admin_keys:
        return
    if state.api_keys is not None and key in state.api_keys:
        raise APIError("This key is a tenant's; /metrics needs an admin key ('admin_keys' in "
                       "the API keys file, or --metrics-key)", status=403, code="forbidden")
    raise APIError(f"Incorrect admin key provided: {_mask(key)}", status=401, code="invalid_api_key")


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise APIError(
            "Missing API key: send it as 'Authorization: Bearer <key>'",
            status=401,
            code="invalid_api_key",
        )
    return key


def require_tenant(request: Request) -> str:
    """FastAPI dependency: the tenant of the request's bearer key."""
    keys: dict[str, str] | None = request.app.state.server.api_keys
    if keys is None:
        return LOCAL_TENANT
    key = _bearer(request)
    tenant = keys.get(key)
    if tenant is None:
        raise APIError(
            f"Incorrect API key provided: {_mask(key)}", status=401, code="invalid_api_key"
        )
    return tenant


def _mask(key: str) -> str:
    return key[:3] + "*" * 4 + key[-4:] if len(key) > 10 else "*" * len(key)
