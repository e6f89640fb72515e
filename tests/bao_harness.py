"""A real OpenBao server (Vault's API) for tests: started, prepared and stopped by PID.

``BaoServer.dev()`` runs ``bao server -dev`` (in memory, unsealed, a random root
token) on a free loopback port, over plain HTTP or TLS (``-dev-tls``, for certificate
login). ``BaoServer.persistent()`` runs a one-node Raft server whose state survives a
restart (for outage tests: kill it, start it again sealed, unseal it). ``setup_pki``
mounts a PKI engine with a root and the per-workload role exactly as docs/vault.md
says to, and ``policy`` reads the least-privilege policies from docs/vault.md, so the
documentation is what the tests exercise.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hvac
import pytest
import requests

from tests.envoy_harness import free_port, stop_process

BAO = Path(sys.prefix) / "bin" / "bao"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "vault.md"
TRUST_DOMAIN = "cluster.local"
WORKLOAD_ROLE = "meshca-workload"
START_TIMEOUT = 30.0


def _clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env["HOME"] = str(home)  # the token helper must never touch the real home
    return env


def _all_threads_stopped(pid: int) -> bool:
    """Whether every thread of process ``pid`` is in the stopped state (``T``)."""
    for stat_file in Path(f"/proc/{pid}/task").glob("*/stat"):
        with contextlib.suppress(OSError):  # a thread that just ended
            # the state follows the command name, which is in parentheses
            if stat_file.read_text().rpartition(")")[2].split()[0] != "T":
                return False
    return True


class BaoServer:
    """One ``bao server`` process; ``stop`` ends it by PID."""

    def __init__(self, workdir: Path, args: list[str], port: int, *, tls: bool) -> None:
        self.workdir = workdir
        self.args = args
        self.port = port
        self.scheme = "https" if tls else "http"
        self.url = f"{self.scheme}://127.0.0.1:{port}"
        self.ca_cert: Path | None = workdir / "tls" / "vault-ca.pem" if tls else None
        self.root_token = ""
        self.unseal_key: str | None = None
        self.process: subprocess.Popen[bytes] | None = None

    # construction -----------------------------------------------------------------
    @classmethod
    def dev(cls, workdir: Path, *, tls: bool = False) -> BaoServer:
        port = free_port()
        token = "root-" + secrets.token_hex(8)
        args = [
            "server",
            "-dev",
            f"-dev-root-token-id={token}",
            f"-dev-listen-address=127.0.0.1:{port}",
            "-dev-no-store-token",
        ]
        if tls:
            args += ["-dev-tls", f"-dev-tls-cert-dir={workdir / 'tls'}"]
            (workdir / "tls").mkdir(parents=True, exist_ok=True)
        server = cls(workdir, args, port, tls=tls)
        server.root_token = token
        server.start()
        server.wait_ready()
        return server

    @classmethod
    def persistent(cls, workdir: Path) -> BaoServer:
        port, cluster_port = free_port(), free_port()
        data = workdir / "raft"
        data.mkdir(parents=True, exist_ok=True)
        config = workdir / "bao.hcl"
        config.write_text(
            f"""
storage "raft" {{
  path = "{data}"
  node_id = "meshca-test"
  performance_multiplier = 1
}}
listener "tcp" {{
  address = "127.0.0.1:{port}"
  cluster_address = "127.0.0.1:{cluster_port}"
  tls_disable = true
}}
api_addr = "http://127.0.0.1:{port}"
cluster_addr = "http://127.0.0.1:{cluster_port}"
"""
        )
        server = cls(workdir, ["server", f"-config={config}"], port, tls=False)
        server.start()
        server.wait_status({501, 503})
        answer = requests.put(
            f"{server.url}/v1/sys/init",
            json={"secret_shares": 1, "secret_threshold": 1},
            timeout=30,
        ).json()
        server.root_token = answer["root_token"]
        server.unseal_key = answer["keys"][0]
        server.unseal()
        return server

    # process control --------------------------------------------------------------
    def start(self) -> None:
        log = open(self.workdir / "bao.log", "ab")  # noqa: SIM115 - owned by the process
        self.process = subprocess.Popen(
            [str(BAO), *self.args],
            cwd=self.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_clean_env(self.workdir),
        )
        log.close()

    def wait_status(self, wanted: set[int], timeout: float = START_TIMEOUT) -> int:
        deadline = time.monotonic() + timeout
        verify: str | bool = str(self.ca_cert) if self.ca_cert else True
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                log = (self.workdir / "bao.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"bao exited with {self.process.returncode}:\n{log}")
            with contextlib.suppress(requests.RequestException, OSError):
                status = requests.get(
                    f"{self.url}/v1/sys/health", timeout=1, verify=verify
                ).status_code
                if status in wanted:
                    return status
            time.sleep(0.05)
        raise RuntimeError(f"bao at {self.url} not ready within {timeout}s")

    def wait_ready(self) -> None:
        self.wait_status({200})

    def unseal(self) -> None:
        assert self.unseal_key is not None
        requests.put(f"{self.url}/v1/sys/unseal", json={"key": self.unseal_key}, timeout=10)
        self.wait_ready()

    def pause(self) -> None:
        """SIGSTOP: connections are accepted by the kernel, never answered (a hung Vault).

        Returns once every thread of the server is stopped: the signal is asynchronous,
        and on a busy machine a server thread can still answer a request made just after
        ``kill`` returned (the outage a test sets up would then not have begun)."""
        assert self.process is not None
        pid = self.process.pid
        os.kill(pid, signal.SIGSTOP)
        deadline = time.monotonic() + 30
        while not _all_threads_stopped(pid):
            if time.monotonic() > deadline:
                raise RuntimeError(f"bao (pid {pid}) did not stop within 30s of SIGSTOP")
            time.sleep(0.005)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGCONT)  # a stopped process cannot handle SIGTERM
        stop_process(process, timeout=10)

    def restart(self) -> None:
        """Stop and start again on the same port (a persistent server comes back sealed)."""
        self.stop()
        self.start()
        self.wait_status({200, 503})

    # API helpers ------------------------------------------------------------------
    def client(self, token: str | None = None, **kwargs: Any) -> hvac.Client:
        verify: str | bool = str(self.ca_cert) if self.ca_cert else True
        return hvac.Client(
            url=self.url, token=token or self.root_token, verify=verify, timeout=10, **kwargs
        )

    def token(self, policies: list[str], **params: Any) -> str:
        """A new token (a child of root) with ``policies`` and extra create parameters."""
        answer = self.client().write_data(
            "auth/token/create", data={"policies": policies, **params}
        )
        return str(answer["auth"]["client_token"])


def setup_pki(
    server: BaoServer,
    mount: str = "pki",
    trust_domain: str = TRUST_DOMAIN,
    *,
    namespace: str | None = None,
) -> None:
    """A PKI mount with an EC root and the per-workload role of docs/vault.md."""
    root = server.client(namespace=namespace)
    root.sys.enable_secrets_engine("pki", path=mount, config={"max_lease_ttl": "87600h"})
    root.write_data(
        f"{mount}/root/generate/internal",
        data={
            "common_name": f"test root {trust_domain}",
            "uri_sans": f"spiffe://{trust_domain}",
            "key_type": "ec",
            "key_bits": 256,
            "ttl": "87600h",
        },
    )
    root.write_data(f"{mount}/roles/{WORKLOAD_ROLE}", data=workload_role(trust_domain))


def workload_role(trust_domain: str) -> dict[str, Any]:
    """The role parameters docs/vault.md gives (``bao write pki/roles/meshca-workload``)."""
    block = _docs_heredoc("bao write pki/roles/meshca-workload -")
    return dict(json.loads(block.replace("spiffe://cluster.local", f"spiffe://{trust_domain}")))


def policy(name: str, mount: str = "pki") -> str:
    """The HCL policy ``name`` from docs/vault.md (``bao policy write NAME``), for ``mount``."""
    return _docs_heredoc(f"bao policy write {name} -").replace('"pki/', f'"{mount}/')


def _docs_heredoc(command: str) -> str:
    """What docs/vault.md feeds to ``command`` in a here-document."""
    match = re.search(rf"^{re.escape(command)} <<'EOF'\n(.*?)^EOF$", DOCS.read_text(), re.S | re.M)
    if match is None:
        raise LookupError(f"no here-document for {command!r} in {DOCS}")
    return match.group(1)


def add_policy(server: BaoServer, name: str, mount: str = "pki") -> None:
    server.client().sys.create_or_update_policy(name, policy(name, mount))


@contextlib.contextmanager
def running(server_factory: Any, *args: Any, **kwargs: Any) -> Iterator[BaoServer]:
    """A server from ``BaoServer.dev`` or ``BaoServer.persistent`` in a temp directory,
    stopped (by PID) and removed on the way out."""
    workdir = Path(tempfile.mkdtemp(prefix="meshca-bao-"))
    server = server_factory(workdir, *args, **kwargs)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def prepared(server: BaoServer) -> BaoServer:
    """``server`` with the PKI mount ``pki`` and both mode policies of docs/vault.md."""
    setup_pki(server)
    add_policy(server, "meshca-intermediate")
    add_policy(server, "meshca-per-workload")
    return server


@pytest.fixture(scope="module")
def bao() -> Iterator[BaoServer]:
    """A dev server (plain HTTP) with the PKI mount ``pki`` and both mode policies."""
    with running(BaoServer.dev) as server:
        yield prepared(server)


@pytest.fixture(scope="module")
def bao_tls() -> Iterator[BaoServer]:
    """A dev server over TLS (its own CA in ``ca_cert``), for certificate login."""
    with running(BaoServer.dev, tls=True) as server:
        yield prepared(server)


@pytest.fixture
def mount(bao: BaoServer) -> Iterator[str]:
    """A PKI mount of its own on ``bao`` for one test (roots get rotated and deleted)."""
    name = f"pki-{os.urandom(3).hex()}"
    setup_pki(bao, name)
    yield name
    bao.client().sys.disable_secrets_engine(name)
