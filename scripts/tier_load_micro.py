"""Micro-bench of the lower tiers' load path alone (no model, no server).

What a full hit from disk or Redis costs besides the request's own work: for each
of ``--nodes`` nodes of SmolLM2-135M's KV shape ([30, 2, 3, tokens, 64] float16),
``TieredStore.fetch`` (read, header and key checks, checksum), the engine's
``handle_of`` (the node's tensor) and the copy into a fresh request buffer, as
``Tiering._promote`` does after a restart. The nodes are written first (disk:
a temporary folder, no fsync; Redis: ``redis-server`` from PATH on a free port).
Prints the median wall time per full load and its rate. A figure on a shared
machine is rough: run it alone, and A/B two revisions by alternating runs.

    python scripts/tier_load_micro.py --tokens 1130 --nodes 4 --repeat 7
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from segcache.engine.tiering import handle_of, kv_data  # noqa: E402
from segcache.kv.hashing import namespace_digest, segment_digest  # noqa: E402
from segcache.kv.tiers import CacheKey, DiskTier, Expected, TieredStore, token_digest  # noqa: E402
from segcache.kv.tiers.redis_tier import RedisTier  # noqa: E402
from tests.tier_helpers import RedisServer  # noqa: E402

LAYOUT, FP = "micro", "sha256:" + "f" * 64


def make_nodes(n_nodes: int, tokens: int) -> list[tuple[Expected, torch.Tensor]]:
    ns = namespace_digest("micro", FP)
    parent, out = ns, []
    for i in range(n_nodes):
        key = CacheKey.child(ns, FP, parent, segment_digest(f"segment {i}"))
        parent = key.chain
        kv = torch.randn(30, 2, 3, tokens, 64).to(torch.float16)  # [layers, 2, kv_heads, tokens, head_dim]
        out.append((Expected(key, LAYOUT, token_digest(range(i * tokens, (i + 1) * tokens))), kv))
    return out


def load_all(store: TieredStore, nodes: list[tuple[Expected, torch.Tensor]]) -> float:
    tokens = nodes[0][1].shape[3]
    buf = torch.empty(30, 2, 3, len(nodes) * tokens + 256, 64, dtype=torch.float16)  # fresh, as after a restart
    t0 = time.perf_counter()
    for i, (expect, _) in enumerate(nodes):
        fetched = store.fetch(expect)
        buf[:, :, :, i * tokens:(i + 1) * tokens] = handle_of(fetched.kv)
    wall = time.perf_counter() - t0
    for i, (_, kv) in enumerate(nodes):
        assert torch.equal(buf[:, :, :, i * tokens:(i + 1) * tokens], kv)
    return wall


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1130, help="tokens per node (default: %(default)s)")
    p.add_argument("--nodes", type=int, default=4, help="nodes per load (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=7, help="loads per tier, the median printed")
    p.add_argument("--tiers", default="disk,redis", help="comma-separated: disk, redis")
    args = p.parse_args()
    nodes = make_nodes(args.nodes, args.tokens)
    total = sum(kv.numel() * kv.element_size() for _, kv in nodes)
    with tempfile.TemporaryDirectory(prefix="segcache-tier-micro-") as tmp:
        stores, redis = {}, None
        for name in args.tiers.split(","):
            if name == "disk":
                stores[name] = TieredStore([DiskTier(Path(tmp) / "disk", 1 << 34, fsync=False)], LAYOUT)
            elif name == "redis":
                redis = RedisServer(Path(tmp))
                redis.start()
                stores[name] = TieredStore([RedisTier(redis.url, 3600)], LAYOUT)
        try:
            for store in stores.values():
                for expect, kv in nodes:
                    store.publish(expect.key, kv_data(kv), expect.token_digest)
                store.flush()
            walls: dict[str, list[float]] = {name: [] for name in stores}
            for _ in range(args.repeat):
                for name, store in stores.items():
                    walls[name].append(load_all(store, nodes))
            for name, ws in walls.items():
                w = statistics.median(ws)
                print(f"{name:5s} {total / 1e6:.0f} MB in {args.nodes} nodes: {w * 1000:.0f} ms median "
                      f"({total / w / 1e9:.2f} GB/s); runs {' '.join(f'{x * 1000:.0f}' for x in ws)}")
        finally:
            for store in stores.values():
                store.close()
            if redis is not None:
                redis.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
