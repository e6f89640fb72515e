"""A small mesh under steady load, for rotating meshca's CA while traffic flows.

One ``meshca serve`` process (a real process, so it can be killed with SIGKILL and
restarted) serves two real Envoys over its Unix socket: ``web`` in front of a small
HTTP app (an mTLS listener admitting only ``buyer``) and ``buyer`` (a plain listener
forwarding over mTLS to ``web``). A client thread sends requests through ``buyer`` the
whole time and counts every response. Used by ``tests/test_rotation_envoy.py`` and
``bench/soak_rotation.py``.

The Envoys reach meshca over the Unix socket (identified by SO_PEERCRED), so their
link to meshca does not itself depend on the root being rotated.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509

from meshca.spiffe import SpiffeId
from tests.envoy_harness import (
    EnvoyProcess,
    RecordingApp,
    eventually,
    free_port,
    http_get,
    stop_process,
)
from tests.serve_harness import short_tempdir

MESHCA = [sys.executable, "-m", "meshca"]
REPO = Path(__file__).resolve().parent.parent
# Every request opens a new connection, so every request is a new mTLS handshake that
# validates against the bundle and certificates Envoy holds at that moment.
ONE_REQUEST_PER_CONNECTION = {
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "common_http_protocol_options": {"max_requests_per_connection": 1},
        "explicit_http_config": {"http_protocol_options": {}},
    }
}
WEB = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/web")
BUYER = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/buyer")


def run_meshca(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MESHCA, *args], capture_output=True, text=True, timeout=timeout, check=False, cwd=REPO
    )


@dataclass
class Load:
    """Requests through ``buyer`` back to back, every result counted."""

    port: int
    interval: float = 0.01
    results: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            status, body = http_get(self.port, "/load")
            self.results[status] += 1
            if status != 200 and len(self.failures) < 20:
                # the wall-clock time, to set beside meshca's and Envoy's logs
                when = datetime.now(UTC).strftime("%H:%M:%S.%f")[:-3]
                self.failures.append(f"{when} {status}: {body[:200]}")
            time.sleep(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def total(self) -> int:
        return sum(self.results.values())

    @property
    def failed(self) -> int:
        return self.total - self.results[200]


class RotationMesh:
    """meshca + web + buyer + app + load; ``kill9``/``restart`` for the crash test."""

    def __init__(self, root: Path, *, leaf_ttl: str) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.socket = root / "sds.sock"
        self.leaf_ttl = leaf_ttl
        self.log = root / "meshca.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.envoys: list[EnvoyProcess] = []
        self.restarts = 0

    # meshca ------------------------------------------------------------------------
    def start_meshca(self) -> None:
        out = self.root / f"meshca-{self.restarts}.out"
        uid = os.getuid()
        with out.open("wb") as stdout, self.log.open("ab") as stderr:
            self.process = subprocess.Popen(
                [
                    *MESHCA,
                    "serve",
                    "--data-dir",
                    str(self.data_dir),
                    "--uds",
                    str(self.socket),
                    "--uds-identity",
                    f"{uid}={WEB},{uid}={BUYER}",
                    "--leaf-ttl",
                    self.leaf_ttl,
                    "--log-level",
                    "info",
                ],
                stdout=stdout,
                stderr=stderr,
                stdin=subprocess.DEVNULL,
                cwd=REPO,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"meshca serve exited:\n{self.log_tail()}")
            if (
                "listening on unix://" in out.read_text()
                and (self.data_dir / "admin.sock").exists()
            ):
                return
            time.sleep(0.05)
        raise RuntimeError(f"meshca serve did not start:\n{self.log_tail()}")

    def kill9(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        self.process = None

    def restart(self) -> None:
        self.restarts += 1
        self.start_meshca()

    def stop_meshca(self) -> int:
        process, self.process = self.process, None
        return 0 if process is None else stop_process(process)

    def log_tail(self, lines: int = 60) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def ca(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run_meshca("ca", *args, "--data-dir", str(self.data_dir), timeout=timeout)

    def status(self) -> dict[str, Any]:
        result = self.ca("status", "--json")
        if result.returncode != 0:
            raise RuntimeError(result.stderr)
        return dict(json.loads(result.stdout))

    def bundle(self) -> list[x509.Certificate]:
        result = run_meshca("bundle", "--data-dir", str(self.data_dir))
        return x509.load_pem_x509_certificates(result.stdout.encode())

    # Envoys -------------------------------------------------------------------------
    def start_envoys(self, app: RecordingApp) -> int:
        """Start web and buyer; returns buyer's plain listener port."""
        web_port, buyer_port = free_port(), free_port()
        server = f"unix://{self.socket}"
        web = run_meshca(
            "bootstrap",
            str(WEB),
            "--server",
            server,
            "--inbound",
            f"{web_port}:{app.port}",
            "--allow",
            str(BUYER),
        )
        buyer = run_meshca(
            "bootstrap",
            str(BUYER),
            "--server",
            server,
            "--outbound",
            f"{buyer_port}:127.0.0.1:{web_port}",
            "--upstream-id",
            str(WEB),
        )
        for name, result in (("web", web), ("buyer", buyer)):
            if result.returncode != 0:
                raise RuntimeError(result.stderr)
            config = yaml.safe_load(result.stdout)
            for cluster in config["static_resources"]["clusters"]:
                if cluster["name"] != "meshca_sds":
                    cluster["typed_extension_protocol_options"] = ONE_REQUEST_PER_CONNECTION
            envoy = EnvoyProcess(config, self.root, name)
            self.envoys.append(envoy)
            envoy.start()
        return buyer_port

    def trusted_serials(self) -> list[set[int]]:
        """Per Envoy, the serial numbers of the roots its validation contexts trust."""
        found = []
        for envoy in self.envoys:
            serials = set()
            for context in envoy.certs():
                for cert in context.get("ca_cert", []):
                    if cert.get("path") == "<inline>":
                        serials.add(int(cert["serial_number"], 16))
            found.append(serials)
        return found

    def stop_envoys(self) -> None:
        for envoy in self.envoys:
            envoy.stop()
        self.envoys.clear()


@contextlib.contextmanager
def rotation_mesh(*, leaf_ttl: str, interval: float = 0.01) -> Iterator[tuple[RotationMesh, Load]]:
    """The running mesh and its load; everything is stopped by PID on the way out."""
    with short_tempdir("mca-rot-") as root, RecordingApp() as app:
        result = run_meshca("init", "--data-dir", str(root / "data"))
        if result.returncode != 0:
            raise RuntimeError(result.stderr)
        mesh = RotationMesh(root, leaf_ttl=leaf_ttl)
        load: Load | None = None
        try:
            mesh.start_meshca()
            port = mesh.start_envoys(app)
            # both Envoys have their secrets (the log tails are printed below otherwise)
            eventually(lambda: http_get(port, "/warmup")[0] == 200, "a request gets through")
            load = Load(port, interval)
            load.start()
            yield mesh, load
        except BaseException:
            print(mesh.log_tail(), file=sys.stderr)
            for envoy in mesh.envoys:
                print(f"--- {envoy.name}\n{envoy.log_tail()}", file=sys.stderr)
            raise
        finally:
            if load is not None:
                load.stop()
            mesh.stop_envoys()
            mesh.stop_meshca()
