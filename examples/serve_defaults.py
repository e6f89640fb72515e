"""What ``make run`` does: ``meshca serve`` on embedded defaults, ready for an Envoy.

Creates the CA in ./.meshca if there is none (an existing CA is always kept), copies
the bookstore mesh file (examples/bookstore/mesh.yaml) there if there is none, then
runs ``meshca serve`` on a Unix socket in ./.meshca and on 127.0.0.1:15012 (set
MESHCA_LISTEN to change it), and prints the exact commands that point an Envoy at it.
Ctrl-C stops the server cleanly.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

DATA_DIR = Path(".meshca").absolute()
SOCKET = DATA_DIR / "sds.sock"
MESH_FILE = DATA_DIR / "mesh.yaml"
LISTEN = os.environ.get("MESHCA_LISTEN", "127.0.0.1:15012")
EXAMPLE_ID = "spiffe://cluster.local/ns/bookbuyer/sa/bookbuyer"
# The bookstore mesh (docs/mesh.md): services, workloads, a 50/50 split and policies.
EXAMPLE_MESH = Path(__file__).resolve().parent / "bookstore" / "mesh.yaml"


def meshca_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "meshca", "--data-dir", str(DATA_DIR), *args]


def run(*args: str) -> None:
    print("$ meshca " + " ".join(args), flush=True)
    result = subprocess.run(meshca_command(*args), check=False)
    if result.returncode != 0:
        sys.exit(result.returncode)


def envoy_instructions() -> str:
    envoy = shutil.which("envoy") or str(Path(sys.executable).parent / "envoy")
    here = Path.cwd()
    rel = DATA_DIR.relative_to(here) if DATA_DIR.is_relative_to(here) else DATA_DIR
    # --disable-hot-restart: without it a second Envoy fails to bind base_id 0's socket.
    # The UDS and mTLS bootstraps get a small --inbound listener: only a listener or
    # cluster that names a secret makes Envoy ask meshca for it (and /certs show it).
    return f"""
Point an Envoy at it (run Envoy as this user, uid {os.getuid()}, which is mapped to
{EXAMPLE_ID}):

  over the Unix socket:
    .venv/bin/meshca bootstrap {EXAMPLE_ID} --server unix://{SOCKET} \\
        --inbound 15100:8080 --admin-port 15000 --out {rel}/envoy-uds.yaml
    {envoy} -c {rel}/envoy-uds.yaml --disable-hot-restart

  over mutual TLS (a bootstrap certificate from 'meshca issue' authenticates Envoy):
    .venv/bin/meshca --data-dir {rel} issue {EXAMPLE_ID} --out {rel}/example-certs
    .venv/bin/meshca bootstrap {EXAMPLE_ID} --server {LISTEN} --cert-dir {rel}/example-certs \\
        --inbound 15101:8080 --admin-port 15001 --out {rel}/envoy-tcp.yaml
    {envoy} -c {rel}/envoy-tcp.yaml --disable-hot-restart

  bookbuyer's whole configuration (listeners, routes, clusters, endpoints, secrets) over ADS:
    .venv/bin/meshca bootstrap {EXAMPLE_ID} --server unix://{SOCKET} --ads \\
        --capture explicit --out {rel}/envoy-ads.yaml --admin-port 15002
    {envoy} -c {rel}/envoy-ads.yaml --disable-hot-restart

Check the certificate meshca served (Envoy's admin API):
    curl -s localhost:15000/certs
(15001 and 15002 for the other two.)
For the whole bookstore mesh with real Envoys and apps: make bookstore
For two Envoys talking mTLS with both SPIFFE IDs shown: .venv/bin/python examples/mtls_demo.py
Stop the server with Ctrl-C.
"""


def main() -> None:
    if (DATA_DIR / "ca" / "ca-cert.pem").exists():
        print(f"A CA already exists in {DATA_DIR / 'ca'}: keeping it.", flush=True)
    else:
        run("init")
    if not MESH_FILE.exists():
        shutil.copyfile(EXAMPLE_MESH, MESH_FILE)
        print(f"Copied the bookstore mesh file to {MESH_FILE} (edit it: meshca reloads it)")
    command = meshca_command(
        "serve",
        "--uds",
        str(SOCKET),
        "--listen",
        LISTEN,
        "--uds-identity",
        f"{os.getuid()}={EXAMPLE_ID}",
        "--mesh",
        str(MESH_FILE),
    )
    print("$ meshca " + " ".join(command[3:]), flush=True)
    server = subprocess.Popen(command)
    signal.signal(signal.SIGTERM, lambda *_: server.send_signal(signal.SIGTERM))
    try:
        while not SOCKET.exists() and server.poll() is None:
            time.sleep(0.05)
        if server.poll() is None:
            print(envoy_instructions(), flush=True)
        sys.exit(server.wait())
    except KeyboardInterrupt:  # a terminal's Ctrl-C reaches both; forward it in case not
        if server.poll() is None:
            server.send_signal(signal.SIGINT)
        sys.exit(server.wait())


if __name__ == "__main__":
    main()
