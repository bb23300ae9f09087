#!/usr/bin/env bash
# Memory per cached aggregate: one host on a fresh database, alone in its region (so it
# owns every partition), with MERIDIAN_CACHE_CAPACITY above the number of accounts.
# meridian-cache-memory bulk-loads the accounts with SQL (one `Opened` event each, the
# rows the host writes for an Open), warms the host up, reads its RSS, has it load and
# cache every account through GET /v1/aggregates/bank-account/{id} (64 at a time) and
# reads its RSS again. scripts/bench.sh runs it; alone:
#
#   bash plugins/build.sh && cargo build --release -p meridian-host -p meridian-bench
#   bash scripts/bench-cache.sh target/bench-cache            # 1,000,000 accounts, ≈ 4 minutes
#   bash scripts/bench-cache.sh target/bench-cache --quick    # 20,000 accounts, ≈ 10 seconds
#   python3 bench/report.py target/bench-cache BENCHMARKS.md "bash scripts/bench-cache.sh"
#
# Results in <out>/cache.json; the host's log in <out>/cache-host.log.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
source scripts/bench-lib.sh

out="${1:?usage: bench-cache.sh OUT_DIR [--quick]}"
aggregates=1000000
[ "${2:-}" = "--quick" ] && aggregates=20000
warmup=2000
mkdir -p "$out"

PG="${MERIDIAN_BENCH_PG:-postgres://postgres@127.0.0.1:5432}"
db="meridian_cache_$$"
host_pid=""
cleanup() {
    [ -n "$host_pid" ] && kill "$host_pid" 2>/dev/null || true
    wait 2>/dev/null || true
    psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
}
trap cleanup EXIT

psql "$PG/postgres" -qc "CREATE DATABASE $db" >/dev/null
port=$(free_port)
# Room for the warm-up, the measured accounts and a few more: nothing may be evicted.
MERIDIAN_DATABASE_URL="$PG/$db" MERIDIAN_HTTP_ADDR="127.0.0.1:$port" MERIDIAN_NODE_ID=bench-cache \
MERIDIAN_CACHE_CAPACITY=$((aggregates + warmup + 10000)) \
MERIDIAN_LOG=warn target/release/meridian host >"$out/cache-host.log" 2>&1 &
host_pid=$!
wait_ready "http://127.0.0.1:$port" "$out/cache-host.log"
target/release/meridian plugin upload bank-account target/wasm32-wasip2/release/bank_account.wasm \
    --url "http://127.0.0.1:$port" >/dev/null
# No time limit on the run: 1,000,000 accounts take a few minutes to insert and as many
# to load through HTTP on a shared two-core machine.
target/release/meridian-cache-memory --url "http://127.0.0.1:$port" --pid "$host_pid" \
    --database-url "$PG/$db" --aggregates "$aggregates" --warmup "$warmup" --concurrency 64 \
    --json "$out/cache.json"
