#!/usr/bin/env bash
# Builds every plugin (the example and the hostile test plugins) into WebAssembly
# components under target/wasm32-wasip2/release/. Safe to run repeatedly: cargo only
# rebuilds what changed.
#
# Usage: bash plugins/build.sh [extra cargo build arguments]
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

target=wasm32-wasip2
if ! rustup target list --installed | grep -qx "$target"; then
    rustup target add "$target"
fi

# One cargo invocation, so the shared dependencies are compiled once and in parallel.
packages=(-p bank-account)
for manifest in plugins/testing/*/Cargo.toml; do
    packages+=(-p "$(sed -n 's/^name = "\(.*\)"$/\1/p' "$manifest" | head -n 1)")
done

cargo build --release --target "$target" "${packages[@]}" "$@"

out="${CARGO_TARGET_DIR:-$root/target}/$target/release"
echo "components in $out:"
for wasm in "$out"/*.wasm; do
    printf '  %s (%s bytes)\n' "$wasm" "$(wc -c < "$wasm")"
done
