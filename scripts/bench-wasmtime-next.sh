#!/usr/bin/env bash
# Times bank-account's `execute` on bare wasmtime instances under the host's wasmtime
# release and under a newer one, alternately, next to native code: would upgrading
# wasmtime close the gap between the plugin runtime and native code? (BENCHMARKS.md,
# "WASM vs native".)
#
#   bash scripts/bench-wasmtime-next.sh [VERSION [TOOLCHAIN]]
#
# VERSION defaults to 50.0.1 (wasmtime-wasi, which must match, was not yet released at
# 51 when this was written); TOOLCHAIN is the rustup toolchain that builds it
# (default nightly: wasmtime 49 and later need Rust 1.96, newer than the workspace's).
# Each version is built as a crate of its own under target/wasmtime-next/ from
# bench/wasmtime-next/main.rs and bench/src/bare_call.rs; the first build of each takes
# ≈ 9 minutes on two cores. Not part of the test suite.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
next="${1:-50.0.1}"
toolchain="${2:-nightly}"
current="$(awk '/^name = "wasmtime"$/ { getline; gsub(/[^0-9.]/, ""); print; exit }' Cargo.lock)"

bash plugins/build.sh >/dev/null

# Writes the crate for wasmtime $1 into target/wasmtime-next/$1.
assemble() {
    local dir="target/wasmtime-next/$1"
    mkdir -p "$dir/src"
    cat >"$dir/Cargo.toml" <<TOML
[package]
name = "wasmtime-next"
version = "0.0.0"
edition = "2024"
publish = false

[dependencies]
wasmtime = { version = "=$1", default-features = false, features = ["cranelift", "component-model", "runtime", "std", "async"] }
wasmtime-wasi = { version = "=$1", default-features = false, features = ["p2"] }
tokio = { version = "1", features = ["rt", "macros"] }
anyhow = "1"
meridian-guest = { path = "$REPO/guest-sdk" }
bank-account = { path = "$REPO/plugins/bank-account" }

[profile.release]
codegen-units = 16

[workspace]
TOML
    cp bench/wasmtime-next/main.rs "$dir/src/main.rs"
    # bindgen! resolves its WIT path from the crate's own folder.
    sed "s#\"../guest-sdk/wit\"#\"$REPO/guest-sdk/wit\"#" bench/src/bare_call.rs >"$dir/src/bare_call.rs"
}

assemble "$current"
assemble "$next"
cargo build --release --quiet --manifest-path "target/wasmtime-next/$current/Cargo.toml"
cargo "+$toolchain" build --release --quiet --manifest-path "target/wasmtime-next/$next/Cargo.toml"

# One core for both, alternating, so that both meet the same machine.
pin=()
command -v taskset >/dev/null && pin=(taskset -c 1)
wasm=target/wasm32-wasip2/release/bank_account.wasm
for _ in 1 2; do
    for version in "$current" "$next"; do
        "${pin[@]}" "target/wasmtime-next/$version/target/release/wasmtime-next" "$wasm" "wasmtime $version"
    done
done
