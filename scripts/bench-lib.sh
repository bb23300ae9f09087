# Helpers the benchmark scripts share; sourced, not run.

# Prints a TCP port on 127.0.0.1 that is free right now.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Waits up to 30 s for the host at $1 (a base URL) to answer /readyz; exits the script,
# pointing at the log $2, if it does not.
wait_ready() {
    local url=$1 log=$2
    for _ in $(seq 1 300); do
        curl -sf "$url/readyz" >/dev/null && return 0
        sleep 0.1
    done
    echo "the host at $url did not become ready; see $log" >&2
    exit 1
}
