"""An in-process ``meshca serve`` for tests, a real ``meshca serve`` process, and small
SDS client helpers.

``served(...)`` starts a :class:`meshca.serve.server.MeshcaServer` on loopback TCP (port 0)
and/or a Unix socket in a short temp directory, with a fresh local CA, and stops it.
``serving(...)`` runs ``meshca serve`` as a process until it listens, and stops it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.protobuf import struct_pb2

from meshca.backends.local import init_local_ca
from meshca.issuer import Issuer, X509Svid
from meshca.serve.config import ServeConfig
from meshca.serve.server import MeshcaServer
from meshca.spiffe import SpiffeId, TrustDomain
from meshca.xds.resources import SECRET_TYPE
from tests.envoy_harness import stop_process

TD = TrustDomain("cluster.local")
MESHCA = [sys.executable, "-m", "meshca"]


def kube_id(namespace: str, account: str) -> SpiffeId:
    return SpiffeId.from_kubernetes(namespace, account, TD)


@contextlib.contextmanager
def short_tempdir(prefix: str = "mca-") -> Iterator[Path]:
    """Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def make_data_dir(root: Path) -> Path:
    data_dir = root / "data"
    init_local_ca(data_dir, TD)
    return data_dir


@contextlib.asynccontextmanager
async def served(config: ServeConfig, **kwargs: Any) -> AsyncIterator[MeshcaServer]:
    server = MeshcaServer(config, **kwargs)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(0)


def default_config(root: Path, **overrides: Any) -> ServeConfig:
    config = ServeConfig(
        data_dir=root / "data",
        listen=("127.0.0.1", 0),
        uds=root / "sds.sock",
        mesh_poll_interval=0.05,
        grace=0.0,
    )
    return replace(config, **overrides)


def client_svid(
    server: MeshcaServer, spiffe_id: SpiffeId, ttl: timedelta = timedelta(days=2)
) -> X509Svid:
    """A client certificate from the server's own CA (what ``meshca issue --ttl 2d`` would
    write: longer-lived than the SVIDs served, which never outlive the certificate that
    asks for them)."""
    return Issuer(server.authority).issue(spiffe_id, ttl=ttl)


def mtls_channel(server: MeshcaServer, svid: X509Svid, host: str = "localhost") -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        server.store.bundle().pem(), svid.private_key_pem(), svid.chain_pem()
    )
    return grpc.aio.secure_channel(f"{host}:{server.tcp_port}", credentials)


def uds_channel(server: MeshcaServer) -> grpc.aio.Channel:
    assert server.config.uds is not None
    return grpc.aio.insecure_channel(f"unix:{server.config.uds}")


def node(node_id: str = "", **metadata: str) -> base_pb2.Node:
    meta = struct_pb2.Struct()
    for key, value in metadata.items():
        meta.fields[key].string_value = value
    return base_pb2.Node(id=node_id, cluster="test", metadata=meta)


def request(names: list[str], node_id: str = "", **kw: Any) -> discovery_pb2.DiscoveryRequest:
    return discovery_pb2.DiscoveryRequest(
        type_url=SECRET_TYPE, resource_names=names, node=node(node_id, **kw.pop("meta", {})), **kw
    )


def secrets_of(resources: Any) -> list[secret_pb2.Secret]:
    found = []
    for item in resources:
        packed = getattr(item, "resource", item)  # Delta wraps each Any in a Resource
        secret = secret_pb2.Secret()
        packed.Unpack(secret)
        found.append(secret)
    return found


async def fetch(
    channel: grpc.aio.Channel, names: list[str], node_id: str = "", **meta: str
) -> list[secret_pb2.Secret]:
    stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
    response = await stub.FetchSecrets(request(names, node_id, meta=meta), timeout=10)
    return secrets_of(response.resources)


# --- a real `meshca serve` process ----------------------------------------------------------


@dataclass
class ServeProcess:
    process: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path
    uds: Path
    tcp_port: int | None = None  # with --listen: the port it says it listens on

    def stop(self) -> int:
        return stop_process(self.process)

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")


def announced_tcp_port(stdout: str) -> int | None:
    """The port of ``listening on tcp HOST:PORT`` in ``meshca serve``'s output, if any."""
    match = re.search(r"^listening on tcp \S+:(\d+) ", stdout, re.MULTILINE)
    return int(match.group(1)) if match else None


def clean_env() -> dict[str, str]:
    """The environment without meshca's, Vault's or gRPC's settings of the caller's."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("MESHCA_", "VAULT_", "GRPC_"))}


def meshca(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [*MESHCA, *args], capture_output=True, text=True, timeout=60, env=clean_env()
    )
    assert result.returncode == 0, result.stderr
    return result


def with_open_files(count: int | None, command: list[str]) -> list[str]:
    """``command`` run with at most ``count`` open files, soft and hard (``ulimit -n``),
    set by a shell before it execs (no Python runs between fork and exec)."""
    if count is None:
        return command
    return ["/bin/sh", "-c", 'ulimit -n "$0" && exec "$@"', str(count), *command]


@contextlib.contextmanager
def serving(
    root: Path,
    data_dir: Path,
    *args: str,
    name: str = "meshca",
    env: dict[str, str] | None = None,
    open_files: int | None = None,
) -> Iterator[ServeProcess]:
    """``meshca serve --uds <root>/<name>.sock ARGS`` (in ``env``, else a clean
    environment; ``open_files``: its ``ulimit -n``), until it says it listens
    (``tcp_port`` is where, with ``--listen``); stopped by PID (SIGTERM) on the way out."""
    uds = root / f"{name}.sock"
    stdout, stderr = root / f"{name}.out", root / f"{name}.log"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(
            with_open_files(
                open_files,
                [*MESHCA, "serve", "--data-dir", str(data_dir), "--uds", str(uds), *args],
            ),
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=clean_env() if env is None else env,
        )
    running = ServeProcess(process, stdout, stderr, uds)
    try:
        deadline = time.monotonic() + 30
        while "listening on unix://" not in stdout.read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"meshca serve did not start:\n{running.log()}")
            time.sleep(0.05)
        running.tcp_port = announced_tcp_port(stdout.read_text())
        yield running
    finally:
        running.stop()
