"""The web dashboard (/ui/) in a real browser: headless Chromium from
Debian's `chromium` package, driven by Playwright for Python (launched with
`executable_path`, no browser download). Run by `.ci/run`:

    python3 proxy/tests/ui/dashboard.py target/debug/switchyard [SCREENSHOT.png]

First against `switchyard demo` (an open loopback admin API): the page
shows the demo's route and its rollout advancing on the demo's own traffic.
Then against a proxy with an admin token and two upstreams (threads of this
script), while this script sends it traffic: without a token, and with a
wrong one, the page shows the API's refusal; with the right one it shows the
route live; a rollout started through the API appears and advances without a
reload; Abort on the page rolls it back. Every wait is bounded.
"""

import http.server
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

from playwright.sync_api import expect, sync_playwright

TOKEN = "dashboard-token-0123456789"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def upstream(name):
    """An HTTP server answering every GET with `name`, on a thread."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = (name + "\n").encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1]


def api(admin, method, path, body=None):
    req = urllib.request.Request(
        f"http://127.0.0.1:{admin}{path}", method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"authorization": f"Bearer {TOKEN}", "content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


def demo(binary, pw):
    """The demo's route and its rollout, live on the page."""
    proc = subprocess.Popen([binary, "demo", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "RUST_LOG": "warn"})
    try:
        admin = None
        for line in proc.stdout:
            if line.strip().startswith("admin listening on "):
                admin = line.strip().rsplit(" ", 1)[1]
                break
        assert admin, "the demo printed no admin address"
        threading.Thread(target=lambda: proc.stdout.read(), daemon=True).start()
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.set_default_timeout(30_000)
        page.goto(f"http://{admin}/ui/")
        route = page.get_by_test_id("route-demo")
        expect(page.get_by_test_id("connection")).to_have_text("live")
        expect(route.get_by_test_id("backend-green")).to_be_visible()
        expect(route.get_by_test_id("phase")).to_have_text("progressing")
        expect(route.get_by_test_id("weight-canary")).to_have_text("10%")
        expect(page.get_by_test_id("events")).to_contain_text("rollout.start routes/demo by demo")
        # The demo's guarded flag rollout, with its steps and phase.
        flag = page.get_by_test_id("flag-rollout-new-search")
        expect(flag.get_by_test_id("phase")).to_have_text("progressing")
        expect(flag).to_contain_text("on cohort against off")
        expect(flag).to_contain_text("50% 10m")
        expect(page.get_by_test_id("events")).to_contain_text("rollout.start flags/new-search by demo")
        browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main():
    binary, screenshot = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
    with sync_playwright() as pw:
        demo(binary, pw)
    work = pathlib.Path(tempfile.mkdtemp(prefix="switchyard-ui-"))
    (work / "token").write_text(TOKEN)
    port, admin = free_port(), free_port()
    blue, canary = upstream("blue"), upstream("canary")
    (work / "switchyard.yaml").write_text(f"""
listen: 127.0.0.1:{port}
admin: {{ listen: 127.0.0.1:{admin}, tokens: [{{ name: ci, file: {work}/token }}] }}
flags:
  - {{ name: new-checkout, rollout_percentage: 30 }}
routes:
  - name: shop
    backends:
      - {{ name: blue, endpoints: ["127.0.0.1:{blue}"], weight: 100 }}
      - {{ name: canary, endpoints: ["127.0.0.1:{canary}"], weight: 0 }}
""")
    proxy = subprocess.Popen([binary, "run", "--config", str(work / "switchyard.yaml")],
                             env={**os.environ, "RUST_LOG": "warn"})
    stop = threading.Event()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{admin}/health/ready", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the proxy never became ready")
                time.sleep(0.05)

        def traffic():
            n = 0
            while not stop.is_set():
                n += 1
                req = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"x-user-id": f"u{n % 200}"})
                try:
                    urllib.request.urlopen(req, timeout=5).read()
                except OSError:  # URLError, resets while the proxy stops
                    pass
                time.sleep(0.02)

        threading.Thread(target=traffic, daemon=True).start()
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.set_default_timeout(30_000)
            page.goto(f"http://127.0.0.1:{admin}/ui/")
            # No token: the API's refusal, shown.
            expect(page.get_by_test_id("error")).to_contain_text("401")
            expect(page.get_by_test_id("connection")).to_have_text("refused")
            # A wrong token: refused too.
            page.fill("#token", "wrong-token-0123456789")
            page.click("#token-form button")
            expect(page.get_by_test_id("error")).to_contain_text("401")
            expect(page.get_by_test_id("connection")).to_have_text("refused")
            # The right one: live, the route and its backends in bucket order.
            page.fill("#token", TOKEN)
            page.click("#token-form button")
            expect(page.get_by_test_id("connection")).to_have_text("live")
            expect(page.get_by_test_id("error")).to_be_hidden()
            route = page.get_by_test_id("route-shop")
            expect(route).to_contain_text("Route shop")
            expect(route.get_by_test_id("weight-blue")).to_have_text("100%")
            expect(page.get_by_test_id("flag-new-checkout")).to_contain_text("30%")
            # A rollout started through the API appears and advances, no reload.
            api(admin, "POST", "/v1/routes/shop/rollout", {
                "stable": "blue", "target": "canary",
                "steps": [{"weight": 20, "hold": "2s"}, {"weight": 60, "hold": "1h"}, {"weight": 100}],
                # Two Python upstreams on a busy CI machine: latency is noise
                # here, so only errors are judged.
                "analysis": {"interval": "1s", "window": "5s", "min_requests": 5,
                             "max_p95_ratio": 1000, "max_p95": "1m"}})
            expect(route.get_by_test_id("phase")).to_have_text("progressing")
            expect(route.get_by_test_id("weight-canary")).to_have_text("20%")
            expect(route.get_by_test_id("weight-canary")).to_have_text("60%")
            expect(page.get_by_test_id("events")).to_contain_text("rollout.step")
            if screenshot:
                page.screenshot(path=screenshot, full_page=True)
            # Abort on the page: rolled back to stable.
            route.get_by_test_id("action-abort").click()
            expect(route.get_by_test_id("phase")).to_have_text("aborted")
            expect(route.get_by_test_id("weight-canary")).to_have_text("0%")
            expect(page.get_by_test_id("events")).to_contain_text("rollout.abort routes/shop by ci")
            # A refused action shows the server's reason.
            route.get_by_test_id("action-promote").click()
            expect(page.get_by_test_id("error")).to_contain_text("409")
            browser.close()
        state = api(admin, "GET", "/v1/routes/shop/rollout")
        assert state["phase"] == "aborted", state
        print("dashboard: ok")
    finally:
        stop.set()
        proxy.terminate()
        proxy.wait(timeout=30)


if __name__ == "__main__":
    main()
