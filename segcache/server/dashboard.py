"""The live dashboard: one self-contained HTML page and the open JSON it polls.

``GET /dashboard`` serves ``dashboard.html`` (inline CSS and JS, no network
beyond this server). Every 2 s the page fetches

- ``GET /dashboard/data`` (open): cache-wide numbers only, from
  ``dashboard_numbers`` below — nothing that names or belongs to a tenant;
- ``GET /v1/cache`` (the tenant's bearer key when the server has API keys):
  the tenant's counters and segment-tree summary, which hold digests and
  counts, never prompt text.

With API keys the page asks for a key and keeps it in the tab's
sessionStorage; ``/dashboard#key=<key>`` stores it too and then drops the
fragment from the address bar.
"""

from __future__ import annotations

import html
from importlib.resources import files
from typing import Any

from prometheus_client.metrics import MetricWrapperBase

from segcache.server.state import ServerState

_TITLE_MARK = "__SEGCACHE_TITLE__"
# ServerMetrics counters named ``<kind>_tokens``, shown under the same kinds.
_TOKEN_KINDS = ("prompt", "cached", "computed", "completion", "blended", "recomputed")


def dashboard_page(model_name: str) -> str:
    """The page's HTML, titled with the served model's name."""
    page = files("segcache.server").joinpath("dashboard.html").read_text(encoding="utf-8")
    return page.replace(_TITLE_MARK, html.escape(f"segcache: {model_name}"))


def dashboard_numbers(state: ServerState) -> dict[str, Any]:
    """Cache-wide numbers for the page. Blocking (asks the engine): call from a worker thread."""
    metrics = state.metrics
    ttft = _samples(metrics.ttft)
    return {
        "model": state.model_name,
        "auth_required": state.api_keys is not None,
        "cache": state.engine.metrics(),
        "hit_ratio": metrics.hit_ratio(),
        "tokens": {k: _samples(getattr(metrics, f"{k}_tokens"))["total"] for k in _TOKEN_KINDS},
        "generations": ttft["count"],
        "ttft_mean_s": ttft["sum"] / ttft["count"] if ttft["count"] else None,
    }


def _samples(metric: MetricWrapperBase) -> dict[str, float]:
    """An unlabelled counter's or histogram's samples by suffix: ``total``, ``count``, ``sum``."""
    out: dict[str, float] = {}
    for family in metric.collect():
        for sample in family.samples:
            if not sample.labels:
                out[sample.name.removeprefix(family.name).lstrip("_")] = sample.value
    return out
