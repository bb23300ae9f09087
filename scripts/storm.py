"""A storm against three regions on this machine, for finding what the tests do not.

Starts one nats-server per region (east the hub, west and south its leafnodes) and
`meridian dev --regions east,west,south --hosts 2,1` on them, opens ACCOUNTS accounts,
then for DURATION seconds CLIENTS clients send deposits (each retried with its command id
until it is answered 200) and, with probability MOVES, move an account's home to a
random region through a random region, while every CHAOS_EVERY seconds one region's
nats-server is killed and started again on the same store. Then it waits (up to 90 s)
until every region holds the same history of every account, versions 1..n in order,
and each account's deposits equal the deposits acknowledged; it prints what differs and
exits 1 if anything does.

    bash plugins/build.sh && cargo build --release -p meridian-host
    python3 scripts/storm.py                      # 60 s, 8 clients, 8 accounts
    DURATION=120 CLIENTS=16 SEED=3 python3 scripts/storm.py

Environment: DURATION, CLIENTS, ACCOUNTS, MOVES, CHAOS_EVERY, SEED,
MERIDIAN_NATS_SERVER_BIN, MERIDIAN_STORM_PG (a PostgreSQL server URL, no database).
"""
import json, os, random, re, socket, subprocess, sys, tempfile, threading, time, uuid
import urllib.request, urllib.error

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("MERIDIAN_NATS_SERVER_BIN", f"{REPO}/.tools/bin/nats-server")
MERIDIAN = f"{REPO}/target/release/meridian"
PG = os.environ.get("MERIDIAN_STORM_PG", "postgres://postgres@127.0.0.1:5432")
DURATION = float(os.environ.get("DURATION", "60"))
CLIENTS = int(os.environ.get("CLIENTS", "8"))
ACCOUNTS = int(os.environ.get("ACCOUNTS", "8"))
MOVE_SHARE = float(os.environ.get("MOVES", "0.05"))
CHAOS_EVERY = float(os.environ.get("CHAOS_EVERY", "10"))
SEED = int(os.environ.get("SEED", "1"))
random.seed(SEED)
REGIONS = ["east", "west", "south"]

def free():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

base = tempfile.mkdtemp(prefix="storm-")
leaf = free()
ports = {r: free() for r in REGIONS}
confs = {}
for r in REGIONS:
    d = f"{base}/{r}"; os.makedirs(d)
    extra = (f'leafnodes {{ listen: "127.0.0.1:{leaf}" }}' if r == "east"
             else f'leafnodes {{ remotes: [ {{ url: "nats-leaf://127.0.0.1:{leaf}" }} ] }}')
    confs[r] = f"{d}/n.conf"
    open(confs[r], "w").write(f'server_name: {r}\nlisten: "127.0.0.1:{ports[r]}"\n'
                              f'jetstream {{ domain: {r}, store_dir: "{d}/js" }}\n{extra}\n')
nats = {}
def start_nats(r):
    nats[r] = subprocess.Popen([BIN, "-c", confs[r]], stdout=open(f"{base}/{r}.log", "a"),
                               stderr=subprocess.STDOUT)
for r in REGIONS: start_nats(r)
time.sleep(1.5)

for r in REGIONS:
    subprocess.run(["psql", f"{PG}/postgres", "-q", "-c",
                    f"DROP DATABASE IF EXISTS storm_{r} WITH (FORCE)"], check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
dev_out = open(f"{base}/dev.out", "w")
dev = subprocess.Popen([MERIDIAN, "dev", "--regions", ",".join(REGIONS), "--hosts", "2,1",
                        "--port", str(free()), "--database-url", f"{PG}/storm",
                        "--data-dir", f"{base}/dev"]
                       + sum([["--nats-url", f"nats://127.0.0.1:{ports[r]}"] for r in REGIONS], []),
                       stdout=subprocess.PIPE, stderr=dev_out, text=True, cwd=REPO)
hosts = {r: [] for r in REGIONS}
token = None
region = None
for line in dev.stdout:
    m = re.match(r"region (\w+)", line)
    if m: region = m.group(1)
    m = re.match(r"\s+(\w+-\d+)\s+(http://\S+)", line)
    if m and region: hosts[region].append(m.group(2))
    m = re.match(r"admin token\s+(\S+)", line)
    if m: token = m.group(1)
    if line.startswith("Ctrl-C stops everything"): break
if not all(hosts.values()) or token is None:
    dev.kill()
    for r in REGIONS: nats[r].kill()
    sys.exit(f"meridian dev did not start; see {base}/dev.out")
print("hosts", hosts, "base", base, flush=True)

def call(method, url, body=None, timeout=12):
    req = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"content-type": "application/json", "authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null"), r.headers.get("x-meridian-region")
    except urllib.error.HTTPError as e:
        try: b = json.loads(e.read() or b"null")
        except Exception: b = None
        return e.code, b, None
    except Exception as e:
        return 0, {"error": {"code": type(e).__name__}}, None

stats = {}
lock = threading.Lock()
def note(k):
    with lock: stats[k] = stats.get(k, 0) + 1

def command(acc, cmd, retries=60):
    cid = str(uuid.uuid4())
    for _ in range(retries):
        r = random.choice(REGIONS); h = random.choice(hosts[r])
        st, b, _ = call("POST", f"{h}/v1/aggregates/bank-account/{acc}", {"command": cmd, "command_id": cid})
        if st in (200, 422):
            return st, b
        note(f"{st}:{(b or {}).get('error', {}).get('code') if isinstance(b, dict) else b}")
        time.sleep(0.2)
    return None, None

accounts = [f"st-{SEED}-{i}" for i in range(ACCOUNTS)]
acked = {a: 0 for a in accounts}
for a in accounts:
    st, b = command(a, {"type": "Open", "owner": "o"})
    assert st == 200, (a, st, b)

stop = time.time() + DURATION
def worker(n):
    rnd = random.Random(SEED * 100 + n)
    while time.time() < stop:
        a = rnd.choice(accounts)
        if rnd.random() < MOVE_SHARE:
            r = rnd.choice(REGIONS); h = rnd.choice(hosts[rnd.choice(REGIONS)])
            st, b, _ = call("POST", f"{h}/v1/aggregates/bank-account/{a}/move-home", {"region": r})
            note(f"move:{st}:{(b or {}).get('error', {}).get('code', '') if isinstance(b, dict) else ''}")
            continue
        st, b = command(a, {"type": "Deposit", "amount": 1})
        if st == 200:
            with lock: acked[a] += 1
            note("ok")
        else:
            note("gave_up" if st is None else f"final:{st}")
def chaos():
    rnd = random.Random(SEED)
    while time.time() < stop - 5:
        time.sleep(CHAOS_EVERY)
        r = rnd.choice(REGIONS)
        nats[r].kill(); nats[r].wait()
        time.sleep(rnd.uniform(0.5, 3))
        start_nats(r)
        note(f"restart:{r}")
ts = [threading.Thread(target=worker, args=(i,)) for i in range(CLIENTS)] + [threading.Thread(target=chaos)]
for t in ts: t.start()
for t in ts: t.join()
print("storm done", dict(sorted(stats.items())), flush=True)

def history(r, a):
    st, b, _ = call("GET", f"{hosts[r][0]}/v1/events?aggregate_type=bank-account&aggregate_id={a}&limit=10000")
    return [(e["version"], e["event_id"], e["type"]) for e in b["events"]] if st == 200 else None
bad = []
deadline = time.time() + 90
while True:
    bad = []
    for a in accounts:
        hs = {r: history(r, a) for r in REGIONS}
        ref = hs["east"]
        for r in REGIONS:
            h = hs[r]
            if h is None: bad.append((a, r, "unreadable")); continue
            if [v for v, _, _ in h] != list(range(1, len(h) + 1)): bad.append((a, r, "versions out of order"))
            if h != ref: bad.append((a, r, f"differs from east ({len(h)} vs {len(ref or [])})"))
        deposits = sum(1 for _, _, t in (ref or []) if t == "Deposited")
        if deposits != acked[a]: bad.append((a, "east", f"{deposits} deposits stored, {acked[a]} acked"))
    if not bad or time.time() > deadline: break
    time.sleep(3)
print("inconsistencies", bad[:20], "total", len(bad))
print("acked", sum(acked.values()))
dev.send_signal(2)
try: dev.wait(timeout=60)
except Exception: dev.kill()
for r in REGIONS: nats[r].kill()
print(f"logs in {base}")
sys.exit(1 if bad else 0)
