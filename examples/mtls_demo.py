"""Two real Envoys get their certificates from ``meshca serve`` and talk mutual TLS.

    .venv/bin/python examples/mtls_demo.py

Everything runs on loopback in a temporary directory and is stopped at the end:

  curl -> buyer's Envoy (plain HTTP, 127.0.0.1) --mTLS--> web's Envoy --> a tiny app
          identity .../sa/buyer                           identity .../sa/web

* web's Envoy reaches meshca over the Unix socket (meshca knows it by its uid);
* buyer's Envoy reaches meshca over mutual TLS with a bootstrap certificate from
  ``meshca issue``;
* both bootstraps come from ``meshca bootstrap``; web's listener admits only buyer and
  tells the app who called (the ``x-forwarded-client-cert`` header).
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

WEB = "spiffe://cluster.local/ns/shop/sa/web"
BUYER = "spiffe://cluster.local/ns/shop/sa/buyer"
MESH = """\
services:
  - name: web
    namespace: shop
    ports: [8080]
    service_accounts: [web]
"""
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def meshca(*args: str) -> str:
    print("$ meshca " + " ".join(args), flush=True)
    result = subprocess.run(
        [sys.executable, "-m", "meshca", *args], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        sys.exit(f"meshca {args[0]} failed: {result.stderr.strip()}")
    return result.stdout


SEEN: dict[str, str] = {}  # the last x-forwarded-client-cert fields the app received


class App(http.server.BaseHTTPRequestHandler):
    """The service behind web's Envoy: says who called it."""

    def do_GET(self) -> None:
        xfcc = self.headers.get("x-forwarded-client-cert", "")
        fields = dict(part.split("=", 1) for part in xfcc.split(";") if "=" in part)
        SEEN.clear()
        SEEN.update(fields)
        body = (
            f"hello {fields.get('URI', '(no client certificate)')}, "
            f"this is {fields.get('By', '?')}\n"
        ).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def wait_until(check: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    sys.exit(f"timed out waiting for {what}")


def envoy_ready(admin_port: int) -> bool:
    try:
        with _OPENER.open(f"http://127.0.0.1:{admin_port}/ready", timeout=2) as response:
            return bool(response.read().decode().strip() == "LIVE")
    except (OSError, urllib.error.URLError):
        return False


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main() -> int:
    envoy = shutil.which("envoy") or str(Path(sys.executable).parent / "envoy")
    root = Path(tempfile.mkdtemp(prefix="meshca-demo-"))
    processes: list[subprocess.Popen[bytes]] = []
    app = http.server.ThreadingHTTPServer(("127.0.0.1", 0), App)
    threading.Thread(target=app.serve_forever, daemon=True).start()
    try:
        data = str(root / "data")
        meshca("init", "--data-dir", data)
        (root / "mesh.yaml").write_text(MESH)
        out = (root / "meshca.out").open("wb")
        serve = [
            *("serve", "--data-dir", data, "--listen", "127.0.0.1:0"),
            *("--uds", str(root / "sds.sock"), "--uds-identity", f"{os.getuid()}={WEB}"),
            *("--mesh", str(root / "mesh.yaml"), "--log-level", "warning"),
        ]
        print("$ meshca " + " ".join(serve), flush=True)
        processes.append(subprocess.Popen([sys.executable, "-m", "meshca", *serve], stdout=out))
        listening = re.compile(r"listening on tcp 127\.0\.0\.1:(\d+)")
        wait_until(lambda: listening.search((root / "meshca.out").read_text()), "meshca")
        match = listening.search((root / "meshca.out").read_text())
        assert match is not None
        meshca_port = int(match.group(1))

        web_port, buyer_port = free_port(), free_port()
        web_admin, buyer_admin = free_port(), free_port()
        app_port = int(app.server_address[1])
        meshca(
            *("bootstrap", WEB, "--server", f"unix://{root / 'sds.sock'}"),
            *("--inbound", f"{web_port}:{app_port}", "--allow", BUYER),
            *("--admin-port", str(web_admin), "--out", str(root / "web.yaml")),
        )
        meshca("issue", BUYER, "--data-dir", data, "--out", str(root / "buyer-certs"))
        meshca(
            *("bootstrap", BUYER, "--server", f"127.0.0.1:{meshca_port}"),
            *("--cert-dir", str(root / "buyer-certs")),
            *("--outbound", f"{buyer_port}:127.0.0.1:{web_port}", "--upstream-id", WEB),
            *("--admin-port", str(buyer_admin), "--out", str(root / "buyer.yaml")),
        )
        for name, admin in (("web", web_admin), ("buyer", buyer_admin)):
            # --disable-hot-restart: two Envoys on one machine (else both want base id 0)
            command = [envoy, "-c", str(root / f"{name}.yaml"), "--disable-hot-restart"]
            command += ["--log-level", "error", "--concurrency", "1"]
            print("$ " + shlex.join(command), flush=True)
            log = (root / f"{name}.log").open("wb")
            processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
            wait_until(functools.partial(envoy_ready, admin), f"{name}'s Envoy")

        print(f"$ curl http://127.0.0.1:{buyer_port}/", flush=True)
        with _OPENER.open(f"http://127.0.0.1:{buyer_port}/", timeout=10) as response:
            print(response.read().decode(), end="")
        print("\nThe app behind web's Envoy saw (x-forwarded-client-cert):")
        print(f"  client SPIFFE ID (URI): {SEEN.get('URI', '-')}")
        print(f"  server SPIFFE ID (By):  {SEEN.get('By', '-')}")
        return 0 if (SEEN.get("URI"), SEEN.get("By")) == (BUYER, WEB) else 1
    finally:
        for process in reversed(processes):
            stop(process)
        app.shutdown()
        app.server_close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
