#!/usr/bin/env python3
"""Side-by-side load tests on loopback, written to loadtests/RESULTS.md.

    python3 loadtests/bench.py metrics     # Switchyard with metrics on vs off
    python3 loadtests/bench.py weights     # 100 weight changes/s under load: no failed request
    python3 loadtests/bench.py rollout     # a canary fails under load: time to rollback, requests lost

Fairness: the proxy under test is pinned to core 0; the origin (nginx, one
worker) and the load generator (wrk, one thread) share core 1. Variants
alternate within each round, so drift (thermal, noisy neighbours) hits all of
them alike; the report gives the median with min-max over the rounds.

Per variant and round: requests/s at saturation (closed loop, wrk), latency
percentiles from wrk, the proxy's CPU time per request (utime+stime from
/proc/<pid>/stat across the run), and its peak RSS (VmHWM). A round whose
responses were not all 2xx is discarded and reported.

Needs: wrk, nginx, taskset (Debian: wrk nginx util-linux) and cargo.
"""

import argparse
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "loadtests" / "RESULTS.md"
BIN = ROOT / "target" / "release" / "switchyard"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# wrk gives every request its own user id, so the sticky split really works.
WRK_SCRIPT = """
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", "/", { ["x-user-id"] = "user-" .. n })
end
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listening on port {port} after {timeout}s")


def cpu_ticks(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def peak_rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def start_origin(workdir):
    """nginx, one worker on core 1, answering a small 200."""
    port = free_port()
    conf = workdir / "origin.conf"
    conf.write_text(
        f"""daemon off; master_process off; worker_processes 1;
pid {workdir}/origin.pid; error_log {workdir}/origin.err warn;
events {{ worker_connections 4096; }}
http {{
  access_log off; keepalive_requests 1000000;
  client_body_temp_path {workdir}/b; proxy_temp_path {workdir}/p;
  fastcgi_temp_path {workdir}/f; uwsgi_temp_path {workdir}/u; scgi_temp_path {workdir}/s;
  server {{ listen 127.0.0.1:{port}; location / {{ default_type text/plain; return 200 "ok\\n"; }} }}
}}
"""
    )
    proc = subprocess.Popen(["taskset", "-c", "1", nginx_bin(), "-c", str(conf), "-p", str(workdir)])
    wait_port(port)
    return proc, port


def nginx_bin():
    return shutil.which("nginx") or "/usr/sbin/nginx"


def switchyard_config(port, admin, origin, metrics_enabled, state_dir=None):
    backends = "\n".join(
        f'      - {{ name: {name}, endpoints: ["127.0.0.1:{origin}"], weight: {w} }}'
        for name, w in (("blue", 90), ("green", 5), ("canary", 5))
    )
    return f"""listen: 127.0.0.1:{port}
admin: {{ listen: 127.0.0.1:{admin} }}
workers: 1
metrics: {{ enabled: {str(metrics_enabled).lower()} }}
{f"state_dir: {state_dir}" if state_dir else ""}
user_key: {{ headers: [x-user-id], fallback: cookie }}
routes:
  - name: api
    backends:
{backends}
"""


def start_switchyard(workdir, origin, metrics_enabled, wrapper=(), state_dir=None, with_admin=False):
    port, admin = free_port(), free_port()
    conf = workdir / f"switchyard-{port}.yaml"
    conf.write_text(switchyard_config(port, admin, origin, metrics_enabled, state_dir))
    proc = subprocess.Popen(
        ["taskset", "-c", "0", *wrapper, str(BIN), "run", "--config", str(conf)],
        env={**os.environ, "RUST_LOG": "warn"},
    )
    deadline = time.monotonic() + (120 if wrapper else 10)
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/health/ready", timeout=1) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("switchyard did not become ready")
        time.sleep(0.02)
    if with_admin:
        return proc, port, admin
    return proc, port


def run_wrk(port, workdir, duration, connections):
    script = workdir / "users.lua"
    script.write_text(WRK_SCRIPT)
    out = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(script),
         f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, check=True, timeout=duration + 60,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    lat = {}
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        value, unit = float(m.group(1)), m.group(2)
        lat[pct] = value / 1000 if unit == "us" else value * 1000 if unit == "s" else value
    return {
        "rps": rps,
        "total": total,
        "bad": (int(non2xx.group(1)) if non2xx else 0),
        "socket_errors": errors.group(1) if errors else "",
        "p50_ms": lat["50"],
        "p99_ms": lat["99"],
    }


def measure(workdir, origin, variant, enabled, args):
    proc, port = start_switchyard(workdir, origin, enabled)
    try:
        before = cpu_ticks(proc.pid)
        r = run_wrk(port, workdir, args.duration, args.connections)
        r["cpu_us_per_req"] = (cpu_ticks(proc.pid) - before) / CLK_TCK * 1e6 / max(r["total"], 1)
        r["rss_mib"] = peak_rss_kib(proc.pid) / 1024
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=40)
    r["variant"] = variant
    return r


def instructions_per_request(workdir, origin, enabled, requests=2000, warmup=200):
    """Instructions the proxy executes per request, counted by callgrind:
    repeatable whatever else the machine does, unlike wall-clock figures on a
    shared VM. Counting is switched on only around `requests` sequential
    keep-alive requests (after a warm-up), so start-up is not included."""
    out = workdir / f"callgrind-{enabled}-{time.monotonic_ns()}.out"
    proc, port = start_switchyard(
        workdir, origin, enabled,
        wrapper=("valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"),
    )
    try:
        import http.client
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

        def burst(n, offset):
            for i in range(n):
                conn.request("GET", "/", headers={"x-user-id": f"user-{offset + i}"})
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"status {resp.status} under callgrind")

        burst(warmup, 0)
        subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], check=True, capture_output=True)
        burst(requests, warmup)
        subprocess.run(["callgrind_control", "-i", "off", str(proc.pid)], check=True, capture_output=True)
        conn.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    total = 0
    for f in workdir.glob(out.name + "*"):
        for m in re.findall(r"^(?:summary|totals):\s+(\d+)", f.read_text(errors="replace"), re.M):
            total = max(total, int(m))
    return total / requests


def summary(values, fmt):
    med = statistics.median(values)
    return f"{fmt.format(med)} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def suite_metrics(args):
    variants = [("metrics on", True), ("metrics off", False)]
    workdir = Path(tempfile.mkdtemp(prefix="switchyard-load-"))
    origin_proc, origin = start_origin(workdir)
    results = {v: [] for v, _ in variants}
    discarded = []
    try:
        for rnd in range(args.rounds):
            order = variants if rnd % 2 == 0 else list(reversed(variants))
            for variant, enabled in order:
                r = measure(workdir, origin, variant, enabled, args)
                print(f"round {rnd + 1} {variant}: {r['rps']:.0f} req/s, {r['cpu_us_per_req']:.2f} µs CPU/req, "
                      f"p99 {r['p99_ms']:.2f} ms, bad {r['bad']}", flush=True)
                if r["bad"] or r["socket_errors"]:
                    discarded.append(f"round {rnd + 1} {variant}: {r['bad']} non-2xx, socket errors {r['socket_errors']!r}")
                else:
                    results[variant].append(r)
    finally:
        origin_proc.terminate()
        origin_proc.wait(timeout=10)

    instructions = {}
    if shutil.which("valgrind") and shutil.which("callgrind_control"):
        origin_proc2, origin2 = start_origin(Path(tempfile.mkdtemp(prefix="switchyard-cg-")))
        try:
            for variant, enabled in variants:
                instructions[variant] = instructions_per_request(workdir, origin2, enabled)
                print(f"{variant}: {instructions[variant]:.0f} instructions/request (callgrind)", flush=True)
        finally:
            origin_proc2.terminate()
            origin_proc2.wait(timeout=10)

    on, off = results["metrics on"], results["metrics off"]
    if not on or not off:
        sys.exit("every round was discarded: " + "; ".join(discarded))
    cost = 100 * (1 - statistics.median(x["rps"] for x in on) / statistics.median(x["rps"] for x in off))
    rows = []
    for variant, _ in variants:
        rs = results[variant]
        rows.append(
            f"| {variant} | {summary([r['rps'] for r in rs], '{:.0f}')} | "
            f"{summary([r['cpu_us_per_req'] for r in rs], '{:.2f}')} | "
            f"{summary([r['p50_ms'] for r in rs], '{:.2f}')} | {summary([r['p99_ms'] for r in rs], '{:.2f}')} | "
            f"{summary([r['rss_mib'] for r in rs], '{:.1f}')} | {len(rs)} |"
        )
    section = f"""## Metrics on vs off

- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}
- Command: `{' '.join(['python3', 'loadtests/bench.py'] + sys.argv[1:])}`
- Machine: {cpu_model()}, {os.cpu_count()} cores, {mem_gib():.0f} GiB, Linux {platform.release()}
- Versions: {version(['wrk', '-v'])}; {version([nginx_bin(), '-v'])}; switchyard {git_rev()}
- Setup: switchyard `workers: 1` pinned to core 0; origin nginx (1 worker) and wrk (1 thread,
  {args.connections} connections, {args.duration} s, a new `x-user-id` per request) on core 1;
  three-backend sticky split 90/5/5, all backends on the origin; {args.rounds} rounds, variants alternating.
- Cells: median (min–max) over the rounds. Wall-clock figures on a shared VM spread widely
  from round to round; the callgrind instruction count below is the repeatable one.

| variant | requests/s | proxy CPU µs/request | p50 ms | p99 ms | peak RSS MiB | rounds |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Throughput cost of metrics (median): **{cost:.1f} %** (goal: under 5 %).
{instructions_line(instructions)}
{('Discarded: ' + '; '.join(discarded)) if discarded else 'No round was discarded.'}
"""
    write_section("## Metrics on vs off", section)
    print(section)


def instructions_line(instructions):
    if len(instructions) < 2:
        return "Instruction counts: valgrind not installed, not measured."
    on, off = instructions["metrics on"], instructions["metrics off"]
    return (
        f"Instructions per request (callgrind, 2000 sequential keep-alive requests after a 200-request warm-up; "
        f"deterministic): on {on:.0f}, off {off:.0f}: metrics add **{on - off:.0f} instructions = "
        f"{100 * (on - off) / off:.1f} %** of the proxy's work per request."
    )


def suite_weights(args):
    """wrk saturates the proxy while a second client changes the weights
    `args.rate` times a second (persisted to a state_dir, audited); every
    request must still succeed."""
    import http.client
    import threading

    workdir = Path(tempfile.mkdtemp(prefix="switchyard-weights-"))
    origin_proc, origin = start_origin(workdir)
    proc, port, admin = start_switchyard(workdir, origin, True, state_dir=workdir / "state", with_admin=True)
    os.sched_setaffinity(0, {1})
    changes = {"ok": 0, "failed": 0, "statuses": {}}
    stop = threading.Event()
    splits = [
        '{"blue": 90, "green": 5, "canary": 5}',
        '{"blue": 50, "green": 25, "canary": 25}',
        '{"blue": 0, "green": 0, "canary": 100}',
        '{"blue": 99.99, "green": 0, "canary": 0.01}',
    ]

    def changer():
        conn = http.client.HTTPConnection("127.0.0.1", admin, timeout=10)
        start = time.monotonic()
        n = 0
        while not stop.is_set():
            due = start + n / args.rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            conn.request("PUT", "/v1/routes/api/weights", body=splits[n % len(splits)],
                         headers={"content-type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            key = "ok" if resp.status == 200 else "failed"
            changes[key] += 1
            changes["statuses"][resp.status] = changes["statuses"].get(resp.status, 0) + 1
            n += 1

    try:
        # The same proxy without changes first: the baseline of this run.
        base = run_wrk(port, workdir, args.duration, args.connections)
        thread = threading.Thread(target=changer, daemon=True)
        thread.start()
        started = time.monotonic()
        r = run_wrk(port, workdir, args.duration, args.connections)
        elapsed = time.monotonic() - started
        stop.set()
        thread.join(timeout=15)
        events = sum(1 for _ in open(workdir / "state" / "events.jsonl"))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=40)
        origin_proc.terminate()
        origin_proc.wait(timeout=10)
    rate = changes["ok"] / elapsed
    verdict = "PASS" if r["bad"] == 0 and not r["socket_errors"] and changes["failed"] == 0 else "FAIL"
    section = f"""## Weight changes under load

- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}
- Command: `{' '.join(['python3', 'loadtests/bench.py'] + sys.argv[1:])}`
- Machine: {cpu_model()}, {os.cpu_count()} cores, {mem_gib():.0f} GiB, Linux {platform.release()}
- Versions: {version(['wrk', '-v'])}; {version([nginx_bin(), '-v'])}; switchyard {git_rev()}
- Setup: switchyard `workers: 1` pinned to core 0 with a `state_dir` (every change persisted with
  fsync and audited); origin nginx, wrk (1 thread, {args.connections} connections, {args.duration} s, a new
  `x-user-id` per request) and the weight changer on core 1. The changer PUTs
  `/v1/routes/api/weights` {args.rate} times a second on one keep-alive connection, cycling through
  four splits (90/5/5, 50/25/25, 0/0/100, 99.99/0/0.01).

| phase | requests | requests/s | non-2xx | socket errors | p99 ms | weight changes applied | changes/s | changes refused | audit events |
|---|---|---|---|---|---|---|---|---|---|
| baseline, no changes | {base['total']} | {base['rps']:.0f} | {base['bad']} | {base['socket_errors'] or 0} | {base['p99_ms']:.2f} | 0 | 0 | 0 | 0 |
| {args.rate} changes/s | {r['total']} | {r['rps']:.0f} | {r['bad']} | {r['socket_errors'] or 0} | {r['p99_ms']:.2f} | {changes['ok']} | {rate:.1f} | {changes['failed']} | {events} |

The changer shares core 1 with wrk and nginx, and each change's fsyncs run on a blocking thread
that inherits the proxy's pinning to core 0, so part of the throughput difference is CPU taken
from the measured processes rather than cost on the request path.

Verdict: **{verdict}** — zero failed requests caused by the changes is the goal.
"""
    write_section("## Weight changes under load", section)
    print(section)
    if verdict != "PASS":
        sys.exit(1)


def suite_rollout(args):
    """Steady load through a 50/50 canary rollout; the canary's origin is
    killed mid-run. Reports the time from the fault to the automatic
    rollback and how many user requests failed meanwhile."""
    import http.client
    import json
    import threading

    workdir = Path(tempfile.mkdtemp(prefix="switchyard-rollout-"))
    for name in ("blue", "canary"):
        (workdir / name).mkdir()
    blue_proc, blue = start_origin(workdir / "blue")
    canary_proc, canary = start_origin(workdir / "canary")
    port, admin = free_port(), free_port()
    conf = workdir / "switchyard.yaml"
    conf.write_text(f"""listen: 127.0.0.1:{port}
admin: {{ listen: 127.0.0.1:{admin} }}
workers: 1
user_key: {{ headers: [x-user-id] }}
routes:
  - name: api
    backends:
      - {{ name: blue, endpoints: ["127.0.0.1:{blue}"], weight: 100 }}
      - {{ name: canary, endpoints: ["127.0.0.1:{canary}"], weight: 0 }}
""")
    proc = subprocess.Popen(["taskset", "-c", "0", str(BIN), "run", "--config", str(conf)],
                            env={**os.environ, "RUST_LOG": "warn"})
    os.sched_setaffinity(0, {1})

    def admin_call(method, path, body=None):
        c = http.client.HTTPConnection("127.0.0.1", admin, timeout=10)
        c.request(method, path, body=body, headers={"content-type": "application/json"})
        r = c.getresponse()
        data = r.read()
        c.close()
        return r.status, json.loads(data or b"null")

    try:
        wait_port(admin)
        spec = {"stable": "blue", "target": "canary",
                "steps": [{"weight": 50, "hold": "1h"}, {"weight": 100}],
                "analysis": {"interval": f"{args.interval}s", "window": "5s", "min_requests": 50, "failure_threshold": 2}}
        status, body = admin_call("POST", "/v1/routes/api/rollout", json.dumps(spec))
        if status != 201:
            sys.exit(f"rollout did not start: {status} {body}")
        result = {}
        wrk = threading.Thread(target=lambda: result.update(run_wrk(port, workdir, args.duration, args.connections)))
        wrk.start()
        time.sleep(args.duration / 3)  # steady state before the fault
        canary_proc.kill()
        fault = time.monotonic()
        rolled_back = None
        while time.monotonic() - fault < args.duration:
            _, st = admin_call("GET", "/v1/routes/api/rollout")
            if st["phase"] == "rolled-back":
                rolled_back = time.monotonic() - fault
                reason = st["reason"]
                break
            time.sleep(0.02)
        wrk.join()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=40)
        for p in (blue_proc, canary_proc):
            p.kill()
            p.wait(timeout=10)
    if rolled_back is None:
        sys.exit("FAIL: the rollout was not rolled back")
    bound = 2 * args.interval + args.interval
    section = f"""## Rollout under load: canary fault to rollback

- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}
- Command: `{' '.join(['python3', 'loadtests/bench.py'] + sys.argv[1:])}`
- Machine: {cpu_model()}, {os.cpu_count()} cores, {mem_gib():.0f} GiB, Linux {platform.release()}
- Versions: {version(['wrk', '-v'])}; {version([nginx_bin(), '-v'])}; switchyard {git_rev()}
- Setup: switchyard `workers: 1` on core 0, route `api` with blue and canary each on its own
  nginx origin; a canary rollout at 50 % (interval {args.interval} s, window 5 s,
  min_requests 50, failure_threshold 2); wrk (1 thread, {args.connections} connections,
  {args.duration} s, a new `x-user-id` per request) on core 1. A third of the way in, the canary's
  nginx is killed (connections refused: the proxy answers 502 for canary users).

| requests | requests/s | failed requests (non-2xx + socket errors) | fault → rollback | bound (interval × threshold + interval) |
|---|---|---|---|---|
| {result['total']} | {result['rps']:.0f} | {result['bad']} {('+ ' + result['socket_errors']) if result['socket_errors'] else ''} | {rolled_back:.2f} s | {bound:.0f} s |

Rollback reason: `{reason}`. For scale: the canary's share × rate × time to rollback is
0.5 × {result['rps']:.0f} × {rolled_back:.2f} s ≈ {0.5 * result['rps'] * rolled_back:.0f} requests; after the swap the canary's
weight is 0, so no user is sent to it. (Connect failures are not yet retried on the stable
backend; doing so would save most of these requests.)
"""
    write_section("## Rollout under load: canary fault to rollback", section)
    print(section)
    if rolled_back > bound + 0.5:
        sys.exit("FAIL: rollback slower than its bound")


def cpu_model():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def mem_gib():
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024 / 1024
    return 0


def version(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    text = (p.stdout + p.stderr).strip().splitlines()
    return text[0] if text else " ".join(cmd)


def git_rev():
    p = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return p.stdout.strip() or "unknown"


def write_section(heading, section):
    """Replaces the section under `heading` in RESULTS.md (or appends it)."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Load-test results\n\nWritten by `loadtests/bench.py`; each section says how it was produced.\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(text):
        text = pattern.sub(section.rstrip() + "\n\n", text)
    else:
        text = text.rstrip() + "\n\n" + section.rstrip() + "\n"
    RESULTS.write_text(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=["metrics", "weights", "rollout"], help="which comparison to run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rate", type=int, default=100, help="weights suite: changes per second")
    parser.add_argument("--interval", type=int, default=1, help="rollout suite: analysis interval, seconds")
    parser.add_argument("--no-build", action="store_true", help="use the existing release binary")
    args = parser.parse_args()
    for tool in ("wrk", "taskset"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed (Debian: apt-get install wrk util-linux)")
    if not Path(nginx_bin()).exists():
        sys.exit("nginx is not installed (Debian: apt-get install nginx)")
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "-p", "switchyard-proxy"], cwd=ROOT, check=True)
    {"metrics": suite_metrics, "weights": suite_weights, "rollout": suite_rollout}[args.suite](args)


if __name__ == "__main__":
    main()
