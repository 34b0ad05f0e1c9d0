#!/usr/bin/env python3
"""Side-by-side load tests on loopback, written to loadtests/RESULTS.md.

    python3 loadtests/bench.py metrics     # Switchyard with metrics on vs off
    python3 loadtests/bench.py weights     # 100 weight changes/s under load: no failed request
    python3 loadtests/bench.py rollout     # an origin dies under load (a canary's, a stable endpoint): rollback time, requests lost
    python3 loadtests/bench.py compare     # nginx, haproxy, Switchyard and the origin itself, side by side
    python3 loadtests/bench.py instructions  # user-space instructions per request of each proxy (callgrind)
    python3 loadtests/bench.py tls         # TLS termination: Switchyard against nginx, keep-alive and handshakes
    python3 loadtests/bench.py memory      # idle RSS and RSS with 10,000 idle keep-alive connections, against nginx and haproxy

Fairness: the proxy under test is pinned to core 0; the origin (nginx, one
worker) and the load generator (wrk, one thread) share core 1. Variants
alternate within each round, so drift (thermal, noisy neighbours) hits all of
them alike; the report gives the median with min-max over the rounds.

Per variant and round: requests/s at saturation (closed loop, wrk), latency
percentiles from wrk, the proxy's CPU time per request (utime+stime from
/proc/<pid>/stat across the run), and its peak RSS (VmHWM). A round whose
responses were not all 2xx is discarded and reported.

The compare suite adds peers (nginx and haproxy as proxies, the origin
measured directly as the ceiling), open-loop latency at a fixed rate (oha),
HTTP/2 (h2load), larger bodies and memory with idle connections; see its
section in loadtests/README.md.

Needs: wrk, nginx, taskset (Debian: wrk nginx util-linux) and cargo; compare
also needs haproxy, h2load (Debian: haproxy nghttp2-client) and oha
(cargo install oha --locked); tls needs h2load, hey and openssl (Debian: nghttp2-client
hey openssl).
"""

import argparse
import asyncio
import atexit
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "loadtests" / "RESULTS.md"
BIN = ROOT / "target" / "release" / "switchyard"
CLK_TCK = os.sysconf("SC_CLK_TCK")
GENERATOR_CORE = 1            # the origin's and the load generators' (`taskset -c 1` below)
GENERATOR_SATURATED = 0.95    # the generator's core this busy: a throughput figure is bounded by it
PROXY_UNSATURATED = 0.9       # a proxy below this share of its core at saturation was not the bound
IDLE_TIMEOUT_S = 120          # every server keeps an idle keep-alive client this long
MAX_IDLE_CONNECTIONS = 10000  # the most the idle-connection test may hold
MAX_CONNECTIONS = 12000       # every server's client connection limit (nginx counts upstream ones too: twice)
# File descriptors for the harness and the servers it starts: the hard limit
# (raising it needs CAP_SYS_RESOURCE, which a container may not have).
_HARD_NOFILE = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
NOFILE = 65536 if _HARD_NOFILE == resource.RLIM_INFINITY else min(65536, _HARD_NOFILE)

# wrk gives every request its own user id, so the sticky split really works.
WRK_SCRIPT = """
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", "%(path)s", { ["x-user-id"] = "user-" .. n })
end
"""

# The origin's larger answers (files under its root), for the body-size runs.
BODIES = {"1 KiB": 1024, "64 KiB": 65536}


# === child processes ===
# Every server the harness starts is registered, so that an error, Ctrl-C or
# SIGTERM anywhere still stops it (atexit runs on SystemExit and
# KeyboardInterrupt alike).

CHILDREN = []


def spawn(cmd, **kwargs):
    proc = subprocess.Popen([str(c) for c in cmd], **kwargs)
    CHILDREN.append(proc)
    return proc


def stop(proc, timeout=40):
    """SIGTERM, then SIGKILL if it has not exited within `timeout` s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    if proc in CHILDREN:
        CHILDREN.remove(proc)


def stop_all():
    for proc in list(CHILDREN):
        stop(proc, timeout=5)


atexit.register(stop_all)


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


def cpu_split(pid):
    """(utime, stime) of `pid` in clock ticks: user space and kernel."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def cpu_ticks(pid):
    return sum(cpu_split(pid))


def status_kib(pid, key):
    """A `kB` field of /proc/<pid>/status: VmRSS (now) or VmHWM (peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def peak_rss_kib(pid):
    return status_kib(pid, "VmHWM")


def core_ticks(core):
    """(busy, all) clock ticks of one core since boot, from /proc/stat;
    idle and iowait are the not-busy ones."""
    for line in Path("/proc/stat").read_text().splitlines():
        fields = line.split()
        if fields[0] == f"cpu{core}":
            # user nice system idle iowait irq softirq steal (guest time is
            # already in user and nice); steal counts as busy: the core was
            # not ours to use.
            ticks = [int(f) for f in fields[1:9]]
            return sum(ticks) - ticks[3] - ticks[4], sum(ticks)
    return 0, 0


def core_busy(core):
    """Starts watching `core`; the returned function gives the share of the
    time since then that the core was busy (0 to 1), or None if the machine
    has no such core."""
    busy, every = core_ticks(core)
    def since():
        busy2, every2 = core_ticks(core)
        return (busy2 - busy) / (every2 - every) if every2 > every else None
    return since


def with_cpu(pid, run):
    """Runs `run()` (a load generator returning a dict with `total`) and adds
    the CPU time `pid` spent meanwhile per request (utime+stime from
    /proc/<pid>/stat), and the kernel's part of it (stime); None when there
    is no process to watch. Also how busy the load generator's core was:
    when it is saturated, the throughput measured is the generator's and the
    origin's, not the proxy's."""
    if not pid:
        busy = core_busy(GENERATOR_CORE)
        r = run()
        r["generator_core_busy"] = busy()
        r["cpu_us_per_req"] = r["kernel_us_per_req"] = None
        return r
    user, kernel = cpu_split(pid)
    busy = core_busy(GENERATOR_CORE)
    r = run()
    r["generator_core_busy"] = busy()
    user2, kernel2 = cpu_split(pid)
    per_req = lambda ticks: ticks / CLK_TCK * 1e6 / max(r["total"], 1)
    r["cpu_us_per_req"] = per_req(user2 - user + kernel2 - kernel)
    r["kernel_us_per_req"] = per_req(kernel2 - kernel)
    return r


def nginx_conf(workdir, name, servers, http_extra=""):
    """A single-process nginx (no master, one worker) whose files all live in
    `workdir` under `name`, so several can run side by side."""
    return f"""daemon off; master_process off; worker_processes 1; worker_rlimit_nofile {NOFILE};
pid {workdir}/{name}.pid; error_log {workdir}/{name}.err warn;
events {{ worker_connections {2 * MAX_CONNECTIONS}; }}
http {{
  access_log off; keepalive_requests 1000000; keepalive_timeout {IDLE_TIMEOUT_S}s;
  client_body_temp_path {workdir}/{name}-b; proxy_temp_path {workdir}/{name}-p;
  fastcgi_temp_path {workdir}/{name}-f; uwsgi_temp_path {workdir}/{name}-u; scgi_temp_path {workdir}/{name}-s;
{http_extra}
{servers}
}}
"""


def start_nginx(workdir, name, core, servers, http_extra="", ports=(), wrapper=()):
    conf = workdir / f"{name}.conf"
    conf.write_text(nginx_conf(workdir, name, servers, http_extra))
    proc = spawn(["taskset", "-c", core, *wrapper, nginx_bin(), "-c", conf, "-p", workdir])
    for port in ports:
        wait_port(port, timeout=60 if wrapper else 10)
    return proc


def start_origin(workdir, h2_port=None):
    """nginx, one worker on core 1, answering a small 200 at `/` and
    BODIES at `/bodies/<size>`; also h2c (prior knowledge) on `h2_port`."""
    port = free_port()
    (workdir / "bodies").mkdir(exist_ok=True)
    for size in BODIES.values():
        (workdir / "bodies" / str(size)).write_bytes(b"x" * size)
    h2_listen = f"listen 127.0.0.1:{h2_port} http2;" if h2_port else ""
    proc = start_nginx(workdir, "origin", "1", f"""  server {{
    listen 127.0.0.1:{port}; {h2_listen}
    location / {{ default_type text/plain; return 200 "ok\\n"; }}
    location /bodies/ {{ root {workdir}; default_type application/octet-stream; }}
  }}""", ports=[port] + ([h2_port] if h2_port else []))
    return proc, port


def nginx_bin():
    return shutil.which("nginx") or "/usr/sbin/nginx"


def switchyard_config(port, admin, origin, metrics_enabled, state_dir=None, extra=""):
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
{extra}
routes:
  - name: api
    backends:
{backends}
"""


def start_switchyard(binary, workdir, origin, metrics_enabled, wrapper=(), state_dir=None, with_admin=False, extra=""):
    port, admin = free_port(), free_port()
    conf = workdir / f"switchyard-{port}.yaml"
    conf.write_text(switchyard_config(port, admin, origin, metrics_enabled, state_dir, extra))
    proc = spawn(
        ["taskset", "-c", "0", *wrapper, binary, "run", "--config", conf],
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
            stop(proc)
            raise RuntimeError("switchyard did not become ready")
        time.sleep(0.02)
    if with_admin:
        return proc, port, admin
    return proc, port


def run_wrk(port, workdir, duration, connections, path="/", scheme="http"):
    script = workdir / f"users{path.replace('/', '-')}.lua"
    script.write_text(WRK_SCRIPT % {"path": path})
    out = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(script),
         f"{scheme}://127.0.0.1:{port}{path}"],
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
    proc, port = start_switchyard(args.binary, workdir, origin, enabled)
    try:
        r = with_cpu(proc.pid, lambda: run_wrk(port, workdir, args.duration, args.connections))
        r["rss_mib"] = peak_rss_kib(proc.pid) / 1024
    finally:
        stop(proc)
    r["variant"] = variant
    return r


CALLGRIND = ("valgrind", "--tool=callgrind", "--instr-atstart=no")


def instructions_per_request(binary, workdir, origin, enabled, requests=2000, warmup=200):
    """Instructions Switchyard executes per request (see `count_instructions`)."""
    def start(wrapper):
        proc, port = start_switchyard(binary, workdir, origin, enabled, wrapper=wrapper)
        return Running(proc, port, port)
    return count_instructions(start, workdir, requests, warmup)


def count_instructions(start, workdir, requests=2000, warmup=200):
    """Instructions a proxy executes per request, counted by callgrind:
    repeatable whatever else the machine does, unlike wall-clock figures on a
    shared VM. `start(wrapper)` starts the proxy under `wrapper` and returns
    its Running. Counting is switched on only around `requests` sequential
    keep-alive requests (after a warm-up), so start-up is not included. Only
    user space is counted: the kernel's work for the sockets is not."""
    out = workdir / f"callgrind-{time.monotonic_ns()}.out"
    running = start((*CALLGRIND, f"--callgrind-out-file={out}"))
    try:
        import http.client
        conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=30)

        def burst(n, offset):
            for i in range(n):
                conn.request("GET", "/", headers={"x-user-id": f"user-{offset + i}"})
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"status {resp.status} under callgrind")

        burst(warmup, 0)
        subprocess.run(["callgrind_control", "-i", "on", str(running.pid)], check=True, capture_output=True)
        burst(requests, warmup)
        subprocess.run(["callgrind_control", "-i", "off", str(running.pid)], check=True, capture_output=True)
        conn.close()
    finally:
        stop(running.proc, timeout=120)
    total = 0
    for f in workdir.glob(out.name + "*"):
        for m in re.findall(r"^(?:summary|totals):\s+(\d+)", f.read_text(errors="replace"), re.M):
            total = max(total, int(m))
    if not total:
        raise RuntimeError(f"callgrind wrote no count to {out}*")
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
        stop(origin_proc)

    instructions = {}
    if shutil.which("valgrind") and shutil.which("callgrind_control"):
        origin_proc2, origin2 = start_origin(Path(tempfile.mkdtemp(prefix="switchyard-cg-")))
        try:
            for variant, enabled in variants:
                instructions[variant] = instructions_per_request(args.binary, workdir, origin2, enabled)
                print(f"{variant}: {instructions[variant]:.0f} instructions/request (callgrind)", flush=True)
        finally:
            stop(origin_proc2)

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

{provenance(args, [['wrk', '-v'], [nginx_bin(), '-v']])}
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
    proc, port, admin = start_switchyard(args.binary, workdir, origin, True, state_dir=workdir / "state", with_admin=True)
    os.sched_setaffinity(0, {1})
    changes = {"ok": 0, "failed": 0, "statuses": {}}
    halt = threading.Event()
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
        while not halt.is_set():
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
        halt.set()
        thread.join(timeout=15)
        events = sum(1 for _ in open(workdir / "state" / "events.jsonl"))
    finally:
        stop(proc)
        stop(origin_proc)
    rate = changes["ok"] / elapsed
    verdict = "PASS" if r["bad"] == 0 and not r["socket_errors"] and changes["failed"] == 0 else "FAIL"
    section = f"""## Weight changes under load

{provenance(args, [['wrk', '-v'], [nginx_bin(), '-v']])}
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
    """Steady load while an origin dies mid-run, two ways: the canary's
    origin under a 50/50 canary rollout (time from the fault to the
    automatic rollback, requests failed meanwhile), and one of a stable
    backend's two endpoints (requests failed). Goal (issue 18): no failed
    request in either, and the rollback within its bound."""
    import http.client
    import json
    import threading

    workdir = Path(tempfile.mkdtemp(prefix="switchyard-rollout-"))
    for name in ("blue", "blue2", "canary"):
        (workdir / name).mkdir()

    def admin_call(admin, method, path, body=None):
        c = http.client.HTTPConnection("127.0.0.1", admin, timeout=10)
        c.request(method, path, body=body, headers={"content-type": "application/json"})
        r = c.getresponse()
        data = r.read()
        c.close()
        return r.status, json.loads(data or b"null")

    def proxy(name, backends):
        port, admin = free_port(), free_port()
        conf = workdir / f"{name}.yaml"
        lines = "\n".join(
            f"      - {{ name: {b}, endpoints: [{', '.join(chr(34) + '127.0.0.1:' + str(p) + chr(34) for p in ports)}], weight: {w} }}"
            for b, ports, w in backends)
        conf.write_text(f"""listen: 127.0.0.1:{port}
admin: {{ listen: 127.0.0.1:{admin} }}
workers: 1
user_key: {{ headers: [x-user-id] }}
routes:
  - name: api
    backends:
{lines}
""")
        proc = spawn(["taskset", "-c", "0", args.binary, "run", "--config", conf],
                     env={**os.environ, "RUST_LOG": "warn"})
        wait_port(admin)
        return proc, port, admin

    os.sched_setaffinity(0, {1})
    procs = []
    try:
        # 1. The canary's origin dies under a rollout.
        blue_proc, blue = start_origin(workdir / "blue")
        canary_proc, canary = start_origin(workdir / "canary")
        procs += [blue_proc, canary_proc]
        proc, port, admin = proxy("canary", [("blue", [blue], 100), ("canary", [canary], 0)])
        procs.append(proc)
        spec = {"stable": "blue", "target": "canary",
                "steps": [{"weight": 50, "hold": "1h"}, {"weight": 100}],
                "analysis": {"interval": f"{args.interval}s", "window": "5s", "min_requests": 50, "failure_threshold": 2}}
        status, body = admin_call(admin, "POST", "/v1/routes/api/rollout", json.dumps(spec))
        if status != 201:
            sys.exit(f"rollout did not start: {status} {body}")
        canary_run = {}
        wrk = threading.Thread(target=lambda: canary_run.update(run_wrk(port, workdir, args.duration, args.connections)))
        wrk.start()
        time.sleep(args.duration / 3)  # steady state before the fault
        canary_proc.kill()
        fault = time.monotonic()
        rolled_back, reason = None, None
        while time.monotonic() - fault < args.duration:
            _, st = admin_call(admin, "GET", "/v1/routes/api/rollout")
            if st["phase"] == "rolled-back":
                rolled_back = time.monotonic() - fault
                reason = st["reason"]
                break
            time.sleep(0.02)
        wrk.join()
        stop(proc)
        # 2. One of the stable backend's two endpoints dies.
        blue2_proc, blue2 = start_origin(workdir / "blue2")
        procs.append(blue2_proc)
        proc, port, admin = proxy("stable", [("blue", [blue, blue2], 100)])
        procs.append(proc)
        stable_run = {}
        wrk = threading.Thread(target=lambda: stable_run.update(run_wrk(port, workdir, args.duration, args.connections)))
        wrk.start()
        time.sleep(args.duration / 3)
        blue2_proc.kill()
        wrk.join()
    finally:
        for p in procs:
            stop(p)
    if rolled_back is None:
        sys.exit("FAIL: the rollout was not rolled back")
    bound = 2 * args.interval + args.interval

    def failed(run):
        return f"{run['bad']}{(' + ' + run['socket_errors']) if run['socket_errors'] else ''}"

    section = f"""## Rollout under load: canary fault to rollback

{provenance(args, [['wrk', '-v'], [nginx_bin(), '-v']])}
- Setup: switchyard `workers: 1` on core 0 with the default retries, failover and outlier ejection;
  wrk (1 thread, {args.connections} connections, {args.duration} s, a new `x-user-id` per request) on core 1;
  every origin an nginx. A third of the way into each run an origin is killed (its connections refused).
- Run 1: route `api` with blue and canary, a canary rollout at 50 % (interval {args.interval} s, window 5 s,
  min_requests 50, failure_threshold 2); the canary's nginx is killed. Its users are served by blue
  (failover) while the canary is charged with each failure, so the rollout still rolls back.
- Run 2: route `api` with one backend on two nginx origins; one is killed.
- Goal (issue 18): no failed request in either run, and the rollback within its bound.

| run | requests | requests/s | failed requests (non-2xx + socket errors) | fault → rollback | bound (interval × threshold + interval) |
|---|---|---|---|---|---|
| canary origin killed | {canary_run['total']} | {canary_run['rps']:.0f} | {failed(canary_run)} | {rolled_back:.2f} s | {bound:.0f} s |
| one of two stable endpoints killed | {stable_run['total']} | {stable_run['rps']:.0f} | {failed(stable_run)} | — | — |

Rollback reason: `{reason}`. Before issue 18 (connect failures not retried, no failover) the first
run lost 14,050 of 222,343 requests in the 1.97 s before the rollback.
"""
    write_section("## Rollout under load: canary fault to rollback", section)
    print(section)
    if rolled_back > bound + 0.5:
        sys.exit("FAIL: rollback slower than its bound")
    if canary_run["bad"] or canary_run["socket_errors"] or stable_run["bad"] or stable_run["socket_errors"]:
        sys.exit("FAIL: requests failed")


# === compare: the origin, nginx, haproxy and Switchyard side by side ===

# Five flags of every kind, so each request evaluates them all and carries
# `x-feature-flags` upstream.
FLAGS_YAML = """flags:
  - { name: new-checkout, rollout_percentage: 50 }
  - { name: dark-mode, rollout_percentage: 10, target_groups: [beta] }
  - { name: search-v2, rollout_percentage: 100 }
  - { name: fast-cart, enabled: false }
  - { name: promo-banner, rollout_percentage: 25, overrides: { user-1: true } }"""
SWITCHYARD_LIMITS_YAML = f"""limits: {{ max_connections: {MAX_CONNECTIONS} }}
timeouts: {{ idle: {IDLE_TIMEOUT_S}s }}"""
RATE_TOLERANCE = 0.95  # an open-loop run below 95 % of its target rate is discarded
FOREIGN_CPU_NOISY = 0.1  # cores taken by other work during a measurement that make it noisy
OHA_USER = "user-1"    # oha and h2load send one fixed header; wrk varies the user per request


@dataclass
class Running:
    """A started peer: the process whose CPU and memory are measured (None
    for the origin measured directly, which is shared and not a proxy), its
    HTTP/1.1 port and its h2c (prior knowledge) port."""
    proc: object
    port: int
    h2_port: int

    @property
    def pid(self):
        return self.proc.pid if self.proc else None


@dataclass
class Peer:
    name: str
    start: object  # (workdir, origin[, wrapper]) -> Running; wrapper: a command to run it under (callgrind)
    is_proxy: bool = True
    # A TCP forwarder that parses nothing: what the kernel's part of proxying
    # costs, the least any proxy could. Not in the memory tests (each idle
    # client would hold an origin connection) and no goal is set against it.
    floor: bool = False


def start_nginx_proxy(workdir, origin, tls="", wrapper=()):
    """nginx as a reverse proxy: one worker, upstream keep-alive. With `tls`
    (the server's ssl_* directives), one port terminating TLS, HTTP/1.1 and
    h2 chosen by ALPN."""
    port = free_port()
    h2_port = port if tls else free_port()
    name = f"nginx-proxy-{port}"
    listen = f"listen 127.0.0.1:{port} ssl http2; {tls}" if tls else \
        f"listen 127.0.0.1:{port}; listen 127.0.0.1:{h2_port} http2;"
    proc = start_nginx(workdir, name, "0", f"""  server {{
    {listen}
    location / {{
      proxy_pass http://origin; proxy_http_version 1.1;
      proxy_set_header Connection ""; proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_max_temp_file_size 0;
    }}
  }}""", http_extra=f"  upstream origin {{ server 127.0.0.1:{origin.port}; keepalive 64; keepalive_requests 1000000; }}",
        ports=(port, h2_port), wrapper=wrapper)
    return Running(proc, port, h2_port)


def haproxy_conf(port, h2_port, origin, tcp=False):
    """haproxy, one thread: an HTTP proxy with `http-reuse always`; with
    `tcp`, a TCP forwarder instead (each client connection gets an origin
    connection of its own, bytes copied both ways, nothing parsed)."""
    common = f"""global
  nbthread 1
  maxconn {MAX_CONNECTIONS}
  # It wants two descriptors per connection (client and server side) and will not start
  # under a lower hard limit unless told; in HTTP mode, with `http-reuse always`, the
  # server side is a handful of shared connections, so the idle clients still fit (the
  # TCP forwarder is kept out of the idle-connection test).
  no strict-limits
defaults
  maxconn {MAX_CONNECTIONS}
  timeout connect 1s
  timeout client {IDLE_TIMEOUT_S}s
  timeout server 30s
"""
    if tcp:
        return common + f"""  mode tcp
frontend proxy
  bind 127.0.0.1:{port}
  default_backend origin
frontend proxy_h2
  bind 127.0.0.1:{h2_port}
  default_backend origin_h2
backend origin
  server origin 127.0.0.1:{origin.port}
backend origin_h2
  server origin 127.0.0.1:{origin.h2_port}
"""
    return common + f"""  mode http
  timeout http-keep-alive {IDLE_TIMEOUT_S}s
  option forwardfor
  http-reuse always
frontend proxy
  bind 127.0.0.1:{port}
  bind 127.0.0.1:{h2_port} proto h2
  default_backend origin
backend origin
  server origin 127.0.0.1:{origin.port}
"""


def start_haproxy(workdir, origin, tcp=False, wrapper=()):
    """haproxy as configured by `haproxy_conf`, pinned to the proxy core."""
    port, h2_port = free_port(), free_port()
    conf = workdir / f"haproxy-{port}.cfg"
    conf.write_text(haproxy_conf(port, h2_port, origin, tcp))
    with open(workdir / f"haproxy-{port}.log", "w") as log:
        proc = spawn(["taskset", "-c", "0", *wrapper, haproxy_bin(), "-db", "-f", conf], stderr=log)
    for p in (port, h2_port):
        wait_port(p, timeout=60 if wrapper else 10)
    return Running(proc, port, h2_port)


def switchyard_peer(binary, features, tls=""):
    """Switchyard (one worker thread) with the three-backend sticky split;
    `features`: metrics and five flags on, otherwise both off; `tls`: a
    `tls:` section (then h1 and h2 by ALPN on the one port)."""
    def start(workdir, origin, wrapper=()):
        extra = SWITCHYARD_LIMITS_YAML + ("\n" + FLAGS_YAML if features else "") + ("\n" + tls if tls else "")
        proc, port = start_switchyard(binary, workdir, origin.port, features, extra=extra, wrapper=wrapper)
        return Running(proc, port, port)  # h1 and h2c on one port
    return start


FLOOR = "haproxy, TCP only (floor)"


def compare_peers(args):
    return [
        Peer("origin direct (ceiling)", lambda workdir, origin: origin, is_proxy=False),
        Peer("nginx", start_nginx_proxy),
        Peer("haproxy", start_haproxy),
        Peer(FLOOR, lambda workdir, origin, wrapper=(): start_haproxy(workdir, origin, tcp=True, wrapper=wrapper), floor=True),
        Peer("switchyard", switchyard_peer(args.binary, features=True)),
        Peer("switchyard, metrics+flags off", switchyard_peer(args.binary, features=False)),
    ]


def haproxy_bin():
    return shutil.which("haproxy") or "/usr/sbin/haproxy"


def oha_bin():
    return shutil.which("oha") or str(Path.home() / ".cargo" / "bin" / "oha")


# --- load generators: each returns rps, total, bad (non-2xx), socket_errors and latencies

def run_oha(port, rate, duration, connections):
    """Open loop: `rate` requests/s whatever the answers' pace; latency counted
    from each request's scheduled start (--latency-correction), so a stall
    shows in the percentiles instead of slowing the generator. Requests in
    flight at the end are waited for (-w), not counted as errors."""
    out = subprocess.run(
        ["taskset", "-c", "1", oha_bin(), "--no-tui", "--output-format", "json", "-z", f"{duration}s", "-w",
         "-q", str(rate), "--latency-correction", "-c", str(connections), "-H", f"x-user-id: {OHA_USER}",
         f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, check=True, timeout=duration + 60,
    ).stdout
    data = json.loads(out)
    codes = data.get("statusCodeDistribution") or {}
    errors = data.get("errorDistribution") or {}
    pct = data["latencyPercentiles"]
    return {
        "rps": data["summary"]["requestsPerSec"],
        "total": sum(codes.values()),
        "bad": sum(n for code, n in codes.items() if not code.startswith("2")),
        "socket_errors": ", ".join(f"{k}: {v}" for k, v in errors.items()),
        "p50_ms": pct["p50"] * 1000,
        "p99_ms": pct["p99"] * 1000,
        "p999_ms": pct["p99.9"] * 1000,
    }


def run_h2load(port, duration, connections, scheme="http"):
    """HTTP/2 with prior knowledge (`https`: by ALPN), closed loop:
    `connections` streams in all, over a few connections (each with several
    streams open)."""
    clients = max(1, connections // 8)
    out = subprocess.run(
        ["taskset", "-c", "1", "h2load", "-t1", f"-c{clients}", f"-m{connections // clients}", f"-D{duration}",
         "-H", f"x-user-id: {OHA_USER}", f"{scheme}://127.0.0.1:{port}/"],
        capture_output=True, text=True, check=True, timeout=duration + 60,
    ).stdout
    rps = float(re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", out).group(1))
    done = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                     r"(\d+) errored, (\d+) timeout", out)
    codes = [int(n) for n in re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out).groups()]
    failed, errored, timeout = (int(done.group(i)) for i in (5, 6, 7))
    return {
        "rps": rps,
        "total": codes[0],
        "bad": sum(codes[1:]),
        "socket_errors": f"{failed} failed, {errored} errored, {timeout} timeout" if failed + errored + timeout else "",
    }


def hold_idle_connections(port, count, measure, concurrency=64, timeout=120.0, tls=None):
    """Opens `count` keep-alive connections to `port` (over TLS with the
    `tls` ssl.SSLContext), sends one request on each (at most `concurrency`
    at a time, so upstream concurrency stays as in the load runs), leaves
    them open and idle, and calls `measure()`. Returns (connections still
    open with a 2xx answer, measure's value)."""
    async def main():
        gate = asyncio.Semaphore(concurrency)
        held = []  # (reader, writer) of connections answered 2xx

        async def one(i):
            async with gate:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=tls, server_hostname="localhost" if tls else None)
                writer.write(f"GET / HTTP/1.1\r\nhost: bench\r\nx-user-id: idle-{i}\r\n\r\n".encode())
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                await reader.readexactly(int(length.group(1)) if length else 0)
                if head.split(b" ", 2)[1].startswith(b"2"):
                    held.append((reader, writer))
                else:
                    writer.close()

        tasks = [asyncio.ensure_future(one(i)) for i in range(count)]
        try:
            await asyncio.wait(tasks, timeout=timeout)
            await asyncio.sleep(1)  # let the server settle into idle
            value = measure()
            return sum(1 for reader, _ in held if not reader.at_eof()), value
        finally:
            for task in tasks:
                task.cancel()
            for _, writer in held:
                writer.close()
            await asyncio.gather(*tasks, return_exceptions=True)

    return asyncio.run(main())


def one_request(port, tls=None):
    """One keep-alive request through the peer (over TLS with the `tls`
    ssl.SSLContext): its status."""
    import http.client
    conn = (http.client.HTTPSConnection("localhost", port, timeout=10, context=tls) if tls
            else http.client.HTTPConnection("127.0.0.1", port, timeout=10))
    try:
        conn.request("GET", "/", headers={"x-user-id": "user-1"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


# --- one run of the comparison

def build_running():
    """Whether a Rust build (cargo or rustc) is running on the machine: it
    competes for the cores, so the report says how often one was seen."""
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() in ("cargo", "rustc"):
                return True
        except OSError:
            continue
    return False


def machine_ticks():
    """CPU ticks the whole machine spent in processes (user + nice + system
    in /proc/stat; interrupts left out, they are nobody's)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return int(fields[1]) + int(fields[2]) + int(fields[3])


def own_ticks():
    """CPU ticks of this harness, the load generators it has waited for and
    the servers it runs."""
    t = os.times()
    own = (t.user + t.system + t.children_user + t.children_system) * CLK_TCK
    for proc in CHILDREN:
        try:
            own += cpu_ticks(proc.pid)
        except OSError:
            continue  # exited and reaped: counted in the children's times
    return own


def foreign_cores(run):
    """Runs `run()`; returns its value and the cores that processes not
    started by the harness used meanwhile (other builds, other benchmarks)."""
    started, machine, own = time.monotonic(), machine_ticks(), own_ticks()
    value = run()
    foreign = (machine_ticks() - machine) - (own_ticks() - own)
    return value, max(0.0, foreign / CLK_TCK / (time.monotonic() - started))


def wait_until_quiet(limit_s, probe_s=0.5):
    """Waits, at most `limit_s` seconds, until other processes use under
    FOREIGN_CPU_NOISY of a core over `probe_s`; returns the seconds waited
    past the first probe."""
    started = time.monotonic()
    while foreign_cores(lambda: time.sleep(probe_s))[1] > FOREIGN_CPU_NOISY:
        if time.monotonic() - started >= limit_s:
            break
    return time.monotonic() - started - probe_s


@dataclass
class Tally:
    """Every kept result per peer and measurement, what was discarded and
    why, how many measurements overlapped a build, and how much CPU other
    processes on the machine took during each (cores)."""
    kept: dict = field(default_factory=dict)
    discarded: list = field(default_factory=list)
    measurements: int = 0
    during_build: int = 0
    foreign_cores: list = field(default_factory=list)
    quiet_wait_s: float = 0  # before each measurement, wait this long at most for other work to stop
    waited_s: float = 0

    def sample(self, measure):
        """Runs `measure()` (first waiting a while for a quiet machine),
        noting whether a build ran before or after it and the CPU that
        processes not started by the harness used meanwhile."""
        if self.quiet_wait_s:
            self.waited_s += wait_until_quiet(self.quiet_wait_s)
        building = build_running()
        value, cores = foreign_cores(measure)
        self.foreign_cores.append(cores)
        self.measurements += 1
        self.during_build += int(building or build_running())
        return value

    def interference(self):
        """A sentence on builds and other processes seen during the measurements."""
        if not self.measurements:
            return ""
        builds = (f"**A Rust build (cargo/rustc) was running during {self.during_build} of the {self.measurements} "
                  f"measurements.** " if self.during_build else "No Rust build was seen running. ")
        median, worst = statistics.median(self.foreign_cores), max(self.foreign_cores)
        waited = f" (the harness waited {self.waited_s:.0f} s in all for other work to stop)" if self.waited_s > 1 else ""
        others = (f"Processes not started by the harness used a median {median:.2f} and at most {worst:.2f} of a "
                  f"core during the measurements{waited}")
        noisy = sum(1 for c in self.foreign_cores if c > FOREIGN_CPU_NOISY)
        if noisy:
            return (builds + others + f"; **{noisy} of them had more than {FOREIGN_CPU_NOISY} of a core taken by "
                    f"other work**: those figures are noisy, rerun on a quiet machine.")
        return builds + others + "."

    def record(self, where, peer, what, result, problem):
        if problem:
            self.discarded.append(f"{where} {peer} {what}: {problem}")
        else:
            self.kept.setdefault(peer, {}).setdefault(what, []).append(result)

    def values(self, peer, what, key):
        return [r[key] for r in self.kept.get(peer, {}).get(what, []) if r.get(key) is not None]

    def median(self, peer, what, key):
        values = self.values(peer, what, key)
        return statistics.median(values) if values else None


def rejection(r, target_rate=None):
    """Why a run cannot be kept (non-2xx answers, socket errors, an open-loop
    run below its target rate), or "" when it can."""
    reasons = []
    if r["bad"]:
        reasons.append(f"{r['bad']} non-2xx")
    if r["socket_errors"]:
        reasons.append(f"socket errors {r['socket_errors']}")
    if target_rate and r["rps"] < RATE_TOLERANCE * target_rate:
        reasons.append(f"{r['rps']:.0f} req/s missed the {target_rate} req/s target")
    return "; ".join(reasons)


def compare_loads(args, workdir, rate):
    """(name, run(running) -> result, target rate) for the load phase, in order."""
    wrk = lambda path: lambda running: run_wrk(running.port, workdir, args.duration, args.connections, path)
    loads = [
        ("saturation", wrk("/"), None),
        ("fixed rate", lambda running: run_oha(running.port, rate, args.duration, args.connections), rate),
        ("h2", lambda running: run_h2load(running.h2_port, args.duration, args.connections), None),
    ]
    loads += [(label, wrk(f"/bodies/{size}"), None) for label, size in BODIES.items()]
    return loads


def load_phase(peer, origin, workdir, args, loads, tally, where, scheme="http"):
    """One fresh process: a warm-up, then every load back to back, each with
    the proxy's CPU per request; the peak RSS over all of them."""
    running = peer.start(workdir, origin)
    try:
        run_wrk(running.port, workdir, args.warmup, args.connections, scheme=scheme)
        for what, run, target in loads:
            r = tally.sample(lambda: with_cpu(running.pid, lambda: run(running)))
            tally.record(where, peer.name, what, r, rejection(r, target))
            cpu = f", {r['cpu_us_per_req']:.2f} µs CPU/req" if r["cpu_us_per_req"] is not None else ""
            print(f"{where} {peer.name} {what}: {r['rps']:.0f} req/s{cpu}, bad {r['bad']}"
                  f"{', p99 %.2f ms' % r['p99_ms'] if 'p99_ms' in r else ''}", flush=True)
        if running.pid:
            tally.record(where, peer.name, "memory", {"peak_rss_mib": peak_rss_kib(running.pid) / 1024}, "")
    finally:
        if running.proc:
            stop(running.proc)


def memory_phase(peer, origin, workdir, args, tally, where, tls=None):
    """One fresh process: VmRSS after start-up and one request, then with
    `args.idle_connections` idle keep-alive client connections open (over
    TLS with the `tls` ssl.SSLContext)."""
    running = peer.start(workdir, origin)
    try:
        status = one_request(running.port, tls)
        time.sleep(0.2)
        idle = status_kib(running.pid, "VmRSS") / 1024
        held, rss = tally.sample(lambda: hold_idle_connections(
            running.port, args.idle_connections, lambda: status_kib(running.pid, "VmRSS") / 1024, tls=tls))
    finally:
        stop(running.proc)
    problem = "" if status // 100 == 2 else f"first answer {status}"
    tally.record(where, peer.name, "idle", {"idle_rss_mib": idle}, problem)
    if held < args.idle_connections:
        problem = f"only {held} of {args.idle_connections} connections open with a 2xx"
    tally.record(where, peer.name, "connections", {"conns_rss_mib": rss, "held": held}, problem)
    print(f"{where} {peer.name}: idle {idle:.1f} MiB, {held} idle connections {rss:.1f} MiB", flush=True)


def calibrate_rate(peer, origin, workdir, args):
    """Half of nginx's saturation rate, rounded to 100: the open-loop rate."""
    wait_until_quiet(args.quiet_wait)
    running = peer.start(workdir, origin)
    try:
        run_wrk(running.port, workdir, args.warmup, args.connections)
        r = run_wrk(running.port, workdir, args.duration, args.connections)
    finally:
        stop(running.proc)
    if rejection(r):
        sys.exit(f"calibration run through nginx failed: {rejection(r)}")
    return max(100, int(round(r["rps"] / 2, -2)))


def suite_compare(args):
    os.sched_setaffinity(0, {1})  # the idle-connection client and this script stay off the proxies' core
    workdir = Path(tempfile.mkdtemp(prefix="switchyard-compare-"))
    h2_port = free_port()
    origin_proc, port = start_origin(workdir, h2_port=h2_port)
    origin = Running(None, port, h2_port)
    peers = compare_peers(args)
    tally = Tally(quiet_wait_s=args.quiet_wait)
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    try:
        rate = args.open_rate or calibrate_rate(peers[1], origin, workdir, args)
        print(f"open-loop rate: {rate} req/s", flush=True)
        loads = compare_loads(args, workdir, rate)
        for rnd in range(args.rounds):
            order = peers if rnd % 2 == 0 else list(reversed(peers))
            where = f"round {rnd + 1}"
            for peer in order:
                load_phase(peer, origin, workdir, args, loads, tally, where)
            for peer in order:
                if peer.is_proxy and not peer.floor:
                    memory_phase(peer, origin, workdir, args, tally, where)
    finally:
        stop(origin_proc)
    elapsed = time.monotonic() - started
    section = compare_section(args, peers, tally, rate, elapsed, load_before)
    write_section("## Side by side: nginx, haproxy, Switchyard", section)
    print(section)


# --- the report

def cell(tally, peer, what, key, fmt):
    values = tally.values(peer, what, key)
    return summary(values, fmt) if values else "—"


def percent_cell(tally, peer, what):
    values = [100 * v for v in tally.values(peer, what, "generator_core_busy")]
    return summary(values, "{:.0f} %") if values else "—"


def ratio_goal(tally, text, what, key, peer, reference, limit, at_most=True):
    """A goal on the ratio of two peers' medians for one figure: (text, the
    measured ratio, PASS/MISS). When the two peers' min–max ranges overlap,
    the difference is within this run's noise, and the cell says so."""
    mine, theirs = tally.values(peer, what, key), tally.values(reference, what, key)
    if not mine or not theirs:
        return text, "not measured", "MISS"
    value, ref = statistics.median(mine), statistics.median(theirs)
    ratio = value / ref
    ok = ratio <= limit if at_most else ratio >= limit
    number = lambda v: f"{v:.0f}" if abs(v) >= 100 else f"{v:.2f}"
    overlap = len(mine) > 1 and max(min(mine), min(theirs)) <= min(max(mine), max(theirs))
    noise = "; min–max ranges overlap: within this run's noise" if overlap else ""
    return text, f"{ratio:.2f}× ({number(value)} vs {number(ref)}{noise})", "PASS" if ok else "MISS"


def memory_goals(tally):
    """The two memory goals: idle RSS, and RSS with the idle connections
    against nginx's."""
    idle = tally.median("switchyard", "idle", "idle_rss_mib")
    return [
        ("idle RSS ≤ 8 MiB", "not measured" if idle is None else f"{idle:.1f} MiB",
         "PASS" if idle is not None and idle <= 8 else "MISS"),
        ratio_goal(tally, "RSS with the idle keep-alive connections ≤ nginx's",
                   "connections", "conns_rss_mib", "switchyard", "nginx", 1.0),
    ]


def proxy_core_busy(tally, peer):
    """The share of its core a proxy used at saturation: its CPU time per
    request times the requests it served per second (medians)."""
    cpu = tally.median(peer, "saturation", "cpu_us_per_req")
    rps = tally.median(peer, "saturation", "rps")
    return None if cpu is None or rps is None else cpu * rps / 1e6


def generator_bound(tally, peers, goal):
    """A throughput goal whose runs had the load generator's core saturated
    says so: such a figure is bounded by the load generator and the origin
    (they share a core), and, when the proxies' core was not saturated too,
    not by the proxies."""
    busy = [tally.median(p, "saturation", "generator_core_busy") for p in peers]
    if None in busy or min(busy) < GENERATOR_SATURATED:
        return goal
    text, measured, verdict = goal
    proxies = [proxy_core_busy(tally, p) for p in peers]
    generator = f"the load generator's core was {100 * min(busy):.0f}–{100 * max(busy):.0f} % busy"
    if None not in proxies and max(proxies) < PROXY_UNSATURATED:
        why = (f"{generator}, the proxies' {100 * min(proxies):.0f}–{100 * max(proxies):.0f} %: the throughput "
               f"measured is the load generator's and the origin's limit, not the proxies'")
    else:
        shown = "" if None in proxies else f" and the proxies' {100 * min(proxies):.0f}–{100 * max(proxies):.0f} %"
        why = f"{generator}{shown}: both cores near saturation, the throughput measured is bounded by both"
    return text, f"{measured}; {why}", verdict


def compare_goals(tally):
    sy, off, ng, hp = "switchyard", "switchyard, metrics+flags off", "nginx", "haproxy"
    best_peer = max((ng, hp), key=lambda p: tally.median(p, "saturation", "rps") or 0)
    return [
        ratio_goal(tally, "CPU per request at the fixed rate ≤ 0.8× nginx's",
                   "fixed rate", "cpu_us_per_req", sy, ng, 0.8),
        ratio_goal(tally, "CPU per request at the fixed rate ≤ 0.8× haproxy's",
                   "fixed rate", "cpu_us_per_req", sy, hp, 0.8),
        generator_bound(tally, (sy, best_peer), ratio_goal(
            tally, f"saturation throughput ≥ 1.1× the better of nginx and haproxy ({best_peer})",
            "saturation", "rps", sy, best_peer, 1.1, at_most=False)),
        ratio_goal(tally, "p99 at the fixed rate ≤ nginx's", "fixed rate", "p99_ms", sy, ng, 1.0),
        *memory_goals(tally),
        generator_bound(tally, (sy, off), ratio_goal(
            tally, "metrics and flags cost < 5 % of throughput: req/s with them ≥ 0.95× without (same binary)",
            "saturation", "rps", sy, off, 0.95, at_most=False)),
    ]


def cpu_floor(tally):
    """What the CPU and throughput goals ask of user space, given the
    kernel's share: the proxy's system time per request (reading from and
    writing to two sockets; on loopback a write also runs the receiver's TCP
    path) against what the goal allows in all."""
    best = max(("nginx", "haproxy"), key=lambda p: tally.median(p, "saturation", "rps") or 0)
    rows = []
    for what, peer, goal, factor in (
            ("fixed rate", "nginx", "CPU per request ≤ 0.8× nginx's", 0.8),
            ("saturation", best, f"throughput ≥ 1.1× {best}'s (one core: CPU per request ≤ {best}'s / 1.1)",
             1 / 1.1)):
        kernel = tally.median("switchyard", what, "kernel_us_per_req")
        total = tally.median("switchyard", what, "cpu_us_per_req")
        theirs = tally.median(peer, what, "cpu_us_per_req")
        their_kernel = tally.median(peer, what, "kernel_us_per_req")
        if None in (kernel, total, theirs, their_kernel):
            continue
        allowed = factor * theirs
        rows.append(f"| {what} | {kernel:.2f} | {total - kernel:.2f} | {peer}: {their_kernel:.2f} | "
                    f"{theirs - their_kernel:.2f} | {goal}: {allowed:.2f} in all, "
                    f"{allowed - kernel:.2f} left for user space |")
    if not rows:
        return ""
    return ("Where the CPU goes (µs per request, medians; kernel = stime, user = utime):\n\n"
            "| load | Switchyard kernel | Switchyard user | peer kernel | peer user | what the goal allows |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(rows))


def tcp_floor(tally):
    """What even a proxy that parses nothing costs, against nginx's CPU per
    request. A proxy's CPU is its kernel time (the socket calls: about the
    same for every proxy, see "of which kernel") plus its user time; the TCP
    forwarder's user time is the least any proxy's can be (an HTTP proxy
    parses and writes heads besides copying bytes). So the lowest kernel
    time measured for an HTTP proxy plus the forwarder's user time is a
    floor for an HTTP proxy here: when it is above what a goal allows, no
    HTTP proxy can meet that goal on this machine."""
    lines = []
    for what, factor in (("fixed rate", 0.8), ("saturation", None)):
        total = tally.median(FLOOR, what, "cpu_us_per_req")
        kernel = tally.median(FLOOR, what, "kernel_us_per_req")
        ref = tally.median("nginx", what, "cpu_us_per_req")
        # Every proxy measured but the forwarder (the origin has no kernel figure).
        kernels = [k for k in (tally.median(p, what, "kernel_us_per_req") for p in tally.kept if p != FLOOR)
                   if k is not None]
        if None in (total, kernel, ref) or not kernels:
            continue
        user = total - kernel
        bound = min(kernels) + user
        line = (f"- {what}: the forwarder {total:.2f} µs per request ({kernel:.2f} of it the kernel's, "
                f"{user:.2f} user space), {total / ref:.2f}× nginx's {ref:.2f}. The least an HTTP proxy could cost "
                f"(the lowest HTTP proxy's kernel time, {min(kernels):.2f}, plus the forwarder's user time): "
                f"{bound:.2f} µs, {bound / ref:.2f}× nginx's")
        if factor is not None:
            spread = tally.values(FLOOR, what, "cpu_us_per_req")
            noise = (f" (the forwarder's own runs spread {min(spread):.2f}–{max(spread):.2f})"
                     if len(spread) > 1 else "")
            line += (f": above the {factor}× nginx's the goal asks, so no HTTP proxy could meet it in this run{noise}"
                     if bound > factor * ref else f": under the {factor}× nginx's the goal asks{noise}")
        lines.append(line + ".")
    if not lines:
        return ""
    return ("The floor: haproxy in `mode tcp` copies bytes between each client connection and an origin "
            "connection of its own, parsing nothing (the same four socket calls per request as an HTTP proxy "
            "with upstream keep-alive):\n\n" + "\n".join(lines))


def compare_section(args, peers, tally, rate, elapsed, load_before):
    main_rows, extra_rows, memory_rows = [], [], []
    for peer in peers:
        c = lambda what, key, fmt: cell(tally, peer.name, what, key, fmt)
        main_rows.append(
            f"| {peer.name} | {c('saturation', 'rps', '{:.0f}')} | {c('fixed rate', 'p50_ms', '{:.2f}')} | "
            f"{c('fixed rate', 'p99_ms', '{:.2f}')} | {c('fixed rate', 'p999_ms', '{:.2f}')} | "
            f"{c('fixed rate', 'cpu_us_per_req', '{:.2f}')} | {c('fixed rate', 'kernel_us_per_req', '{:.2f}')} | "
            f"{c('saturation', 'cpu_us_per_req', '{:.2f}')} | "
            f"{c('memory', 'peak_rss_mib', '{:.1f}')} | {percent_cell(tally, peer.name, 'saturation')} |"
        )
        extra_rows.append(
            f"| {peer.name} | {c('h2', 'rps', '{:.0f}')} | {c('h2', 'cpu_us_per_req', '{:.2f}')} | "
            + " | ".join(f"{c(label, 'rps', '{:.0f}')} | {c(label, 'cpu_us_per_req', '{:.2f}')}" for label in BODIES)
            + " |"
        )
        if peer.is_proxy and not peer.floor:
            memory_rows.append(
                f"| {peer.name} | {c('idle', 'idle_rss_mib', '{:.1f}')} | {c('connections', 'conns_rss_mib', '{:.1f}')} |"
            )
    goals = "\n".join(f"| {text} | {measured} | **{verdict}** |" for text, measured, verdict in compare_goals(tally))
    body_heads = " | ".join(f"{label} req/s | {label} CPU µs/req" for label in BODIES)
    return f"""## Side by side: nginx, haproxy, Switchyard

{provenance(args, [['wrk', '-v'], [oha_bin(), '--version'], ['h2load', '--version'], [nginx_bin(), '-v'],
                   [haproxy_bin(), '-v']])}
- Setup, all on loopback: every proxy pinned to core 0, one worker/thread each: nginx (`master_process off`,
  upstream `keepalive 64`, `X-Forwarded-For`), haproxy (`nbthread 1`, `http-reuse always`, `option forwardfor`),
  Switchyard (`workers: 1`, a three-backend sticky split 90/5/5 by `x-user-id` with all three backends on the
  origin, metrics on, five flags sent upstream in `x-feature-flags`) and the same binary with metrics and
  flags off. The origin (nginx, one worker, a 3-byte 200) and every load generator on core 1. "origin direct"
  is the origin without a proxy: the ceiling. "{FLOOR}" is haproxy forwarding TCP, parsing nothing:
  the floor, what the kernel's part of any proxy costs (no goal is set against it, no memory test).
- Per round, in an order that reverses every round, each peer is started fresh, warmed up ({args.warmup} s), then
  measured back to back for {args.duration} s each: saturation (wrk, 1 thread, {args.connections} connections,
  a new `x-user-id` per request); open loop at a fixed **{rate} req/s** (about half of nginx's saturation
  rate: oha `-q {rate} --latency-correction`, {args.connections} connections); HTTP/2 with prior knowledge
  (h2load, {max(1, args.connections // 8)} connections × {args.connections // max(1, args.connections // 8)} streams);
  1 KiB and 64 KiB bodies (wrk). CPU µs/request is the proxy's utime+stime from `/proc/<pid>/stat` across
  each run over the requests it served; peak RSS is VmHWM after all of them. Then each proxy is started
  fresh again: idle RSS is VmRSS after one request; then {args.idle_connections} keep-alive client connections,
  one request answered on each, held idle (VmRSS one second after the last answer).
- {args.rounds} round(s); cells are the median (min–max) of the kept runs. A run is discarded if any answer was
  not 2xx (wrk counts statuses ≥ 400 and socket errors; oha and h2load report every status), or if an
  open-loop run delivered under {RATE_TOLERANCE:.0%} of its target rate.
- The whole run took {elapsed / 60:.1f} minutes; load average {load_before:.2f} at the start,
  {os.getloadavg()[0]:.2f} at the end. {tally.interference()}

| peer | req/s at saturation | p50 ms | p99 ms | p99.9 ms | CPU µs/req at {rate} req/s | of which kernel | CPU µs/req at saturation | peak RSS MiB | load generator's core busy at saturation |
|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(main_rows)}

| peer | h2 req/s | h2 CPU µs/req | {body_heads} |
|---|---|---|---|---|---|---|
{chr(10).join(extra_rows)}

| proxy | idle RSS MiB | RSS MiB with {args.idle_connections} idle connections |
|---|---|---|
{chr(10).join(memory_rows)}

Goals (ratios of medians from this run):

| goal | measured | verdict |
|---|---|---|
{goals}

{cpu_floor(tally)}

{tcp_floor(tally)}

{('Discarded: ' + '; '.join(tally.discarded)) if tally.discarded else 'No run was discarded.'}
"""


# === instructions: user-space work per request, counted by callgrind ===

def suite_instructions(args):
    """Each proxy of the compare suite under callgrind, one after another:
    instructions per request, the one figure here that does not move with
    the machine's noise. The kernel's work is not in it (see the compare
    suite's CPU split for that)."""
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        sys.exit("not installed: valgrind (Debian: apt-get install valgrind)")
    os.sched_setaffinity(0, {GENERATOR_CORE})  # the client stays off the proxies' core
    workdir = Path(tempfile.mkdtemp(prefix="switchyard-instructions-"))
    h2_port = free_port()
    origin_proc, port = start_origin(workdir, h2_port=h2_port)
    origin = Running(None, port, h2_port)
    peers = [peer for peer in compare_peers(args) if peer.is_proxy]
    counts = {}
    started = time.monotonic()
    try:
        for rnd in range(args.rounds):
            for peer in peers:
                start = lambda wrapper, peer=peer: peer.start(workdir, origin, wrapper=wrapper)
                n = count_instructions(start, workdir, requests=args.requests)
                counts.setdefault(peer.name, []).append(n)
                print(f"round {rnd + 1} {peer.name}: {n:.0f} instructions/request", flush=True)
    finally:
        stop(origin_proc)
    nginx = statistics.median(counts["nginx"])
    rows = "\n".join(f"| {name} | {summary(values, '{:,.0f}')} | {statistics.median(values) / nginx:.2f}× |"
                     for name, values in counts.items())
    section = f"""## Instructions per request: nginx, haproxy, Switchyard

{provenance(args, [[nginx_bin(), '-v'], [haproxy_bin(), '-v'], ['valgrind', '--version']])}
- Setup: the compare suite's proxies, configured as there (nginx and haproxy one worker/thread with upstream
  keep-alive; Switchyard with the three-backend sticky split, metrics on and five flags sent upstream, and
  the same binary with metrics and flags off; haproxy forwarding TCP as the floor), each in turn under
  `valgrind --tool=callgrind` on core 0, in front of the same origin (nginx on core 1).
- Counting is switched on (`callgrind_control -i on`) only around {args.requests} sequential keep-alive
  requests from one client, each with a new `x-user-id`, after 200 of warm-up: start-up is not counted.
  User-space instructions only: the kernel's work for the sockets (about the same for every proxy: the
  compare suite's "of which kernel" column) is not in these figures. {args.rounds} round(s); cells: median (min–max).
- The run took {(time.monotonic() - started) / 60:.1f} minutes.

| proxy | instructions per request | against nginx |
|---|---|---|
{rows}
"""
    write_section("## Instructions per request: nginx, haproxy, Switchyard", section)
    print(section)


# === memory: idle RSS and RSS with many idle keep-alive connections ===

def suite_memory(args):
    """The compare suite's memory phase alone, for the proxies: fast enough
    to run after every change to per-connection state."""
    os.sched_setaffinity(0, {1})
    workdir = Path(tempfile.mkdtemp(prefix="switchyard-memory-"))
    origin_proc, port = start_origin(workdir)
    origin = Running(None, port, port)
    tls = None
    if args.tls:
        import ssl
        cert, key = make_certificate(workdir)
        peers = tls_peers(args, cert, key)
        tls = ssl.create_default_context(cafile=str(cert))
    else:
        peers = [peer for peer in compare_peers(args) if peer.is_proxy and not peer.floor]
    tally = Tally(quiet_wait_s=args.quiet_wait)
    started = time.monotonic()
    try:
        for rnd in range(args.rounds):
            order = peers if rnd % 2 == 0 else list(reversed(peers))
            for peer in order:
                memory_phase(peer, origin, workdir, args, tally, f"round {rnd + 1}", tls)
    finally:
        stop(origin_proc)
    section = memory_section(args, peers, tally, time.monotonic() - started)
    write_section(memory_heading(args), section)
    print(section)


SLOW_ORIGIN = r"""
import asyncio, sys
async def serve(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            await asyncio.sleep(float(sys.argv[2]))
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()
async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", int(sys.argv[1]), backlog=16384)
    async with server:
        await server.serve_forever()
asyncio.run(main())
"""


def start_slow_origin(workdir, delay_s):
    """A Python asyncio origin on core 1 that answers every request after
    `delay_s`: requests pile up in flight at the proxy."""
    script = workdir / "slow_origin.py"
    script.write_text(SLOW_ORIGIN)
    port = free_port()
    proc = spawn(["taskset", "-c", "1", sys.executable, script, str(port), str(delay_s)])
    wait_port(port)
    return proc, port


def burst(port, count, timeout=120.0):
    """`count` requests at once, each on its own connection; waits for
    every answer and closes the connections. Returns how many got a 2xx,
    and a count of what the others got."""
    async def main():
        async def one(i):
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError as e:
                return f"connect: {e.__class__.__name__}"
            try:
                writer.write(f"GET / HTTP/1.1\r\nhost: bench\r\nx-user-id: burst-{i}\r\nconnection: close\r\n\r\n".encode())
                head = await reader.readuntil(b"\r\n\r\n")
                await reader.read()
                status = head.split(b" ", 2)[1].decode()
                return "2xx" if status.startswith("2") else status
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
                return e.__class__.__name__
            finally:
                writer.close()
        results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(count))), timeout)
        tally = {}
        for r in results:
            tally[r] = tally.get(r, 0) + 1
        return tally.pop("2xx", 0), tally
    return asyncio.run(main())


def suite_burst(args):
    """RSS through bursts of `args.idle_connections` requests in flight at
    once (a slow origin holds each for 2 s): idle before, peak, and 5 s
    after each burst ended, for Switchyard, nginx and haproxy."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    os.sched_setaffinity(0, {1})
    workdir = Path(tempfile.mkdtemp(prefix="switchyard-burst-"))
    origin_proc, port = start_slow_origin(workdir, 2.0)
    origin = Running(None, port, port)
    peers = [peer for peer in compare_peers(args) if peer.is_proxy and not peer.floor]
    tally = Tally(quiet_wait_s=0)
    started = time.monotonic()
    count = args.idle_connections
    try:
        for rnd in range(args.rounds):
            order = peers if rnd % 2 == 0 else list(reversed(peers))
            for peer in order:
                running = peer.start(workdir, origin)
                try:
                    one_request(running.port)
                    time.sleep(0.5)
                    idle = status_kib(running.pid, "VmRSS") / 1024
                    after = []
                    answered = []
                    for _ in range(2):
                        ok, others = burst(running.port, count)
                        answered.append(ok)
                        if others:
                            print(f"  {peer.name}: {ok} 2xx, others {others}", flush=True)
                        time.sleep(5)
                        after.append(status_kib(running.pid, "VmRSS") / 1024)
                    peak = peak_rss_kib(running.pid) / 1024
                finally:
                    stop(running.proc)
                # The slow origin (one Python thread) cannot accept 10,000
                # connections at once; a proxy whose connect timeout is short
                # answers some 504. Kept while at least 80 % were in flight.
                problem = "" if min(answered) >= 0.8 * count else f"only {min(answered)} of {count} answered 2xx"
                tally.record(f"round {rnd + 1}", peer.name, "burst",
                             {"idle": idle, "peak": peak, "after1": after[0], "after2": after[1],
                              "answered": min(answered)}, problem)
                print(f"round {rnd + 1} {peer.name}: idle {idle:.1f} MiB, peak {peak:.1f}, "
                      f"5 s after burst 1 {after[0]:.1f}, after burst 2 {after[1]:.1f} ({answered} answered)", flush=True)
    finally:
        stop(origin_proc)
    rows = []
    for peer in peers:
        c = lambda key: cell(tally, peer.name, "burst", key, "{:.1f}")
        answered = cell(tally, peer.name, "burst", "answered", "{:.0f}")
        rows.append(f"| {peer.name} | {answered} | {c('idle')} | {c('peak')} | {c('after1')} | {c('after2')} |")
    section = f"""## Memory through request bursts

{provenance(args, [[nginx_bin(), '-v'], [haproxy_bin(), '-v']])}
- Setup: the compare suite's proxies and configuration, each pinned to core 0 and started fresh; a Python
  asyncio origin on core 1 answers every request after 2 s. A burst is {count} requests sent at once, each
  on its own connection (`connection: close`), all in flight together; the client waits for every answer.
  Two bursts per process, 5 s apart. Idle is VmRSS after one request; peak is VmHWM; "after" is VmRSS 5 s
  after a burst's last answer, its connections closed. nginx gets `worker_connections` for twice the
  clients (it counts its upstream connections there too). The origin, one Python thread, cannot accept
  10,000 connections at once: a proxy with a short connect timeout (Switchyard's default 1 s) answers
  some 504, so a run is kept when at least 80 % of each burst got a 2xx (the fewer of the two is shown).
- {args.rounds} round(s), in an order that reverses every round; cells are the median (min–max).
  The whole run took {(time.monotonic() - started) / 60:.1f} minutes.

| proxy | 2xx of each burst (fewer) | idle RSS MiB | peak RSS MiB | RSS MiB 5 s after burst 1 | after burst 2 |
|---|---|---|---|---|---|
{chr(10).join(rows)}

{('Discarded: ' + '; '.join(tally.discarded)) if tally.discarded else 'No run was discarded.'}
"""
    write_section("## Memory through request bursts", section)
    print(section)


# Each flag's line ends in its closing brace: the field goes before it.
WATCHED_FLAGS_YAML = re.sub(r" }$", ", metrics: [requests, errors, latency] }", FLAGS_YAML, flags=re.M)


def suite_cohorts(args):
    """Issue 21: what watching flags costs. Switchyard's instructions per
    request (callgrind, as the instructions suite) with the compare suite's
    five flags unwatched, then the same five watched (metrics: requests,
    errors, latency: every request counted in each flag's on or off cohort);
    then its throughput and CPU per request under wrk, the two alternating."""
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        sys.exit("not installed: valgrind (Debian: apt-get install valgrind)")
    os.sched_setaffinity(0, {GENERATOR_CORE})
    workdir = Path(tempfile.mkdtemp(prefix="switchyard-cohorts-"))
    origin_proc, port = start_origin(workdir)
    variants = (("five flags, unwatched", FLAGS_YAML), ("five flags, watched", WATCHED_FLAGS_YAML))
    counts, loads, discarded = {}, {}, []
    started = time.monotonic()
    try:
        for rnd in range(args.rounds):
            for name, flags in variants:
                def start(wrapper, flags=flags):
                    proc, p = start_switchyard(args.binary, workdir, port, True, wrapper=wrapper,
                                               extra=SWITCHYARD_LIMITS_YAML + "\n" + flags)
                    return Running(proc, p, p)
                n = count_instructions(start, workdir, requests=args.requests)
                counts.setdefault(name, []).append(n)
                print(f"round {rnd + 1} {name}: {n:.0f} instructions/request", flush=True)
        for rnd in range(args.rounds):
            for name, flags in (variants if rnd % 2 == 0 else variants[::-1]):
                proc, p = start_switchyard(args.binary, workdir, port, True,
                                           extra=SWITCHYARD_LIMITS_YAML + "\n" + flags)
                try:
                    r = with_cpu(proc.pid, lambda: run_wrk(p, workdir, args.duration, args.connections))
                finally:
                    stop(proc)
                print(f"round {rnd + 1} {name}: {r['rps']:.0f} req/s, {r['cpu_us_per_req']:.2f} µs CPU/req, "
                      f"bad {r['bad']}", flush=True)
                if r["bad"] or r["socket_errors"]:
                    discarded.append(f"round {rnd + 1} {name}: {r['bad']} non-2xx, socket errors {r['socket_errors']!r}")
                else:
                    loads.setdefault(name, []).append(r)
    finally:
        stop(origin_proc)
    base = statistics.median(counts["five flags, unwatched"])
    base_rps = statistics.median(r["rps"] for r in loads.get("five flags, unwatched", [{"rps": 0}]))

    def load_cells(name):
        rs = loads.get(name)
        if not rs:
            return "— | — | —"
        rps = statistics.median(r["rps"] for r in rs)
        against = f"{rps / base_rps - 1:+.1%}" if base_rps else "—"
        return (f"{summary([r['rps'] for r in rs], '{:.0f}')} | {against} | "
                f"{summary([r['cpu_us_per_req'] for r in rs], '{:.2f}')}")
    rows = "\n".join(f"| {name} | {summary(values, '{:,.0f}')} | {statistics.median(values) / base - 1:+.1%} | "
                     f"{load_cells(name)} |"
                     for name, values in counts.items())
    section = f"""## Cohort metrics: what watching five flags costs

{provenance(args, [['valgrind', '--version'], ['wrk', '-v']])}
- Setup: Switchyard as in the instructions suite (one worker, metrics on, the three-backend split), with the
  compare suite's five flags, first unwatched, then each with `metrics: [requests, errors, latency]`.
  Instructions: under `valgrind --tool=callgrind` on core 0, the origin nginx on core 1; {args.requests}
  sequential keep-alive requests counted after 200 of warm-up. Throughput: Switchyard on core 0, wrk (1
  thread, {args.connections} connections, {args.duration} s, a new `x-user-id` per request) and the origin on
  core 1, the two variants alternating. {args.rounds} round(s); cells: median (min–max).
- Goal (issue 21): under 3 % more instructions with five watched flags.
- The run took {(time.monotonic() - started) / 60:.1f} minutes.

| Switchyard | instructions per request | against unwatched | requests/s | against unwatched | proxy CPU µs/request |
|---|---|---|---|---|---|
{rows}

{('Discarded: ' + '; '.join(discarded)) if discarded else 'No round was discarded.'}
"""
    write_section("## Cohort metrics: what watching five flags costs", section)
    print(section)


def memory_heading(args):
    return "## Idle connection memory, TLS" if args.tls else "## Idle connection memory"


def per_connection_kib(tally, peer, connections):
    """KiB each idle connection added: (RSS with them - idle RSS) / count,
    per round, as a median (min–max) cell."""
    idle = tally.values(peer, "idle", "idle_rss_mib")
    held = tally.values(peer, "connections", "conns_rss_mib")
    per = [(h - i) * 1024 / connections for i, h in zip(idle, held)]
    return summary(per, "{:.2f}") if per else "—"


def memory_section(args, peers, tally, elapsed):
    rows = []
    for peer in peers:
        c = lambda what, key: cell(tally, peer.name, what, key, "{:.1f}")
        rows.append(f"| {peer.name} | {c('idle', 'idle_rss_mib')} | {c('connections', 'conns_rss_mib')} | "
                    f"{per_connection_kib(tally, peer.name, args.idle_connections)} |")
    goal_rows = "\n".join(f"| {text} | {measured} | **{verdict}** |"
                          for text, measured, verdict in memory_goals(tally))
    setup = ("the tls suite's peers: nginx and Switchyard (metrics and flags off) terminating TLS 1.3 with the "
             "same ECDSA P-256 certificate, each client connection a full handshake" if args.tls else
             "the compare suite's proxies and configuration (nginx, haproxy, Switchyard with metrics and flags on "
             "and with both off)")
    return f"""{memory_heading(args)}

{provenance(args, [[nginx_bin(), '-v'], [haproxy_bin(), '-v']])}
- Setup: {setup}, each pinned to core 0 and started fresh per measurement; the origin and the client
  on core 1. Idle RSS is VmRSS after one request; then {args.idle_connections} keep-alive client
  connections, one request answered on each (64 at a time), held idle: VmRSS one second after the last
  answer. KiB per connection is the difference over the count.
- {args.rounds} round(s), in an order that reverses every round; cells are the median (min–max).
  The whole run took {elapsed / 60:.1f} minutes. {tally.interference()}

| proxy | idle RSS MiB | RSS MiB with {args.idle_connections} idle connections | KiB per idle connection |
|---|---|---|---|
{chr(10).join(rows)}

| goal | measured | verdict |
|---|---|---|
{goal_rows}

{('Discarded: ' + '; '.join(tally.discarded)) if tally.discarded else 'No run was discarded.'}
"""


# === tls: TLS termination, Switchyard against nginx ===

def make_certificate(workdir):
    """One self-signed ECDSA P-256 certificate for `localhost`, used by both peers."""
    cert, key = workdir / "tls.crt", workdir / "tls.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost"], check=True, capture_output=True)
    return cert, key


def tls_peers(args, cert, key):
    """nginx and Switchyard terminating TLS 1.3 with the same certificate and
    key. nginx keeps no session cache and no ticket keys, so it cannot
    resume; Switchyard's tickets cannot be switched off, so the handshake
    client must not use them (checked by `resumption_check`)."""
    nginx_tls = (f"ssl_certificate {cert}; ssl_certificate_key {key}; ssl_protocols TLSv1.3;\n"
                 "    ssl_session_cache off; ssl_session_tickets off;")
    switchyard_tls = f'tls: {{ certificates: [{{ cert: {cert}, key: {key} }}], min_version: "1.3" }}'
    return [
        Peer("nginx", lambda workdir, origin: start_nginx_proxy(workdir, origin, tls=nginx_tls)),
        Peer("switchyard", switchyard_peer(args.binary, features=False, tls=switchyard_tls)),
    ]


def run_hey(port, duration, connections):
    """New TLS connections, one request each, closed loop: hey
    `-disable-keepalive`. Go's TLS client keeps no session cache unless told
    to, so every connection is a full handshake (wrk and h2load resume theirs
    on reconnect). `-host localhost`: hey sends its Host header, port and
    all, as the SNI name, which rustls refuses as illegal. Adds the client's
    own CPU per connection (it shares core 1 with the origin)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        ["taskset", "-c", "1", "hey", "-z", f"{duration}s", "-c", str(connections), "-cpus", "1",
         "-disable-keepalive", "-host", "localhost", "-H", f"x-user-id: {OHA_USER}", f"https://127.0.0.1:{port}/"],
        capture_output=True, text=True, check=True, timeout=duration + 60,
    ).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    elapsed = float(re.search(r"Total:\s+([\d.]+) secs", out).group(1))
    codes = {int(c): int(n) for c, n in re.findall(r"^\s+\[(\d{3})\]\s+(\d+) responses", out, re.M)}
    errors = re.findall(r"^\s+\[(\d+)\]\s+(.*)$", out.partition("Error distribution:")[2], re.M)
    ok = sum(n for code, n in codes.items() if 200 <= code < 300)
    client_s = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {
        "rps": ok / elapsed,
        "total": ok,
        "bad": sum(codes.values()) - ok,
        "socket_errors": "; ".join(f"{n}× {message}" for n, message in errors),
        "client_cpu_us": client_s * 1e6 / max(ok, 1),
    }


def resumption_check(workdir, cert, key, args):
    """hey against an nginx that offers both tickets and a session cache and
    logs `$ssl_session_reused` per request: (requests, resumed)."""
    port = free_port()
    log = workdir / "resumption.log"
    proc = start_nginx(workdir, "resumption-probe", "0", f"""  server {{
    listen 127.0.0.1:{port} ssl; ssl_certificate {cert}; ssl_certificate_key {key}; ssl_protocols TLSv1.3;
    ssl_session_cache shared:probe:1m; ssl_session_tickets on; access_log {log} reused;
    location / {{ default_type text/plain; return 200 "ok\\n"; }}
  }}""", http_extra="  log_format reused $ssl_session_reused;", ports=[port])
    try:
        run_hey(port, 2, args.connections)
    finally:
        stop(proc)
    marks = log.read_text().split()
    return len(marks), marks.count("r")


def tls_probe(port):
    """What an OpenSSL client (as wrk) gets from the peer: TLS version,
    cipher, key exchange, session tickets sent, and the answer's status line."""
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost", "-ign_eof"],
        input=b"GET / HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n", capture_output=True, timeout=20,
    ).stdout.decode(errors="replace")
    found = [(re.search(pattern, out, re.M) or [None, "?"])[1] for pattern in
             (r"^New, (\S+), Cipher is", r"Cipher is (\S+)", r"Server Temp Key: ([^,]+)", r"^(HTTP/1.1 \d+)")]
    tickets = out.count("Post-Handshake New Session Ticket arrived")
    return f"{found[0]} {found[1]}, {found[2]}, {tickets} session tickets, answer `{found[3]}`"


def tls_loads(args, workdir):
    """(name, run(running) -> result, target rate) for each peer, in order."""
    return [
        ("h1", lambda running: run_wrk(running.port, workdir, args.duration, args.connections, scheme="https"), None),
        ("h2", lambda running: run_h2load(running.h2_port, args.duration, args.connections, scheme="https"), None),
        ("handshakes", lambda running: run_hey(running.port, args.duration, args.connections), None),
    ]


def suite_tls(args):
    os.sched_setaffinity(0, {1})  # this script stays off the proxies' core
    workdir = Path(tempfile.mkdtemp(prefix="switchyard-tls-"))
    cert, key = make_certificate(workdir)
    origin_proc, port = start_origin(workdir)
    origin = Running(None, port, port)
    peers = tls_peers(args, cert, key)
    tally = Tally()
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    try:
        probed, resumed = resumption_check(workdir, cert, key, args)
        print(f"resumption check: {resumed} of {probed} hey connections resumed a session", flush=True)
        if not probed or resumed:
            sys.exit("the handshake client resumed sessions (or made none): its rate would not be of full handshakes")
        negotiated = {}
        for peer in peers:
            running = peer.start(workdir, origin)
            try:
                negotiated[peer.name] = tls_probe(running.port)
            finally:
                stop(running.proc)
            print(f"{peer.name}: {negotiated[peer.name]}", flush=True)
        loads = tls_loads(args, workdir)
        for rnd in range(args.rounds):
            order = peers if rnd % 2 == 0 else list(reversed(peers))
            for peer in order:
                load_phase(peer, origin, workdir, args, loads, tally, f"round {rnd + 1}", scheme="https")
    finally:
        stop(origin_proc)
    elapsed = time.monotonic() - started
    section = tls_section(args, peers, tally, negotiated, (probed, resumed), elapsed, load_before)
    write_section("## TLS termination: Switchyard against nginx", section)
    print(section)


def busy_cell(tally, peer, what):
    """How busy the proxy's core was during the runs, in %: CPU per request × rate."""
    runs = tally.kept.get(peer, {}).get(what, [])
    return summary([r["cpu_us_per_req"] * r["rps"] / 1e4 for r in runs], "{:.0f}") if runs else "—"


def lock_version(crate):
    """The version of `crate` in Cargo.lock."""
    m = re.search(rf'^name = "{re.escape(crate)}"\nversion = "([^"]+)"', (ROOT / "Cargo.lock").read_text(), re.M)
    return f"{crate} {m.group(1) if m else '?'}"


def tls_section(args, peers, tally, negotiated, resumption, elapsed, load_before):
    columns = [("h1", "rps", "{:.0f}"), ("h1", "cpu_us_per_req", "{:.1f}"), ("h1", "busy", "{:.0f}"),
               ("h2", "rps", "{:.0f}"), ("h2", "cpu_us_per_req", "{:.1f}"),
               ("handshakes", "rps", "{:.0f}"), ("handshakes", "cpu_us_per_req", "{:.0f}"),
               ("handshakes", "busy", "{:.0f}"), ("handshakes", "client_cpu_us", "{:.0f}"),
               ("memory", "peak_rss_mib", "{:.1f}")]
    rows = []
    for peer in peers:
        cells = [busy_cell(tally, peer.name, what) if key == "busy" else cell(tally, peer.name, what, key, fmt)
                 for what, key, fmt in columns]
        rows.append(f"| {peer.name} | {' | '.join(cells)} |")
    ratios = []
    for what, key, _ in columns:
        sy, ng = tally.median("switchyard", what, key), tally.median("nginx", what, key)
        ratios.append(f"{sy / ng:.2f}×" if key != "busy" and sy and ng else "")
    rows.append(f"| switchyard ÷ nginx (medians) | {' | '.join(ratios)} |")
    probed, resumed = resumption
    builds = (f"**A Rust build (cargo/rustc) was running during {tally.during_build} of the {tally.measurements} "
              f"measurements**: it competes for both cores, so treat these figures as noisy and rerun on a quiet machine."
              if tally.during_build else "No Rust build was seen running during the measurements.")
    return f"""## TLS termination: Switchyard against nginx

{provenance(args, [['wrk', '-v'], ['h2load', '--version'], ['dpkg-query', '-W', '-f', 'hey ${Version}', 'hey'], [nginx_bin(), '-v'],
                   ['openssl', 'version']])}; {lock_version('rustls')}, {lock_version('aws-lc-rs')}
- Setup, all on loopback: both proxies pinned to core 0, one worker each, terminating TLS 1.3 only with the
  same self-signed ECDSA P-256 certificate and key, and proxying plain HTTP/1.1 to the same origin (nginx,
  one worker, a 3-byte 200) with upstream keep-alive. nginx: Debian's build (OpenSSL), `master_process off`,
  `ssl_session_cache off; ssl_session_tickets off`, upstream `keepalive 64`. Switchyard (rustls, aws-lc-rs):
  `workers: 1`, the three-backend sticky split 90/5/5 by `x-user-id`, metrics and flags off. The cipher
  and key exchange are the client's first choice on both (neither server imposes its own order). Every
  load generator, the origin and this script on core 1.
- What an OpenSSL client (as wrk) negotiates: nginx — {negotiated.get('nginx', '?')}; Switchyard —
  {negotiated.get('switchyard', '?')}. (With the cache and tickets off, nginx's OpenSSL still sends
  two stateful tickets that no cache backs: offered back they give a new session. So both peers do the
  work of issuing two tickets per handshake.)
- Per round, in an order that reverses every round, each proxy is started fresh, warmed up ({args.warmup} s of
  wrk), then measured back to back for {args.duration} s each: **h1**, HTTP/1.1 over {args.connections} long-lived
  TLS connections (wrk, 1 thread, a new `x-user-id` per request); **h2**, h2 by ALPN (h2load,
  {max(1, args.connections // 8)} connections × {args.connections // max(1, args.connections // 8)} streams);
  **handshakes**, a new TLS connection for every request (hey `-disable-keepalive`, {args.connections}
  concurrent clients): each is a full handshake, a request, and the connection closed. Go's TLS client,
  which hey uses, offers no session to resume: against an nginx offering tickets and a session cache,
  **{resumed} of {probed}** of its connections resumed one (`$ssl_session_reused`). (wrk with
  `Connection: close` and h2load both resume their sessions on reconnect, so they cannot measure this.)
- CPU µs is the proxy's utime+stime from `/proc/<pid>/stat` across the run over the requests (for
  handshakes: the connections) it served; "busy %" is that CPU time over the run's length, i.e. how busy
  core 0 was. Well under 100 % means the load generator on core 1, not the proxy, set the rate: compare
  the CPU per handshake then. "client CPU" is hey's own CPU per connection. Peak RSS is VmHWM after all
  three runs.
- {args.rounds} round(s); cells are the median (min–max) of the kept runs. A run is discarded if any answer was
  not 2xx or there was any socket error.
- The whole run took {elapsed / 60:.1f} minutes; load average {load_before:.2f} at the start,
  {os.getloadavg()[0]:.2f} at the end. {builds}

| peer | h1 req/s | h1 CPU µs/req | h1 busy % | h2 req/s | h2 CPU µs/req | handshakes/s | CPU µs/handshake | handshake busy % | client CPU µs/handshake | peak RSS MiB |
|---|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

{('Discarded: ' + '; '.join(tally.discarded)) if tally.discarded else 'No run was discarded.'}
"""


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


def switchyard_version(args):
    """The commit, whether the tree had uncommitted changes (the binary may
    include them), and the measured binary's hash."""
    dirty = subprocess.run(
        ["git", "--no-optional-locks", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True, text=True,
    ).stdout.strip()
    return f"{git_rev()}{' + uncommitted changes' if dirty else ''} (binary sha256 {args.binary_sha256[:12]})"


def provenance(args, tools):
    """The Date, Command, Machine and Versions lines every section starts with."""
    versions = "; ".join([*(version(cmd) for cmd in tools), f"switchyard {switchyard_version(args)}"])
    return f"""- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}
- Command: `{' '.join(['python3', 'loadtests/bench.py'] + sys.argv[1:])}`
- Machine: {cpu_model()}, {os.cpu_count()} cores, {mem_gib():.0f} GiB, Linux {platform.release()}
- Versions: {versions}"""


def write_section(heading, section):
    """Replaces the section under `heading` in RESULTS.md (or appends it)."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Load-test results\n\nWritten by `loadtests/bench.py`; each section says how it was produced.\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(text):
        text = pattern.sub(section.rstrip() + "\n\n", text)
    else:
        text = text.rstrip() + "\n\n" + section.rstrip() + "\n"
    RESULTS.write_text(text)


SUITES = {
    # name: (run, default rounds, default seconds per measurement)
    "metrics": (suite_metrics, 5, 10),
    "weights": (suite_weights, 5, 10),
    "rollout": (suite_rollout, 5, 10),
    "compare": (suite_compare, 3, 6),
    "instructions": (suite_instructions, 1, 0),
    "memory": (suite_memory, 3, 0),
    "burst": (suite_burst, 1, 0),
    "cohorts": (suite_cohorts, 3, 10),
    "tls": (suite_tls, 3, 10),
}


def snapshot_binary(binary):
    """Copies the binary to measure into a temporary directory, so a rebuild
    during the run cannot change it; returns the copy and its sha256."""
    if not binary.exists():
        sys.exit(f"{binary} does not exist (build it, or pass --binary)")
    copy = Path(tempfile.mkdtemp(prefix="switchyard-bin-")) / "switchyard"
    shutil.copy2(binary, copy)
    return copy, hashlib.sha256(copy.read_bytes()).hexdigest()


def require_tools(suite):
    needed = {"wrk": "wrk", "taskset": "util-linux"}
    if suite == "compare":
        needed.update({"haproxy": "haproxy", "h2load": "nghttp2-client"})
    if suite == "memory":
        needed = {"haproxy": "haproxy", "taskset": "util-linux", "openssl": "openssl"}
    if suite == "burst":
        needed = {"haproxy": "haproxy", "taskset": "util-linux"}
    if suite in ("instructions", "cohorts"):
        needed = {"haproxy": "haproxy", "taskset": "util-linux", "valgrind": "valgrind",
                  "callgrind_control": "valgrind"}
    if suite == "cohorts":
        needed["wrk"] = "wrk"
    if suite == "tls":
        needed.update({"h2load": "nghttp2-client", "hey": "hey", "openssl": "openssl"})
    missing = [f"{tool} (Debian: apt-get install {pkg})" for tool, pkg in needed.items() if not shutil.which(tool)]
    if not Path(nginx_bin()).exists():
        missing.append("nginx (Debian: apt-get install nginx)")
    if suite == "compare" and not Path(oha_bin()).exists():
        missing.append("oha (cargo install oha --locked)")
    if missing:
        sys.exit("not installed: " + ", ".join(missing))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=list(SUITES), help="which comparison to run")
    parser.add_argument("--rounds", type=int,
                        help="rounds (default: 3 for compare, tls and memory, 1 for instructions, 5 otherwise)")
    parser.add_argument("--duration", type=int,
                        help="seconds per measurement (default: 6 for compare, 10 otherwise)")
    parser.add_argument("--quick", action="store_true",
                        help="for development: 1 round of 2 s measurements (explicit --rounds/--duration win)")
    parser.add_argument("--connections", type=int, default=64, help="concurrent requests of the load generators")
    parser.add_argument("--rate", type=int, default=100, help="weights suite: changes per second")
    parser.add_argument("--requests", type=int, default=2000,
                        help="instructions suite: requests counted per proxy")
    parser.add_argument("--interval", type=int, default=1, help="rollout suite: analysis interval, seconds")
    parser.add_argument("--warmup", type=int, default=1, help="compare suite: warm-up seconds per process")
    parser.add_argument("--open-rate", type=int,
                        help="compare suite: open-loop requests/s (default: half of nginx's saturation rate, measured first)")
    parser.add_argument("--quiet-wait", type=int, default=60,
                        help="compare suite: before each measurement, wait up to this many seconds for other "
                             "processes to stop using the CPU (0: do not wait)")
    parser.add_argument("--idle-connections", type=int, default=10000,
                        help=f"compare suite: idle keep-alive client connections to hold (at most {MAX_IDLE_CONNECTIONS})")
    parser.add_argument("--tls", action="store_true",
                        help="memory suite: over TLS, nginx and Switchyard with the same certificate")
    parser.add_argument("--binary", type=Path,
                        help=f"the switchyard binary to measure (default {BIN.relative_to(ROOT)}, built first "
                             "unless --no-build); it is copied before the run, so a rebuild meanwhile does not change it")
    parser.add_argument("--no-build", action="store_true", help="use the existing release binary")
    args = parser.parse_args()
    run, rounds, duration = SUITES[args.suite]
    args.rounds = args.rounds or (1 if args.quick else rounds)
    args.duration = args.duration or (2 if args.quick else duration)
    if not 0 < args.idle_connections <= MAX_IDLE_CONNECTIONS:
        parser.error(f"--idle-connections must be 1..{MAX_IDLE_CONNECTIONS}")
    if args.requests <= 0:
        parser.error("--requests must be at least 1")
    require_tools(args.suite)
    if args.binary is None and not args.no_build:
        subprocess.run(["cargo", "build", "--release", "-p", "switchyard-proxy"], cwd=ROOT, check=True)
    args.binary, args.binary_sha256 = snapshot_binary(args.binary or BIN)
    # Room for the idle-connection test in this process and the servers it starts.
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    if NOFILE < MAX_CONNECTIONS + 1000:
        sys.exit(f"the open-files hard limit ({NOFILE}) is below {MAX_CONNECTIONS + 1000}: raise it (ulimit -Hn)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up on SIGTERM too
    run(args)


if __name__ == "__main__":
    main()
