#!/usr/bin/env bash
# Starts the whole local platform: dependencies, plugins, a release build of the host,
# then `meridian dev` (arguments are passed through).
set -euo pipefail
# rustup's tools, in a shell that has not sourced it (CI, a fresh login).
# shellcheck disable=SC1091
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

bash scripts/install-deps.sh
# On a fresh machine install-deps has just installed rustup (without touching the
# shell's profile): this shell finds cargo only once it reads rustup's env.
# shellcheck disable=SC1091
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
export MERIDIAN_NATS_SERVER_BIN="${MERIDIAN_NATS_SERVER_BIN:-$REPO/.tools/bin/nats-server}"
bash plugins/build.sh
cargo build --release -p meridian-host
TARGET="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
# The example plugin unless the arguments name another.
plugin=(--plugin "$TARGET/wasm32-wasip2/release/bank_account.wasm")
for arg in "$@"; do
    case "$arg" in
        --plugin | --plugin=*) plugin=() ;;
    esac
done
exec "$TARGET/release/meridian" dev "${plugin[@]}" "$@"
