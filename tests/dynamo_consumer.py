"""A real KV-event consumer: Dynamo's ``SelectionService`` (ai-dynamo-runtime), the
runtime-free core of Dynamo's KV router, run in its own interpreter (the package pins
an older pydantic than the server's, so it lives in a venv of its own; see
tests/test_kv_events_dynamo.py). No segcache import: this is what a Dynamo deployment
runs against segcache replicas.

Protocol, one JSON object per line:
  stdin  {"workers": [{"worker_id", "kv_events_endpoint", "replay_endpoint"}, ...],
          "model": NAME, "block_size": N}
  stdout {"ready": true} once every worker is registered and its listener is up;
  stdin  {"token_ids": [...], "expect": {"<worker_id>": blocks, ...}, "timeout": s}
  stdout {"overlap": <overlap_scores answer>, "select": <select answer>} once every
         worker's score equals ``expect`` (or at the timeout, with what it has).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from dynamo.llm import SelectionService


def _blocks(overlap: dict) -> dict[str, int]:
    """Blocks matched per worker, on whichever medium the worker announced them."""
    return {str(w["worker_id"]): max(w["device_blocks"], w["host_pinned_blocks"])
            for w in overlap["workers"]}


async def main() -> None:
    setup = json.loads(sys.stdin.readline())
    service = SelectionService(indexer_threads=1)
    try:
        for w in setup["workers"]:
            record = await service.upsert_worker({
                "worker_id": w["worker_id"], "model_name": setup["model"], "block_size": setup["block_size"],
                "endpoint": f"http://replica-{w['worker_id']}.invalid/v1",
                "kv_events_endpoint": w["kv_events_endpoint"], "replay_endpoint": w["replay_endpoint"]})
            if record.get("lifecycle") != "schedulable":
                raise SystemExit(f"worker {w['worker_id']} not schedulable: {record}")
        await asyncio.sleep(0.5)  # the SUB sockets' subscriptions reach the publishers
        print(json.dumps({"ready": True}), flush=True)
        query = json.loads(sys.stdin.readline())
        request = {"model_name": setup["model"], "token_ids": query["token_ids"]}
        deadline = time.monotonic() + query.get("timeout", 20)
        while True:
            overlap = await service.overlap_scores(request)
            if _blocks(overlap) == query["expect"] or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        selected = await service.select(request)
        print(json.dumps({"overlap": overlap, "blocks": _blocks(overlap), "select": selected}), flush=True)
    finally:
        service.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
