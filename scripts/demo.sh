#!/usr/bin/env bash
# Starts the whole local platform: dependencies, plugins, a release build of the host,
# then `meridian dev` (arguments are passed through).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

bash scripts/install-deps.sh
export MERIDIAN_NATS_SERVER_BIN="${MERIDIAN_NATS_SERVER_BIN:-$REPO/.tools/bin/nats-server}"
bash plugins/build.sh
cargo build --release -p meridian-host
exec target/release/meridian dev "$@"
