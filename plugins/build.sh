#!/usr/bin/env bash
# Builds every plugin (the examples and the hostile test plugins) into WebAssembly
# components under target/wasm32-wasip2/release/: the Rust crates with cargo,
# bank_account_py.wasm from plugins/bank-account-py with componentize-py, and
# bank_account_js.wasm from plugins/bank-account-js with componentize-js. Installs the
# Python and JavaScript toolchains first when they are missing (scripts/install-deps.sh
# --plugin-toolchains). Safe to run repeatedly: cargo only rebuilds what changed, and the
# Python and JavaScript components (10-20 s each) only when their sources, the WIT or the
# toolchain changed.
#
# Usage: bash plugins/build.sh [extra cargo build arguments]
set -euo pipefail
# rustup's tools, in a shell that has not sourced it (CI, a fresh login).
# shellcheck disable=SC1091
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

target=wasm32-wasip2
if ! rustup target list --installed | grep -qx "$target"; then
    rustup target add "$target"
fi

# One cargo invocation for the test plugins, so the shared dependencies are compiled
# once and in parallel.
packages=()
for manifest in plugins/testing/*/Cargo.toml; do
    packages+=(-p "$(sed -n 's/^name = "\(.*\)"$/\1/p' "$manifest" | head -n 1)")
done

# Whole-program optimisation (one codegen unit, fat LTO) makes the components faster
# and smaller; set here rather than in the workspace profile, which the host shares and
# would take minutes longer to build. Plugin authors set the same in their own
# Cargo.toml (docs/writing-aggregates.md).
export CARGO_PROFILE_RELEASE_LTO=fat CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1
cargo build --release --target "$target" "${packages[@]}" "$@"
# Cargo skips LTO for a library that is also built as an rlib, and bank-account is one
# (the native benchmark links it), so its component is built as a cdylib alone.
cargo rustc --release --target "$target" -p bank-account --crate-type cdylib

out="${CARGO_TARGET_DIR:-$root/target}/$target/release"

bash scripts/install-deps.sh --plugin-toolchains >/dev/null
# Where the system's Node.js is too old for componentize-js, install-deps put one here.
if [ -x "$root/.tools/node/bin/node" ]; then
    export PATH="$root/.tools/node/bin:$PATH"
fi

# Runs "$@" (a build that writes $wasm) unless $wasm exists and was built from inputs
# with the same digest: the files under the directories and files named in $inputs.
build_if_changed() {
    local wasm=$1 inputs=$2
    shift 2
    local digest
    # shellcheck disable=SC2086 # $inputs is a list of paths
    digest="$(find $inputs -type f -not -path '*/node_modules/*' -not -name '*.pyc' -print0 \
        | sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)"
    if [ -f "$wasm" ] && [ "$(cat "$wasm.inputs" 2>/dev/null)" = "$digest" ]; then
        return
    fi
    echo "building $(basename "$wasm")"
    "$@"
    printf '%s\n' "$digest" >"$wasm.inputs"
}

py_tool="$root/.tools/componentize-py"
build_if_changed "$out/bank_account_py.wasm" \
    "plugins/bank-account-py guest-sdk/wit-0.1.0 $py_tool/pyvenv.cfg scripts/install-deps.sh" \
    "$py_tool/bin/componentize-py" -d guest-sdk/wit-0.1.0 -w aggregate componentize \
    -p plugins/bank-account-py bank_account -o "$out/bank_account_py.wasm"

build_if_changed "$out/bank_account_js.wasm" \
    "plugins/bank-account-js guest-sdk/wit-0.1.0" \
    node plugins/bank-account-js/build.mjs "$out/bank_account_js.wasm"

echo "components in $out:"
for wasm in "$out"/*.wasm; do
    printf '  %s (%s bytes)\n' "$wasm" "$(wc -c < "$wasm")"
done
