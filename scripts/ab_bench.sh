#!/usr/bin/env bash
# Before/after on one host, alternated: `segcache bench engine` and the multi-agent workload
# for two source trees (A, B), run A B A B ... so host drift weighs on both alike.
#   scripts/ab_bench.sh A_DIR B_DIR OUT_DIR [ROUNDS]
# Both trees run with this repo's .venv (PYTHONPATH points at each tree). Engine: prefill
# @512/@2048 in the server's chunks and decode @2048, no transformers reference; the
# multi-agent workload runs against a fresh `segcache serve` of each tree (cache cold).
set -euo pipefail
A=$(realpath "$1"); B=$(realpath "$2"); OUT=$(realpath -m "$3"); ROUNDS=${4:-2}
PY="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python"
mkdir -p "$OUT"
port=8471
for r in $(seq 1 "$ROUNDS"); do
  for side in A B; do
    dir=${!side}
    echo "== round $r $side ($dir) $(date +%H:%M:%S) load $(cut -d' ' -f1 /proc/loadavg)"
    (cd "$dir" && PYTHONPATH="$dir" "$PY" -m segcache.cli bench engine --no-reference \
        --sizes 512,2048 --repeats 3 --json "$OUT/engine-$side-$r.json" | tail -8)
    (cd "$dir" && PYTHONPATH="$dir" exec "$PY" -m segcache.cli serve --port $port >"$OUT/serve-$side-$r.log" 2>&1) &
    pid=$!
    for _ in $(seq 1 120); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 1; done
    (cd "$dir" && PYTHONPATH="$dir" "$PY" -m segcache.cli bench multi-agent --url "http://127.0.0.1:$port/v1" \
        --json "$OUT/multi-$side-$r.json" | tail -4)
    kill "$pid" 2>/dev/null || true; wait "$pid" || true
  done
done
"$PY" - "$OUT" "$ROUNDS" <<'PYEOF'
import json, statistics, sys
from pathlib import Path
out, rounds = Path(sys.argv[1]), int(sys.argv[2])
def eng(side, r): return json.loads((out / f"engine-{side}-{r}.json").read_text())["tokens_per_s"]["segcache"]
def multi(side, r):
    d = json.loads((out / f"multi-{side}-{r}.json").read_text())
    t = [x["ttft_s"] for x in d["records"] if x.get("ttft_s") is not None]
    return sum(t), statistics.median(t)
keys = list(eng("A", 1))
print(f"{'figure':24} {'A':>10} {'B':>10} {'B/A':>7}")
for k in keys:
    a = statistics.median(eng("A", r)[k] for r in range(1, rounds + 1))
    b = statistics.median(eng("B", r)[k] for r in range(1, rounds + 1))
    print(f"{k + ' tok/s':24} {a:10.1f} {b:10.1f} {b / a:7.3f}")
for i, name in enumerate(("multi-agent TTFT sum s", "multi-agent TTFT median s")):
    a = statistics.median(multi("A", r)[i] for r in range(1, rounds + 1))
    b = statistics.median(multi("B", r)[i] for r in range(1, rounds + 1))
    print(f"{name:24} {a:10.3f} {b:10.3f} {b / a:7.3f}")
PYEOF
