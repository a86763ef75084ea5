#!/usr/bin/env bash
# Reuse reach for plain requests (issue 16), one run, two servers side by side:
#   A: segcache serve --blend marked (default)   B: segcache serve --blend auto
# Rounds alternate the modes, so every figure of a round sees the same machine:
#   repo-docs --mode segments (marked blocks) on A   -> OUT/repo-docs.segments.rN.json
#   repo-docs --mode flat on A (prefix + partial)    -> OUT/repo-docs.prefix.rN.json
#   repo-docs --mode flat on B (plain text, chunked) -> OUT/repo-docs.flat-auto.rN.json
#   scripts/first_move.py --mode segments on A, --mode flat on B
#   scripts/framework_agents.py on A (OpenAI Agents SDK, three agents, plain requests)
# Environment: OUT (default bench-out/reach-<time>), ROUNDS (2), OBJECTS (16),
# PORT_A (8093), PORT_B (8094), THREADS (2), PARTS ("repo-docs first-move framework": which
# of the three to run). Each timed run starts once both servers are idle.
set -euo pipefail
export COLUMNS=${COLUMNS:-160}
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out/reach-$(date +%Y%m%d-%H%M%S)}
ROUNDS=${ROUNDS:-2}
OBJECTS=${OBJECTS:-16}
PORT_A=${PORT_A:-8093}
PORT_B=${PORT_B:-8094}
THREADS=${THREADS:-2}
PARTS=${PARTS:-repo-docs first-move framework}
part() { [[ " $PARTS " == *" $1 "* ]]; }
SEGCACHE=.venv/bin/segcache
PY=.venv/bin/python
mkdir -p "$OUT"
log() { printf '[reach %s] %s (load %s)\n' "$(date +%H:%M:%S)" "$*" "$(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/log.txt" >&2; }

PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT
serve() {  # port, log, flags...
    local port=$1 logf=$2
    shift 2
    "$SEGCACHE" serve --host 127.0.0.1 --port "$port" --threads "$THREADS" "$@" >"$logf" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 1 600); do
        curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    echo "server on $port did not start" >&2; tail -n 30 "$logf" >&2; exit 1
}
cpu_ticks() { local t=0 p; for p in "${PIDS[@]}"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo "$t"; }
settle() {  # until both servers are idle (background blend jobs of the last run done), at most 120 s
    local a b
    for _ in $(seq 1 120); do
        a=$(cpu_ticks); sleep 1; b=$(cpu_ticks)
        (( b - a < 5 )) && return 0
    done
}
A=http://127.0.0.1:$PORT_A/v1
B=http://127.0.0.1:$PORT_B/v1
serve "$PORT_A" "$OUT/server-marked.log"
serve "$PORT_B" "$OUT/server-auto.log" --blend auto
log "servers up: A (--blend marked) $A, B (--blend auto) $B; commit $(git rev-parse --short HEAD)"
for r in $(seq 1 "$ROUNDS"); do
    part repo-docs || break
    settle
    log "round $r: repo-docs segments (A)"
    "$SEGCACHE" bench repo-docs --url "$A" --mode segments --objects "$OBJECTS" \
        --json "$OUT/repo-docs.segments.r$r.json" >"$OUT/repo-docs.segments.r$r.txt" 2>&1
    settle
    log "round $r: repo-docs flat, prefix only (A)"
    "$SEGCACHE" bench repo-docs --url "$A" --mode flat --objects "$OBJECTS" \
        --json "$OUT/repo-docs.prefix.r$r.json" >"$OUT/repo-docs.prefix.r$r.txt" 2>&1
    settle
    log "round $r: repo-docs flat, --blend auto (B)"
    "$SEGCACHE" bench repo-docs --url "$B" --mode flat --objects "$OBJECTS" \
        --json "$OUT/repo-docs.flat-auto.r$r.json" >"$OUT/repo-docs.flat-auto.r$r.txt" 2>&1
done
for r in $(seq 1 "$ROUNDS"); do
    part repo-docs || break
    "$SEGCACHE" bench table --title "repo-docs round $r" "segments (marked)=$OUT/repo-docs.segments.r$r.json" \
        "flat, --blend auto=$OUT/repo-docs.flat-auto.r$r.json" "flat, prefix only=$OUT/repo-docs.prefix.r$r.json" \
        | tee "$OUT/repo-docs.table.r$r.txt"
done
if part first-move; then
    log "first move, segments (A)"
    $PY scripts/first_move.py --url "$A" --mode segments --rounds 3 --json "$OUT/first-move.segments.json" \
        | tee "$OUT/first-move.segments.txt"
    log "first move, flat (B)"
    $PY scripts/first_move.py --url "$B" --mode flat --rounds 3 --json "$OUT/first-move.flat.json" \
        | tee "$OUT/first-move.flat.txt"
fi
if part framework; then
    log "framework agents (A)"
    curl -sf -X DELETE "$A/cache" >/dev/null
    $PY scripts/framework_agents.py --url "$A" --json "$OUT/framework.json" | tee "$OUT/framework.txt"
fi
log "done"
