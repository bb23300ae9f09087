#!/usr/bin/env bash
# The relay-lag benchmark between two regions on this machine: two nats-servers (JetStream
# domains `east`, the hub, and `west`, its leafnode), two databases, one host per region.
# meridian-relay-lag measures east's maximum command rate (64 clients, closed loop), sends
# at half of it for a while, and reads from west's database how long each event took
# from its commit in east to being stored in west. scripts/bench.sh runs it; alone:
#
#   bash plugins/build.sh && cargo build --release -p meridian-host -p meridian-bench
#   bash scripts/bench-relay.sh target/bench-relay            # ≈ 2 minutes
#   bash scripts/bench-relay.sh target/bench-relay --quick    # ≈ 30 seconds
#   python3 bench/report.py target/bench-relay BENCHMARKS.md "bash scripts/bench-relay.sh"
#
# Then east's nats-server is killed and started again 5 s into a steady 100 commands/s:
# the largest lag of that window is how long the relay takes to recover from a NATS
# restart in the region the events come from.
#
# Results in <out>/relay.json and <out>/relay-restart.json; logs under <out>/relay/.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
source scripts/bench-lib.sh

out="${1:?usage: bench-relay.sh OUT_DIR [--quick]}"
if [ "${2:-}" = "--quick" ]; then
    relay_args=(--accounts 500 --max-duration 2s --max-warmup 1s --duration 3s)
    restart_args=(--accounts 50 --rate 100 --duration 10s)
else
    relay_args=(--accounts 2000 --max-duration 5s --max-warmup 2s --duration 30s)
    restart_args=(--accounts 200 --rate 100 --duration 40s)
fi
mkdir -p "$out"
rm -rf "$out/relay"

PG="${MERIDIAN_BENCH_PG:-postgres://postgres@127.0.0.1:5432}"
db="meridian_relay_$$"
nats_bin="${MERIDIAN_NATS_SERVER_BIN:-$REPO/.tools/bin/nats-server}"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for region in east west; do
        psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS ${db}_$region WITH (FORCE)" >/dev/null 2>&1 || true
    done
}
trap cleanup EXIT

# One nats-server per region, each its own JetStream domain; west is a leafnode of east.
leaf_port=$(free_port)
declare -A nats_port http_port nats_pid
start_nats() {
    local region=$1
    "$nats_bin" -c "$out/relay/$region/nats.conf" >>"$out/relay/$region/nats.log" 2>&1 &
    nats_pid[$region]=$!
    pids+=($!)
    for _ in $(seq 1 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/${nats_port[$region]}") 2>/dev/null && break
        sleep 0.1
    done
}
for region in east west; do
    nats_port[$region]=$(free_port)
    http_port[$region]=$(free_port)
    mkdir -p "$out/relay/$region"
    if [ "$region" = east ]; then
        leaf="leafnodes { listen: \"127.0.0.1:$leaf_port\" }"
    else
        leaf="leafnodes { remotes: [ { url: \"nats-leaf://127.0.0.1:$leaf_port\" } ] }"
    fi
    printf 'server_name: %s\nlisten: "127.0.0.1:%s"\njetstream { domain: %s, store_dir: "%s" }\n%s\n' \
        "$region" "${nats_port[$region]}" "$region" "$out/relay/$region/jetstream" "$leaf" \
        >"$out/relay/$region/nats.conf"
    start_nats "$region"
done

for region in east west; do
    peer=west; [ "$region" = west ] && peer=east
    psql "$PG/postgres" -qc "CREATE DATABASE ${db}_$region" >/dev/null
    MERIDIAN_DATABASE_URL="$PG/${db}_$region" MERIDIAN_HTTP_ADDR="127.0.0.1:${http_port[$region]}" \
    MERIDIAN_NODE_ID="bench-$region" MERIDIAN_REGION=$region MERIDIAN_PEER_REGIONS=$peer \
    MERIDIAN_DIRECTORY_REGION=east MERIDIAN_NATS_URL="nats://127.0.0.1:${nats_port[$region]}" \
    MERIDIAN_LOG=warn target/release/meridian host >"$out/relay/host-$region.log" 2>&1 &
    pids+=($!)
done
for region in east west; do
    wait_ready "http://127.0.0.1:${http_port[$region]}" "$out/relay/host-$region.log"
done

target/release/meridian plugin upload bank-account target/wasm32-wasip2/release/bank_account.wasm \
    --url "http://127.0.0.1:${http_port[east]}" >/dev/null
# The plugin reaches west through the directory and east's object store.
synced=""
for _ in $(seq 1 300); do
    curl -sf "http://127.0.0.1:${http_port[west]}/v1/plugins" | grep -q '"bank-account"' && synced=1 && break
    sleep 0.1
done
[ -n "$synced" ] || { echo "the plugin did not reach west; see $out/relay/host-west.log" >&2; exit 1; }

target/release/meridian-relay-lag --url "http://127.0.0.1:${http_port[east]}" \
    --origin-database-url "$PG/${db}_east" --receiver-database-url "$PG/${db}_west" \
    "${relay_args[@]}" --json "$out/relay.json"

# Recovery from a NATS restart in the origin region: kill east's nats-server 5 s into the
# steady window, start it again a second later (same store), and let the window run on.
target/release/meridian-relay-lag --url "http://127.0.0.1:${http_port[east]}" \
    --origin-database-url "$PG/${db}_east" --receiver-database-url "$PG/${db}_west" \
    "${restart_args[@]}" --json "$out/relay-restart.json" >"$out/relay/restart.out" 2>&1 &
lag_pid=$!
for _ in $(seq 1 600); do
    grep -q '^steady:' "$out/relay/restart.out" 2>/dev/null && break
    kill -0 "$lag_pid" 2>/dev/null || break
    sleep 0.1
done
sleep 5
kill "${nats_pid[east]}" && wait "${nats_pid[east]}" 2>/dev/null || true
sleep 1
start_nats east
status=0
wait "$lag_pid" || status=$?
cat "$out/relay/restart.out"
exit "$status"
