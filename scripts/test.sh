#!/usr/bin/env bash
# Runs every test: installs dependencies, builds the WASM plugins, runs the workspace
# tests (release profile, as everywhere else), then smoke-tests the benchmarks
# (scripts/bench.sh --quick). Exits non-zero on the first failure.
#
# Environment:
#   MERIDIAN_NATS_SERVER_BIN  nats-server for the tests (default: .tools/bin/nats-server)
#   MERIDIAN_SKIP_BENCH       set (to anything but empty) to skip the benchmark smoke run
#   MERIDIAN_TEST_PG          PostgreSQL URL the tests create and drop a database per
#                             test through (default:
#                             postgres://postgres@127.0.0.1:5432/postgres; the role must
#                             be allowed to create databases)
#   MERIDIAN_CHROMIUM         Chromium for the status page test (default: `chromium` or
#                             `chromium-browser` on PATH)
#   MERIDIAN_SCHEMATHESIS     Schemathesis's `st` for the OpenAPI conformance test
#                             (default: .tools/schemathesis/bin/st)
#
# Running tests yourself: once this script (or scripts/install-deps.sh --tests) has
# installed the tools, cargo runs them directly, with the same variables and defaults;
# for one module of the end-to-end tests,
#   cargo test --release -p meridian-host --test e2e status_page::
# Those tests load the components plugins/build.sh builds: run it again after changing
# a plugin.
set -euo pipefail
# rustup's tools, in a shell that has not sourced it (CI, a fresh login).
# shellcheck disable=SC1091
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

step() { printf '\n==> %s\n' "$*"; }
fail() {
    printf '\nFAILED: %s\n' "$*" >&2
    exit 1
}

step "installing dependencies"
bash scripts/install-deps.sh --tests || fail "scripts/install-deps.sh --tests"
# On a fresh machine install-deps has just installed rustup (without touching the
# shell's profile): this shell finds cargo only once it reads rustup's env.
# shellcheck disable=SC1091
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
export MERIDIAN_NATS_SERVER_BIN="${MERIDIAN_NATS_SERVER_BIN:-$REPO/.tools/bin/nats-server}"
[ -x "$MERIDIAN_NATS_SERVER_BIN" ] || fail "no executable nats-server at $MERIDIAN_NATS_SERVER_BIN"

# Databases a test run left behind when it was interrupted (a test drops its own on
# success or failure, not when killed): any not in use now.
psql -w -X -q -h 127.0.0.1 -U postgres -d postgres -Atc \
    "SELECT datname FROM pg_database WHERE datname LIKE 'meridian\_t\_%'
       AND datname NOT IN (SELECT datname FROM pg_stat_activity WHERE datname IS NOT NULL)" \
    2>/dev/null | while read -r db; do
        psql -w -X -q -h 127.0.0.1 -U postgres -d postgres -c "DROP DATABASE IF EXISTS \"$db\"" >/dev/null 2>&1 || true
    done || true

step "building plugins"
bash plugins/build.sh || fail "plugins/build.sh"

step "cargo test --release --workspace"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
# Every test binary runs even after one fails, so the totals cover the whole suite.
cargo test --release --workspace --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# Sum cargo's per-binary "test result:" lines into one total for the closing line.
read -r passed failed ignored < <(
    awk '/^test result:/ {
            for (i = 1; i <= NF; i++) {
                if ($i ~ /^passed;?$/) p += $(i - 1)
                if ($i ~ /^failed;?$/) f += $(i - 1)
                if ($i ~ /^ignored;?$/) g += $(i - 1)
            }
        }
        END { printf "%d %d %d\n", p, f, g }' "$log"
)
if [ "$status" -ne 0 ]; then
    printf '\ntests: %d passed, %d failed, %d skipped\n' "$passed" "$failed" "$ignored"
    fail "cargo test (exit $status)"
fi

if [ -z "${MERIDIAN_SKIP_BENCH:-}" ] && [ -f scripts/bench.sh ]; then
    step "benchmark smoke run (scripts/bench.sh --quick)"
    bash scripts/bench.sh --quick || fail "scripts/bench.sh --quick"
fi

printf '\nALL TESTS PASSED\n'
printf 'tests: %d passed, %d failed, %d skipped\n' "$passed" "$failed" "$ignored"
