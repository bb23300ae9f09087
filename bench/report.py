"""Rewrites the generated tables of BENCHMARKS.md from a benchmark run's JSON files.

Usage: python3 bench/report.py <results dir> <BENCHMARKS.md> <command>

Only the text between `<!-- BEGIN:name -->` and `<!-- END:name -->` markers is
replaced, so the analysis around the tables stays as written.
"""
import datetime
import json
import os
import re
import sys


def load(directory, name):
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def machine():
    cores = os.cpu_count()
    mem_kb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{cores} cores ({model}), {mem_kb / 1024 / 1024:.0f} GiB memory"


def replace(text, name, body):
    pattern = re.compile(rf"(<!-- BEGIN:{name} -->\n).*?(<!-- END:{name} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"BENCHMARKS.md has no {name} markers")
    return pattern.sub(lambda m: m.group(1) + body.rstrip() + "\n" + m.group(2), text)


def peers_table(single, peers, mem):
    """Meridian (one host) vs each peer, per concurrency level; `peers` is [(name, results)]."""
    by_level = [(name, {level["concurrency"]: level for level in results}) for name, results in peers]
    header = "| clients | Meridian cmd/s |"
    rule = "|---:|---:|"
    for name, _ in by_level:
        header += f" {name} cmd/s | Meridian ÷ {name} |"
        rule += "---:|---:|"
    header += " Meridian p50 / p99 ms |"
    rule += "---:|"
    for name, _ in by_level:
        header += f" {name} p50 / p99 ms |"
        rule += "---:|"
    header += " failed (Meridian / " + " / ".join(name for name, _ in by_level) + ") |"
    rule += "---:|"
    lines = [header, rule]
    for level in single:
        others = [levels.get(level["concurrency"]) for _, levels in by_level]
        if any(other is None for other in others):
            continue
        row = f"| {level['concurrency']} | {level['throughput']:,.0f} |"
        for other in others:
            ratio = level["throughput"] / other["throughput"] if other["throughput"] else float("inf")
            row += f" {other['throughput']:,.0f} | {ratio:.2f}× |"
        row += f" {level['p50_ms']:.2f} / {level['p99_ms']:.2f} |"
        for other in others:
            row += f" {other['p50_ms']:.2f} / {other['p99_ms']:.2f} |"
        row += " " + " / ".join(str(x["failed"]) for x in [level] + others) + " |"
        lines.append(row)
    lines.append("")
    memory = [f"Meridian host {mem['host_peak_rss_kb'] / 1024:.0f} MiB"] if "host_peak_rss_kb" in mem else []
    for key, name in (("lockpeer_peak_rss_kb", "lock-per-command"), ("cqrspeer_peak_rss_kb", "cqrs-es")):
        if key in mem:
            memory.append(f"{name} {mem[key] / 1024:.0f} MiB")
    if memory:
        lines.append("Peak RSS per process: " + ", ".join(memory) + ".")
    return "\n".join(lines) + "\n"


def languages_table(languages):
    """One column per language: size, cold start, cached load, per-command cost."""
    def mib(n):
        return f"{n / 1024 / 1024:.1f} MiB" if n >= 1024 * 1024 else f"{n / 1024:.0f} KiB"

    rows = [
        ("component size", lambda r: mib(r["component_bytes"])),
        ("compiled (cached) size", lambda r: mib(r["compiled_bytes"])),
        ("cold start: compile + first instantiate", lambda r: f"{r['cold_start_ms']:,.0f} ms"),
        ("… of which the first instantiate", lambda r: f"{r['first_instantiate_ms']:.1f} ms"),
        ("restart: load from the compile cache", lambda r: f"{r['cached_load_ms']:.1f} ms"),
        ("one more instance", lambda r: f"{r['instantiate_us']:,.1f} µs"),
        ("per command (Rust: `execute`; Python, JavaScript: `handle` + `apply`)", lambda r: f"{r['us_per_command']:,.1f} µs"),
        ("one empty guest call (`describe`)", lambda r: f"{r['empty_call_us']:.2f} µs"),
        ("replay through `apply`", lambda r: f"{r['replay_events_per_s']:,.0f} events/s"),
    ]
    lines = [
        "| measure | " + " | ".join(r["name"] for r in languages) + " |",
        "|---|" + "---:|" * len(languages),
    ]
    for title, cell in rows:
        lines.append(f"| {title} | " + " | ".join(cell(r) for r in languages) + " |")
    return "\n".join(lines) + "\n"


def relay_restart_table(run, command):
    """East's nats-server restarted during a steady window: how long west waited."""
    lines = [
        "| measure | value |",
        "|---|---:|",
        f"| steady rate sent to east (open loop, {run['duration_s']:.0f} s, east's NATS restarted 5 s in) | {run['sent_rate']:,.0f} commands/s |",
        f"| failed commands | {run['failed']} |",
        f"| events committed in east / stored in west | {run['committed']:,} / {run['arrived']:,} |",
        f"| relay lag p50 | {run['lag_p50_ms']:.1f} ms |",
        f"| **relay lag max** (the recovery) | **{run['lag_max_ms'] / 1000:.1f} s** |",
        "",
        f"Measured on {datetime.date.today().isoformat()} with `{command}`.",
    ]
    return "\n".join(lines) + "\n"


def relay_table(relay, command):
    """The relay-lag run: the rate it held, the events it moved and their lag."""
    lines = ["| measure | value |", "|---|---:|"]
    top = relay.get("max")
    if top:
        lines.append(
            f"| east's maximum ({top['concurrency']} clients, closed loop, {top['duration_s']:.0f} s) | "
            f"{top['throughput']:,.0f} commands/s |"
        )
    lat = relay["command_latency"]
    lines += [
        f"| steady rate sent to east (open loop, {relay['duration_s']:.0f} s) | {relay['sent_rate']:,.0f} commands/s |",
        f"| command latency in east at that rate, p50 / p99 | {lat['p50_ms']:.1f} / {lat['p99_ms']:.1f} ms |",
        f"| failed / not sent (too many in flight) | {relay['failed']} / {relay['skipped']} |",
        f"| events committed in east / stored in west | {relay['committed']:,} / {relay['arrived']:,} |",
        f"| **relay lag p50** | **{relay['lag_p50_ms']:.1f} ms** |",
        f"| relay lag p90 | {relay['lag_p90_ms']:.1f} ms |",
        f"| **relay lag p99** | **{relay['lag_p99_ms']:.1f} ms** |",
        f"| relay lag max | {relay['lag_max_ms']:.1f} ms |",
        f"| west had everything, after the window closed | {relay['drain_s'] * 1000:.0f} ms |",
        "",
        f"Measured on {datetime.date.today().isoformat()} with `{command}`.",
    ]
    return "\n".join(lines) + "\n"


def streams_table(same, other, quiet, command):
    """Live streams: send-to-arrival on open SSE streams, on the commands' host and another
    (busy), and on another host while the region is quiet."""
    lines = [
        "| streams opened on | streams | deposits/s | command p50 / p99 ms | send → stream p50 / p99 / max ms | deliveries |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, run in (
        ("the host the commands go to", same),
        ("another host of the region", other),
        ("another host, a quiet region", quiet),
    ):
        if not run:
            continue
        cmd, lag = run["command_latency"], run["stream_lag"]
        lines.append(
            f"| {label} | {run['streams']} | {run['rate']:,.0f} | {cmd['p50_ms']:.1f} / {cmd['p99_ms']:.1f} | "
            f"{lag['p50_ms']:.1f} / {lag['p99_ms']:.1f} / {lag['max_ms']:.1f} | {run['delivered']:,} |"
        )
    lines += ["", f"Measured on {datetime.date.today().isoformat()} with `{command}`."]
    return "\n".join(lines) + "\n"


def cache_table(cache, command):
    """Memory per cached aggregate: the host's RSS before and after caching N accounts."""
    mib = lambda kb: f"{kb / 1024:,.0f} MiB"
    before, after, sizes = cache["before"], cache["after"], cache["state_bytes"]
    lines = [
        "| measure | value |",
        "|---|---:|",
        f"| accounts cached (after a warm-up of {cache['warmup']:,}) | {cache['aggregates']:,} |",
        f"| host RSS before → after | {mib(before['rss_kb'])} → {mib(after['rss_kb'])} |",
        f"| **memory per cached aggregate** (RSS after − before) ÷ accounts | "
        f"**{cache['bytes_per_aggregate']:,.0f} bytes** |",
        f"| … counting anonymous memory only (heap, no mapped files) | "
        f"{cache['anon_bytes_per_aggregate']:,.0f} bytes |",
        f"| host peak RSS (VmHWM) at the end | {mib(after['hwm_kb'])} |",
        f"| state JSON per account | {sizes['min']}–{sizes['max']} bytes (mean {sizes['mean']:.1f}) |",
        f"| loading them through `GET` ({cache['concurrency']} at a time: read, replay, cache) | "
        f"{cache['load_per_s']:,.0f} aggregates/s ({cache['load_s']:,.0f} s) |",
        f"| bulk insert with SQL (stream row, command id, `Opened` event) | "
        f"{cache['insert_per_s']:,.0f} accounts/s ({cache['insert_s']:,.0f} s) |",
        f"| re-read sample that had to be loaded again (evicted) | "
        f"{cache['resample_loads']} of {cache['resampled']:,} |",
        "",
        f"Measured on {datetime.date.today().isoformat()} with `{command}`.",
    ]
    return "\n".join(lines) + "\n"


def main():
    directory, target, command = sys.argv[1:4]
    with open(target) as f:
        text = f.read()

    run = (
        f"Run on {datetime.date.today().isoformat()}, {machine()}, with `{command}`. "
        "PostgreSQL, the hosts and the load generator share the machine."
    )
    single = load(directory, "single.json")
    if single:
        # Only a full run rewrites the run line; a section run alone leaves it.
        text = replace(text, "run", run + "\n")

    raw = load(directory, "raw.json")
    if single and raw:
        raw_rate = raw["rows_per_s"] if "rows_per_s" in raw else raw.get("throughput", 0)
        lines = [
            "| clients | commands/s | p50 ms | p99 ms | p99.9 ms | failed | ÷ raw INSERT rows/s |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for level in single:
            lines.append(
                f"| {level['concurrency']} | {level['throughput']:,.0f} | {level['p50_ms']:.2f} | "
                f"{level['p99_ms']:.2f} | {level['p999_ms']:.2f} | {level['failed']} | "
                f"{level['throughput'] / raw_rate:.2f} |"
            )
        lines.append("")
        lines.append(f"Raw batched INSERT ceiling (8 clients × 100-row transactions): **{raw_rate:,.0f} rows/s**.")
        text = replace(text, "single", "\n".join(lines) + "\n")

    region = load(directory, "region3.json")
    if region and single:
        one = {level["concurrency"]: level for level in single}
        lines = [
            "| clients | 1 host cmd/s | 3 hosts cmd/s | 1 host p50 / p99 ms | 3 hosts p50 / p99 ms | failed |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for level in region:
            base = one.get(level["concurrency"])
            if not base:
                continue
            lines.append(
                f"| {level['concurrency']} | {base['throughput']:,.0f} | {level['throughput']:,.0f} | "
                f"{base['p50_ms']:.2f} / {base['p99_ms']:.2f} | {level['p50_ms']:.2f} / {level['p99_ms']:.2f} | "
                f"{level['failed']} |"
            )
        text = replace(text, "region", "\n".join(lines) + "\n")

    rt = load(directory, "runtime.json")
    if rt:
        lines = [
            "| measure | value |",
            "|---|---:|",
            f"| component size | {rt['component_bytes']:,} bytes |",
            f"| compile (cold, no cache) | {rt['compile_ms']:.1f} ms |",
            f"| instantiate | {rt['instantiate_us']:.1f} µs |",
            f"| native, per command (`codec::execute`) | {rt['native_us_per_command']:.2f} µs |",
            f"| WASM, per command (one `execute` call) | {rt['wasm_us_per_command']:.2f} µs |",
            f"| WASM ÷ native | {rt['wasm_over_native']:.2f}× |",
            f"| one empty guest call (`describe`) | {rt.get('empty_call_us', 0):.2f} µs |",
        ]
        if "bare_async_us_per_command" in rt:
            # Reference points (bench/src/bare_call.rs): the same export on bare instances.
            lines += [
                f"| *reference:* bare instance, async call, per command | {rt['bare_async_us_per_command']:.2f} µs |",
                f"| *reference:* bare instance, sync call (no fiber) | {rt['bare_sync_us_per_command']:.2f} µs |",
                f"| *reference:* sync call, no epoch checks (no deadline) | {rt['bare_sync_no_epoch_us_per_command']:.2f} µs |",
                f"| *reference:* one empty sync call | {rt['bare_sync_empty_call_us']:.2f} µs |",
            ]
        lines += [
            f"| replay through WASM `apply` | {rt['replay_events_per_s']:,.0f} events/s |",
            f"| replay natively | {rt['native_replay_events_per_s']:,.0f} events/s |",
        ]
        text = replace(text, "runtime", "\n".join(lines) + "\n")

    languages = load(directory, "languages.json")
    if languages:
        text = replace(text, "languages", languages_table(languages))

    relay = load(directory, "relay.json")
    if relay:
        text = replace(text, "relay", relay_table(relay, command))

    restart = load(directory, "relay-restart.json")
    if restart:
        text = replace(text, "relay-restart", relay_restart_table(restart, command))

    same, other = load(directory, "stream-same.json"), load(directory, "stream-other.json")
    quiet = load(directory, "stream-quiet.json")
    if same or other or quiet:
        text = replace(text, "streams", streams_table(same, other, quiet, command))

    cache = load(directory, "cache.json")
    if cache:
        text = replace(text, "cache", cache_table(cache, command))

    mem = load(directory, "memory.json")
    if mem:
        text = replace(text, "memory", f"Peak RSS of the host during the run: {mem['host_peak_rss_kb'] / 1024:.0f} MiB.\n")

    peers = [
        (name, results)
        for name, results in (
            ("lock-per-command", load(directory, "lockpeer.json")),
            ("cqrs-es", load(directory, "cqrspeer.json")),
        )
        if results
    ]
    if peers and single and "<!-- BEGIN:peers -->" in text:
        text = replace(text, "peers", peers_table(single, peers, mem or {}))

    with open(target, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
