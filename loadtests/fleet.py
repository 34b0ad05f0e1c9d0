#!/usr/bin/env python3
"""Fleet mode on a real etcd cluster (3 members on loopback), written to
loadtests/RESULTS.md.

    python3 loadtests/fleet.py propagation   # a change through one replica: how long until every replica serves it
    python3 loadtests/fleet.py publish       # 200 simulated replicas publishing windows: etcd's load, the leader's merge
    python3 loadtests/fleet.py all

propagation: N replicas (3, then 10) of the release binary share one
prefix. 100 weight changes are made, each through the next replica in turn;
after each, every replica is polled until it serves the change. Each replica
reports, in `switchyard_fleet_watch_lag_seconds`, the time from the writer
building the change (before its etcd transaction) to this replica serving
it, both on the same machine's clock: the figure per change is the slowest
replica's, and the goal (issue 17) is p99 <= 100 ms.

publish: one real replica leads a canary rollout and carries traffic; 200
simulated replicas (threads of this script, speaking etcd's JSON gateway as
the binary does) each hold a lease, publish a membership record and a copy
of the real replica's windows every second, and read the rollout's leader
key every 500 ms, as the replicas of a 201-replica fleet that do not lead
would. Measured over the run: the publish transactions per second etcd
took and their latency, etcd's revision rate, CPU and database size, and the
time the leader takes to merge the fleet's windows (timed through
`GET /v1/routes/api/stats?scope=fleet`, which reads and merges exactly what
the leader's analysis does).

Needs: etcd (Debian: apt-get install etcd-server) and cargo.
"""

import argparse
import base64
import concurrent.futures
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the harness's process, provenance and RESULTS.md helpers)

ROOT = bench.ROOT
CLK_TCK = os.sysconf("SC_CLK_TCK")


# === HTTP ===

def http(method, url, body=None, timeout=10.0):
    """(status, parsed JSON or text)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def b64(s):
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, max(0, int(round(q * len(values) + 0.5)) - 1))]


# === etcd ===

class Etcd:
    """A 3-member cluster on loopback."""

    def __init__(self, workdir):
        binary = shutil.which("etcd")
        if binary is None:
            sys.exit("etcd is not installed (Debian: apt-get install etcd-server)")
        ports = [(bench.free_port(), bench.free_port()) for _ in range(3)]
        initial = ",".join(f"m{i}=http://127.0.0.1:{p}" for i, (_, p) in enumerate(ports))
        self.endpoints = [f"http://127.0.0.1:{c}" for c, _ in ports]
        self.procs = []
        for i, (client, peer) in enumerate(ports):
            self.procs.append(bench.spawn([
                binary, f"--name=m{i}", f"--data-dir={workdir}/etcd-m{i}",
                f"--listen-client-urls=http://127.0.0.1:{client}",
                f"--advertise-client-urls=http://127.0.0.1:{client}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster={initial}", "--initial-cluster-state=new",
                "--initial-cluster-token=switchyard-loadtest",
                "--auto-compaction-mode=periodic", "--auto-compaction-retention=1m",
                "--logger=zap", "--log-level=error",
            ], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if http("POST", f"{self.endpoints[0]}/v3/kv/put", {"key": b64("health"), "value": b64("ok")})[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        sys.exit("etcd cluster not healthy in 30 s")

    def call(self, path, body, member=0):
        return http("POST", f"{self.endpoints[member]}{path}", body)

    def revision(self):
        return int(self.call("/v3/kv/range", {"key": b64("health")})[1]["header"]["revision"])

    def db_size(self):
        return max(int(http("POST", f"{e}/v3/maintenance/status", {})[1].get("dbSize", 0)) for e in self.endpoints)

    def cpu_ticks(self):
        return sum(sum(bench.cpu_split(p.pid)) for p in self.procs)

    def rss_kib(self):
        return sum(bench.status_kib(p.pid, "VmRSS") for p in self.procs)


# === replicas ===

def replica_config(etcd, prefix, replica_id, state_dir, origin):
    endpoints = ", ".join(f'"{e}"' for e in etcd.endpoints)
    return f"""listen: 127.0.0.1:0
admin: {{ listen: 127.0.0.1:0 }}
workers: 1
state_dir: {state_dir}
fleet:
  etcd: {{ endpoints: [{endpoints}], prefix: {prefix} }}
  replica_id: {replica_id}
  publish_interval: 1s
routes:
  - name: api
    backends:
      - {{ name: blue, endpoints: ["{origin}"], weight: 100 }}
      - {{ name: canary, endpoints: ["{origin}"], weight: 0 }}
"""


class Replica:
    def __init__(self, binary, workdir, etcd, prefix, replica_id, origin):
        path = Path(workdir) / f"{replica_id}.yaml"
        path.write_text(replica_config(etcd, prefix, replica_id, Path(workdir) / f"state-{replica_id}", origin))
        self.id = replica_id
        self.proc = bench.spawn([binary, "run", "--config", path], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, "RUST_LOG": "info", "NO_COLOR": "1"})
        for line in self.proc.stderr:
            fields = dict(w.split("=", 1) for w in line.split() if "=" in w)
            if "data" in fields and "admin" in fields:
                self.data, self.admin = fields["data"], fields["admin"]
                break
        else:
            sys.exit(f"{replica_id} exited before serving")
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()

    def admin_url(self, path):
        return f"http://{self.admin}{path}"

    def gauges(self):
        """The fleet gauges from /metrics."""
        with urllib.request.urlopen(self.admin_url("/metrics"), timeout=5) as resp:
            text = resp.read().decode()
        out = {}
        for line in text.splitlines():
            if line.startswith("switchyard_fleet_") and " " in line:
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out


def start_origin(workdir):
    """A tiny HTTP origin (Python's): the replicas need an upstream, not speed."""
    port = bench.free_port()
    bench.spawn([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", workdir],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    bench.wait_port(port)
    return f"127.0.0.1:{port}"


# === propagation ===

def propagation(args, binary, workdir, etcd, origin, replicas_count):
    prefix = f"/switchyard/propagation-{replicas_count}"
    replicas = [Replica(binary, workdir, etcd, prefix, f"p{replicas_count}-{i}", origin)
                for i in range(replicas_count)]
    time.sleep(2)  # every replica has its lease and has published
    slowest, every = [], []
    for change in range(args.changes):
        writer = replicas[change % len(replicas)]
        blue = 50 + (change % 2) * 10
        status, body = http("PUT", writer.admin_url("/v1/routes/api/weights"), {"blue": blue, "canary": 100 - blue})
        if status != 200:
            sys.exit(f"change {change}: {status} {body}")
        revision = writer.gauges()["switchyard_fleet_revision_applied"]
        lags = []
        deadline = time.monotonic() + 10
        pending = list(replicas)
        while pending:
            for r in list(pending):
                g = r.gauges()
                if g.get("switchyard_fleet_revision_applied", 0) >= revision:
                    lags.append(g["switchyard_fleet_watch_lag_seconds"] * 1000)
                    pending.remove(r)
            if time.monotonic() > deadline:
                sys.exit(f"change {change}: {[r.id for r in pending]} never served revision {revision}")
            time.sleep(0.001)
        slowest.append(max(lags))
        every.extend(lags)
    for r in replicas:
        bench.stop(r.proc)
    return {"replicas": replicas_count, "changes": args.changes,
            "p50": percentile(slowest, 0.50), "p99": percentile(slowest, 0.99), "max": max(slowest),
            "each_p50": percentile(every, 0.50), "each_p99": percentile(every, 0.99)}


def suite_propagation(args, binary, workdir, etcd, origin):
    rows = [propagation(args, binary, workdir, etcd, origin, n) for n in args.replicas]
    table = ["| replicas | changes | slowest replica p50 | p99 | max | any replica p50 | p99 | goal p99 <= 100 ms |",
             "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        table.append(f"| {r['replicas']} | {r['changes']} | {r['p50']:.1f} ms | {r['p99']:.1f} ms | {r['max']:.1f} ms "
                     f"| {r['each_p50']:.1f} ms | {r['each_p99']:.1f} ms | {'PASS' if r['p99'] <= 100 else 'FAIL'} |")
    return "\n".join(table), rows


# === publishing at scale ===

def suite_publish(args, binary, workdir, etcd, origin):
    prefix = "/switchyard/publish"
    leader = Replica(binary, workdir, etcd, prefix, "leader", origin)
    spec = {"strategy": "canary", "stable": "blue", "target": "canary",
            "steps": [{"weight": 50, "hold": "1h"}, {"weight": 100}],
            "analysis": {"interval": "1s", "window": "30s", "min_requests": 10}}
    status, body = http("POST", leader.admin_url("/v1/routes/api/rollout"), spec)
    if status != 201:
        sys.exit(f"rollout: {status} {body}")
    for i in range(400):  # some traffic, so the windows carry latency buckets
        urllib.request.urlopen(urllib.request.Request(f"http://{leader.data}/", headers={"x-user-id": f"u{i}"}),
                               timeout=5).read()
    time.sleep(2)
    _, found = etcd.call("/v3/kv/range", {"key": b64(f"{prefix}/windows/leader")})
    template = json.loads(base64.b64decode(found["kvs"][0]["value"]))
    member_template = json.loads(base64.b64decode(
        etcd.call("/v3/kv/range", {"key": b64(f"{prefix}/replicas/leader")})[1]["kvs"][0]["value"]))
    window_bytes = len(json.dumps(template))

    stop = threading.Event()
    latencies, failures, campaigns = [], [0], [0]
    lock = threading.Lock()

    def simulated(i):
        name = f"sim-{i:03d}"
        member = f"{etcd.endpoints[i % 3]}"
        lease = int(http("POST", f"{member}/v3/lease/grant", {"TTL": "5"})[1]["ID"])
        windows = dict(template, replica=name)
        record = dict(member_template, id=name, leads=[])
        next_publish = time.monotonic() + (i % 100) / 100  # spread over the second
        next_campaign = next_publish + 0.25
        renewed = time.monotonic()
        while not stop.is_set():
            now = time.monotonic()
            if now >= next_campaign:
                # As a replica that does not lead the rollout: every 500 ms it
                # reads the leader key (and would campaign if it were gone).
                next_campaign += 0.5
                http("POST", f"{member}/v3/kv/range", {"key": b64(f"{prefix}/leaders/api")})
                with lock:
                    campaigns[0] += 1
                continue
            if now < next_publish:
                time.sleep(min(0.05, next_publish - now, max(0.0, next_campaign - now)))
                continue
            next_publish += 1.0
            if now - renewed > 5 / 3:
                http("POST", f"{member}/v3/lease/keepalive", {"ID": str(lease)})
                renewed = now
            windows["at_ms"] = int(time.time() * 1000)
            body = {"success": [
                {"request_put": {"key": b64(f"{prefix}/replicas/{name}"), "value": b64(json.dumps(record)), "lease": str(lease)}},
                {"request_put": {"key": b64(f"{prefix}/windows/{name}"), "value": b64(json.dumps(windows)), "lease": str(lease)}},
                # As the binary does: the state's revision, to notice a watch that fell behind.
                {"request_range": {"key": b64(f"{prefix}/state"), "keys_only": True}},
            ]}
            t0 = time.monotonic()
            status, _ = http("POST", f"{member}/v3/kv/txn", body)
            with lock:
                if status == 200:
                    latencies.append((time.monotonic() - t0) * 1000)
                else:
                    failures[0] += 1

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=args.simulated)
    futures = [pool.submit(simulated, i) for i in range(args.simulated)]
    time.sleep(3)  # every simulated replica has a lease and has published
    with lock:
        latencies.clear()
        campaigns[0] = 0
    rev0, cpu0, db0, t0 = etcd.revision(), etcd.cpu_ticks(), etcd.db_size(), time.monotonic()
    merges, merged_replicas = [], set()
    while time.monotonic() - t0 < args.seconds:
        m0 = time.monotonic()
        status, stats = http("GET", leader.admin_url("/v1/routes/api/stats?scope=fleet"))
        merges.append((time.monotonic() - m0) * 1000)
        if status == 200:
            merged_replicas.add(stats["replicas"])
        time.sleep(0.5)
    elapsed = time.monotonic() - t0
    rev1, cpu1, db1 = etcd.revision(), etcd.cpu_ticks(), etcd.db_size()
    rollout = http("GET", leader.admin_url("/v1/routes/api/rollout"))[1]
    stop.set()
    for f in futures:
        f.result()
    pool.shutdown()
    bench.stop(leader.proc)
    with lock:
        publish = list(latencies)
        reads = campaigns[0]
    analysis = rollout.get("last_analysis") or {}
    rows = {
        "simulated": args.simulated, "seconds": round(elapsed, 1), "window_bytes": window_bytes,
        "publish_per_s": len(publish) / elapsed, "publish_p50": percentile(publish, 0.5),
        "publish_p99": percentile(publish, 0.99), "failures": failures[0],
        "leader_reads_per_s": reads / elapsed,
        "revisions_per_s": (rev1 - rev0) / elapsed,
        "etcd_cpu": (cpu1 - cpu0) / CLK_TCK / elapsed, "etcd_rss_mib": etcd.rss_kib() / 1024,
        "db_mib": (db0 / 2**20, db1 / 2**20),
        "merge_p50": percentile(merges, 0.5), "merge_p99": percentile(merges, 0.99),
        "merged_replicas": sorted(merged_replicas),
        "target_requests": analysis.get("target_requests"),
    }
    text = f"""| what | measured |
|---|---|
| simulated replicas publishing (+1 real leader) | {rows['simulated']} for {rows['seconds']} s |
| one replica's published windows | {window_bytes} bytes of JSON (route `api`, two backends) |
| publish transactions taken by etcd | {rows['publish_per_s']:.0f}/s, latency p50 {rows['publish_p50']:.1f} ms, p99 {rows['publish_p99']:.1f} ms, {rows['failures']} failed |
| leader-key reads of the replicas that do not lead | {rows['leader_reads_per_s']:.0f}/s |
| etcd revisions | {rows['revisions_per_s']:.0f}/s |
| etcd CPU (3 members together) | {rows['etcd_cpu']:.2f} cores; RSS {rows['etcd_rss_mib']:.0f} MiB |
| etcd database | {rows['db_mib'][0]:.1f} → {rows['db_mib'][1]:.1f} MiB (auto-compaction every minute) |
| the leader's merge of every replica's windows | p50 {rows['merge_p50']:.1f} ms, p99 {rows['merge_p99']:.1f} ms per analysis (replicas merged: {rows['merged_replicas']}) |
| the leader's last analysis | {rows['target_requests']} canary requests judged (the fleet's, not its own) |"""
    return text, rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=["propagation", "publish", "all"])
    parser.add_argument("--replicas", type=int, nargs="+", default=[3, 10],
                        help="propagation: fleet sizes to measure (default 3 10)")
    parser.add_argument("--changes", type=int, default=100, help="propagation: changes per fleet size")
    parser.add_argument("--simulated", type=int, default=200, help="publish: simulated replicas")
    parser.add_argument("--seconds", type=int, default=30, help="publish: measured seconds")
    parser.add_argument("--binary", type=Path, help="the switchyard binary (default: build the release binary)")
    parser.add_argument("--no-build", action="store_true", help="use the existing release binary")
    args = parser.parse_args()
    if not 1 <= args.changes <= 10000 or not 1 <= args.simulated <= 1000 or not 1 <= args.seconds <= 600:
        parser.error("--changes 1..10000, --simulated 1..1000, --seconds 1..600")
    if any(not 1 <= n <= 50 for n in args.replicas):
        parser.error("--replicas: 1..50 each")
    if args.binary is None and not args.no_build:
        subprocess.run(["cargo", "build", "--release", "-p", "switchyard-proxy"], cwd=ROOT, check=True)
    args.binary, args.binary_sha256 = bench.snapshot_binary(args.binary or bench.BIN)
    workdir = tempfile.mkdtemp(prefix="switchyard-fleet-")
    try:
        run(args, workdir)
    finally:
        # etcd preallocates 120 MB of log per member: leave nothing behind.
        bench.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(args.binary.parent, ignore_errors=True)


def run(args, workdir):
    etcd = Etcd(workdir)
    origin = start_origin(workdir)
    etcd_version = bench.version([shutil.which("etcd"), "--version"])
    head = f"""- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}
- Command: `{' '.join(['python3', 'loadtests/fleet.py'] + sys.argv[1:])}`
- Machine: {bench.cpu_model()}, {os.cpu_count()} cores, {bench.mem_gib():.0f} GiB; etcd: 3 members on loopback, every process unpinned
- Versions: {etcd_version}; switchyard {bench.switchyard_version(args)}"""
    if args.suite in ("propagation", "all"):
        table, rows = suite_propagation(args, args.binary, workdir, etcd, origin)
        bench.write_section("## Fleet: propagation of a change", f"""## Fleet: propagation of a change

{head}

Each change is a weight change through the next replica in turn; a replica's
figure is its `switchyard_fleet_watch_lag_seconds` for that change: from the
writer building the change (before its etcd transaction) to this replica
serving it, on one clock. "Slowest replica" is the figure per change that the
goal is about: the last replica to serve it.

{table}
""")
        print(table)
    if args.suite in ("publish", "all"):
        table, _ = suite_publish(args, args.binary, workdir, etcd, origin)
        bench.write_section("## Fleet: publishing windows at scale", f"""## Fleet: publishing windows at scale

{head}

{table}
""")
        print(table)


if __name__ == "__main__":
    main()
