"""A small client helper: build ``segments[]`` with their hashes and call a
segcache server through the real ``openai`` client.

    from segcache.client import SegcacheClient, Segment

    client = SegcacheClient("http://127.0.0.1:8000/v1")
    rules = Segment("global-rules", "You are a careful coding agent. ...")
    reply = client.chat([rules, Segment("backend", "You own the backend.")],
                        [{"role": "user", "content": "Refactor auth."}])
    print(reply.choices[0].message.content, client.cached_tokens(reply))

No torch: this imports only ``openai`` and segcache's hashing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from openai import OpenAI

from segcache.kv.hashing import segment_digest


@dataclass(frozen=True)
class Segment:
    """One block of prompt. ``send_content=False`` sends only the hash (the server
    must already hold it for this tenant, else 409)."""

    id: str
    content: str
    send_content: bool = True
    ttl: float | None = None

    @property
    def hash(self) -> str:
        return segment_digest(self.content)

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"id": self.id, "hash": self.hash}
        if self.send_content:
            body["content"] = self.content
        if self.ttl is not None:
            body["ttl"] = self.ttl
        return body


class SegcacheClient:
    """Thin wrapper over ``openai.OpenAI`` that adds segcache's extensions."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000/v1", api_key: str = "local",
                 model: str | None = None, **openai_kwargs: Any) -> None:
        self.openai = OpenAI(base_url=base_url, api_key=api_key, **openai_kwargs)
        self._model = model

    @property
    def model(self) -> str:
        """The model requests name: as given, else the server's first (GET /models)."""
        if self._model is None:
            self._model = self.openai.models.list().data[0].id
        return self._model

    def chat(self, segments: list[Segment], messages: list[dict[str, Any]], **kwargs: Any):
        """``chat.completions.create`` with ``segments`` in ``extra_body``; any other
        OpenAI argument (max_tokens, temperature, stream, tools, ...) passes through."""
        extra = dict(kwargs.pop("extra_body", None) or {})
        extra["segments"] = [s.to_json() for s in segments]
        return self.openai.chat.completions.create(
            model=kwargs.pop("model", None) or self.model, messages=messages, extra_body=extra, **kwargs)

    def warm(self, segments: list[Segment]) -> dict[str, Any]:
        """Pre-compute ``segments``: ``{cached_segments, root_hash, segments}``."""
        return self.openai.post("/cache/warm", body={"segments": [s.to_json() for s in segments]},
                                cast_to=object)

    def register(self, name: str, content: str, ttl: float | None = None) -> dict[str, Any]:
        """Store ``content`` under ``name``; later requests can send ``{"id", "name"}``."""
        body: dict[str, Any] = {"content": content}
        if ttl is not None:
            body["ttl"] = ttl
        return self.openai.put(f"/segments/{name}", body=body, cast_to=object)

    @staticmethod
    def cached_tokens(response: Any) -> int:
        """Prompt tokens that came from cache (works for any OpenAI-compatible server)."""
        details = getattr(response.usage, "prompt_tokens_details", None)
        return int(getattr(details, "cached_tokens", 0) or 0)

    @staticmethod
    def segment_usage(response: Any) -> list[dict[str, Any]]:
        """segcache's per-unit hit/miss list (empty for other servers)."""
        extra = response.usage.model_extra or {}
        return list((extra.get("segcache") or {}).get("segments", []))
