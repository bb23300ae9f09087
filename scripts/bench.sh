#!/usr/bin/env bash
# Runs the benchmarks in one go on this machine and rewrites the tables in BENCHMARKS.md.
#
#   bash scripts/bench.sh           full run (~20 minutes), rewrites BENCHMARKS.md
#   bash scripts/bench.sh --quick   smoke run (< 5 minutes), results under target/bench-quick/
#
# The peers (bench-lock-peer, bench-cqrs-peer) run after the single Meridian host, on
# the same database with the same load. Every system shares this machine's cores with
# the load generator and PostgreSQL; commits are durable (synchronous_commit on, fsync
# on) everywhere.
set -euo pipefail
# rustup's tools, in a shell that has not sourced it (CI, a fresh login).
# shellcheck disable=SC1091
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
source scripts/bench-lib.sh

quick=""
case "$#:${1:-}" in
    0:) ;;
    1:--quick) quick=1 ;;
    *)
        # A typo must not start the 20-minute run that rewrites BENCHMARKS.md.
        echo "usage: bash scripts/bench.sh [--quick]" >&2
        exit 2
        ;;
esac

if [ -n "$quick" ]; then
    out="$REPO/target/bench-quick"
    duration=2s; warmup=1s; accounts=1000; levels=1,16,64,256
    runtime_commands=20000; replay_events=20000; raw_duration=3s
    language_commands=2000
else
    out="$REPO/target/bench"
    duration=10s; warmup=2s; accounts=10000; levels=1,16,64,256
    runtime_commands=200000; replay_events=100000; raw_duration=10s
    language_commands=20000
fi
rm -rf "$out"; mkdir -p "$out"

bash scripts/install-deps.sh >/dev/null
# On a fresh machine install-deps has just installed rustup (without touching the
# shell's profile): this shell finds cargo only once it reads rustup's env.
# shellcheck disable=SC1091
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
bash plugins/build.sh >/dev/null
cargo build --release -p meridian-host -p meridian-bench

PG="${MERIDIAN_BENCH_PG:-postgres://postgres@127.0.0.1:5432}"
db="meridian_bench_$$"
psql "$PG/postgres" -qc "CREATE DATABASE $db" >/dev/null
pids=()
ports=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
}
trap cleanup EXIT

echo "==> WASM vs native (bank-account)"
target/release/meridian-runtime-bench --wasm target/wasm32-wasip2/release/bank_account.wasm \
    --commands "$runtime_commands" --replay-events "$replay_events" --json "$out/runtime.json"

echo "==> bank-account in Rust, Python and JavaScript (cold start, size, per command)"
wasm=target/wasm32-wasip2/release
target/release/meridian-runtime-bench --language "rust=$wasm/bank_account.wasm" \
    --language "python=$wasm/bank_account_py.wasm" --language "javascript=$wasm/bank_account_js.wasm" \
    --commands "$language_commands" --replay-events "$language_commands" --json "$out/languages.json"

echo "==> raw batched INSERT ceiling"
target/release/meridian-raw-insert --database-url "$PG/$db" --clients 8 --batch 100 \
    --duration "$raw_duration" --json "$out/raw.json"

echo "==> one Meridian host"
port=$(free_port)
MERIDIAN_DATABASE_URL="$PG/$db" MERIDIAN_HTTP_ADDR="127.0.0.1:$port" MERIDIAN_NODE_ID=bench-1 \
MERIDIAN_LOG=warn target/release/meridian host >"$out/host-1.log" 2>&1 &
pids+=($!)
wait_ready "http://127.0.0.1:$port" "$out/host-1.log"
target/release/meridian plugin upload bank-account target/wasm32-wasip2/release/bank_account.wasm \
    --url "http://127.0.0.1:$port" >/dev/null
target/release/meridian-load --url "http://127.0.0.1:$port" --accounts "$accounts" \
    --concurrency "$levels" --duration "$duration" --warmup "$warmup" --json "$out/single.json"
peak_kb=$(awk '/VmHWM/ {print $2}' "/proc/${pids[0]}/status" 2>/dev/null || echo 0)

# Runs one comparison service on a free port against the same database, drives it with
# the same load, and leaves its peak RSS (KiB) in $peak.
run_peer() {
    local title=$1 bin=$2 name=$3
    echo "==> peer: $title"
    local peer_port peer_pid
    peer_port=$(free_port)
    "target/release/$bin" --database-url "$PG/$db" --http-addr "127.0.0.1:$peer_port" --reset \
        >"$out/$name.log" 2>&1 &
    peer_pid=$!
    pids+=("$peer_pid")
    wait_ready "http://127.0.0.1:$peer_port" "$out/$name.log"
    target/release/meridian-load --url "http://127.0.0.1:$peer_port" --accounts "$accounts" \
        --concurrency "$levels" --duration "$duration" --warmup "$warmup" --json "$out/$name.json"
    peak=$(awk '/VmHWM/ {print $2}' "/proc/$peer_pid/status" 2>/dev/null || echo 0)
    kill "$peer_pid" 2>/dev/null || true
    wait "$peer_pid" 2>/dev/null || true
}
run_peer "lock-per-command (advisory lock, load, fold, insert, commit; same database)" bench-lock-peer lockpeer
peer_peak_kb=$peak
run_peer "cqrs-es + postgres-es (load, handle, optimistic commit; same database)" bench-cqrs-peer cqrspeer
cqrs_peak_kb=$peak
echo "{\"host_peak_rss_kb\": $peak_kb, \"lockpeer_peak_rss_kb\": $peer_peak_kb, \"cqrspeer_peak_rss_kb\": $cqrs_peak_kb}" \
    >"$out/memory.json"

echo "==> a three-host region (same machine, same database)"
for n in 2 3; do
    p=$(free_port)
    MERIDIAN_DATABASE_URL="$PG/$db" MERIDIAN_HTTP_ADDR="127.0.0.1:$p" MERIDIAN_NODE_ID="bench-$n" \
    MERIDIAN_LOG=warn target/release/meridian host >"$out/host-$n.log" 2>&1 &
    pids+=($!)
    ports+=("$p")
done
urls=(--url "http://127.0.0.1:$port")
for n in 2 3; do
    p=${ports[$((n - 2))]}
    wait_ready "http://127.0.0.1:$p" "$out/host-$n.log"
    urls+=(--url "http://127.0.0.1:$p")
done
# Let the partitions settle on their new owners before measuring.
sleep 3
target/release/meridian-load "${urls[@]}" --accounts "$accounts" \
    --concurrency 64,256 --duration "$duration" --warmup "$warmup" --json "$out/region3.json"

echo "==> live streams: 100 SSE streams, 200 deposits/s, streams on the commands' host and on another one; then 10 streams, 5 deposits/s"
stream_duration=10s
[ -n "$quick" ] && stream_duration=2s
target/release/meridian-stream-lag --url "http://127.0.0.1:$port" --streams 100 --rate 200 \
    --duration "$stream_duration" --json "$out/stream-same.json"
target/release/meridian-stream-lag --url "http://127.0.0.1:$port" --stream-url "http://127.0.0.1:${ports[0]}" \
    --streams 100 --rate 200 --duration "$stream_duration" --json "$out/stream-other.json"
# A quiet region: each commit is alone, so a stream on another host learns of it only
# from the committing host's announcement (or, without one, its own idle poll).
target/release/meridian-stream-lag --url "http://127.0.0.1:$port" --stream-url "http://127.0.0.1:${ports[0]}" \
    --streams 10 --rate 5 --duration "$stream_duration" --json "$out/stream-quiet.json"

echo "==> two regions: relay lag at half of east's maximum rate, then through a NATS restart"
# The earlier hosts stop first so they don't compete for the cores.
for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
wait 2>/dev/null || true
pids=()
bash scripts/bench-relay.sh "$out" ${quick:+--quick}

echo "==> memory per cached aggregate (one host, fresh database; quick: 20,000, full: 1,000,000 accounts)"
bash scripts/bench-cache.sh "$out" ${quick:+--quick}

if [ -n "$quick" ]; then
    echo "quick benchmark run finished; results in $out"
    exit 0
fi

python3 bench/report.py "$out" BENCHMARKS.md "bash scripts/bench.sh"
echo "BENCHMARKS.md updated"
