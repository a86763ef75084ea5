#!/usr/bin/env bash
# Scale-out, real (issue 18): for each routing policy a fresh 2-replica fleet on Ray Serve
# (`segcache serve --replicas 2 --cpus-per-replica 1 --routing P`), then the multi-agent
# workload against it (`segcache bench multi-agent --keep-cache`), one policy after another.
#   scripts/ray_policies.sh OUT_DIR [POLICIES]   (default: "prefix round-robin ray-prefix")
# Prints prompt tokens computed, hit rate and TTFT sum/median per policy.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "$1"); POLICIES=${2:-prefix round-robin ray-prefix}
PORT=${PORT:-8495}
export RAY_AUTH_MODE=disabled COLUMNS=${COLUMNS:-200}
mkdir -p "$OUT"
for p in $POLICIES; do
    echo "== $p $(date +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
    .venv/bin/segcache serve --port "$PORT" --replicas 2 --cpus-per-replica 1 --routing "$p" \
        >"$OUT/ray-$p.serve.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 600); do curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null 2>&1 && break; sleep 1; done
    .venv/bin/segcache bench multi-agent --url "http://127.0.0.1:$PORT/v1" --keep-cache \
        --json "$OUT/ray-$p.json" >"$OUT/ray-$p.txt" 2>&1
    kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true
    .venv/bin/ray stop --force >/dev/null 2>&1 || true
done
.venv/bin/python - "$OUT" $POLICIES <<'PYEOF'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"{'policy':12} {'computed':>9} {'hit':>6} {'TTFT sum s':>11} {'median ms':>10}")
for p in sys.argv[2:]:
    recs = json.loads((out / f"ray-{p}.json").read_text())["records"]
    prompt = sum(r["prompt_tokens"] for r in recs); cached = sum(r["cached_tokens"] for r in recs)
    t = [r["ttft_s"] for r in recs]
    print(f"{p:12} {prompt - cached:9d} {cached / prompt:6.0%} {sum(t):11.2f} {statistics.median(t) * 1000:10.0f}")
PYEOF
