"""The serving transports under attack (issue 11, items 4, 5, 8, 9 and 14's second half).

Real ``meshca serve`` processes. Attackers are other uids on the Unix socket (a child
process that imports gRPC as root, then drops to the attacker's uid and the socket's
group before it connects) and idle TCP connections that never complete a handshake.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.cli_harness import assert_one_line_error
from tests.serve_harness import (
    MESHCA,
    ServeProcess,
    clean_env,
    fetch,
    kube_id,
    make_data_dir,
    meshca,
    serving,
    short_tempdir,
)

pytestmark = pytest.mark.timeout(120)

A = kube_id("shop", "web")
B = kube_id("shop", "buyer")
ATTACKER = 4242  # another local uid in the socket's group, mapped to nothing (or to B)
needs_root = pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another uid")

# Runs as root until every module is loaded, then becomes ATTACKER in the socket's group.
AS_ANOTHER_UID = """
import os, sys, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from envoy.service.secret.v3 import sds_pb2_grpc
from envoy.service.discovery.v3 import discovery_pb2
os.setgroups([])
os.setgid(0)
os.setuid(int(sys.argv[2]))
target = "unix:" + sys.argv[1]

def outcome(call):
    try:
        call()
        return "OK"
    except grpc.RpcError as exc:
        return exc.code().name

with grpc.insecure_channel(target) as channel:
    health = health_pb2_grpc.HealthStub(channel)
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    sds = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
    secret = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
    print("health", outcome(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5)))
    print("reflection", outcome(lambda: list(reflect.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))))
    print("fetch", outcome(lambda: sds.FetchSecrets(discovery_pb2.DiscoveryRequest(
        type_url=secret, resource_names=["ROOTCA"]), timeout=5)))
"""


def as_uid(socket_path: Path, uid: int) -> dict[str, str]:
    result = subprocess.run(
        [sys.executable, "-c", AS_ANOTHER_UID, str(socket_path), str(uid)],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return dict(line.split(" ", 1) for line in result.stdout.splitlines())


@pytest.fixture
def root() -> Iterator[Path]:
    with short_tempdir() as path:
        make_data_dir(path)
        os.chmod(path, 0o750)  # the socket's group (root's) may reach the socket
        yield path


def closed_at_once(path: Path) -> bool:
    """Whether the server closes a new connection without a byte (a relay would answer the
    HTTP/2 preface with its SETTINGS frame)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        try:
            return sock.recv(1024) == b""
        except ConnectionResetError:
            return True


# --- the Unix socket (items 5 and 14) -------------------------------------------------


@needs_root
def test_an_unmapped_uid_is_closed_at_once_health_and_reflection_included(root: Path) -> None:
    with serving(root, root / "data", "--uds-identity", f"1234={A}") as server:
        for _ in range(3):
            seen = as_uid(server.uds, ATTACKER)
            assert seen == {
                "health": "UNAVAILABLE",
                "reflection": "UNAVAILABLE",
                "fetch": "UNAVAILABLE",
            }
        refused = [line for line in server.log().splitlines() if "not mapped" in line]
    assert 1 <= len(refused) <= 2, refused  # many attempts, one warning per interval
    assert f"uid {ATTACKER}" in refused[0]


@needs_root
def test_one_uid_cannot_take_every_relay_slot(root: Path) -> None:
    mapping = f"{os.getuid()}={A},{ATTACKER}={B}"
    with serving(
        root, root / "data", "--uds-identity", mapping, "--uds-max-connections-per-uid", "4"
    ) as server:
        held = []
        for _ in range(4):  # this uid's slots, held open
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(str(server.uds))
            held.append(sock)
        try:
            assert closed_at_once(server.uds)  # the fifth is closed at once...
            assert as_uid(server.uds, ATTACKER)["fetch"] == "OK"  # ...another uid is served
        finally:
            for sock in held:
                sock.close()
        assert "uds_max_connections_per_uid" in server.log()


@pytest.mark.parametrize("uid", ["65534", "65535", "4294967295", "4294967296"])
def test_the_overflow_uid_cannot_be_mapped(root: Path, uid: str) -> None:
    result = subprocess.run(
        [
            *MESHCA,
            "serve",
            "--data-dir",
            str(root / "data"),
            "--uds",
            str(root / "s.sock"),
            "--uds-identity",
            f"{uid}={A}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(),
        check=False,
    )
    assert result.returncode != 0
    assert_one_line_error(result.stderr, f"uid {uid}")
    assert "overflow uid" in result.stderr or "not a valid uid" in result.stderr


# --- TCP (items 4 and 8) ---------------------------------------------------------------


def test_a_second_server_on_the_same_port_fails_to_start(root: Path) -> None:
    with serving(root, root / "data", "--listen", "127.0.0.1:0") as first:
        port = first.tcp_port
        second = subprocess.run(
            [
                *MESHCA,
                "serve",
                "--data-dir",
                str(root / "data"),
                "--uds",
                str(root / "second.sock"),
                "--listen",
                f"127.0.0.1:{port}",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            env=clean_env(),
            check=False,
        )
        assert second.returncode == 1
        last = second.stderr.splitlines()[-1]  # after its start-up log lines
        assert last.startswith(f"meshca: error: cannot listen on 127.0.0.1:{port}"), second.stderr
        assert "in use" in last and "Traceback" not in second.stderr


def health_port(server: ServeProcess) -> int:
    match = re.search(r"^health on \S+:(\d+) ", server.stdout.read_text(), re.MULTILINE)
    assert match, server.stdout.read_text()
    return int(match.group(1))


def mtls_channel(root: Path, port: int, name: str) -> grpc.aio.Channel:
    certs = root / name
    if not certs.exists():
        meshca(
            "issue", str(A), "--data-dir", str(root / "data"), "--ttl", "2d", "--out", str(certs)
        )
    credentials = grpc.ssl_channel_credentials(
        (certs / "bundle.pem").read_bytes(),
        (certs / "key.pem").read_bytes(),
        (certs / "cert.pem").read_bytes(),
    )
    options = [
        ("grpc.ssl_target_name_override", "localhost"),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options=options)


async def test_idle_tcp_connections_cannot_starve_authorised_callers(root: Path) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with serving(
        root,
        root / "data",
        *("--listen", "127.0.0.1:0", "--health-listen", "127.0.0.1:0"),
        *("--uds-identity", f"{os.getuid()}={A}"),
        open_files=256,
    ) as server:
        assert server.tcp_port is not None
        async with (
            mtls_channel(root, server.tcp_port, "before") as before,
            grpc.aio.insecure_channel(f"unix:{server.uds}") as uds,
            grpc.aio.insecure_channel(f"127.0.0.1:{health_port(server)}") as probe,
        ):
            assert await fetch(before, ["default"])
            lines_before = len(server.log().splitlines())
            idle = []
            try:
                for _ in range(600):  # more than the server's 256 descriptors
                    sock = socket.create_connection(("127.0.0.1", server.tcp_port), timeout=5)
                    idle.append(sock)
                # during the flood: the Unix socket, the health probe and an established
                # mTLS connection are all served
                assert await fetch(uds, ["default"])
                check = health_pb2_grpc.HealthStub(probe).Check
                assert (await check(health_pb2.HealthCheckRequest(), timeout=10)).status == 1
                assert await fetch(before, ["default"])
                # idle connections are dropped after the handshake timeout: a new mTLS
                # caller gets in even while they are still held open on our side
                deadline = time.monotonic() + 60
                while True:
                    try:
                        async with mtls_channel(root, server.tcp_port, "after") as after:
                            assert await fetch(after, ["default"])
                        break
                    except grpc.aio.AioRpcError:
                        assert time.monotonic() < deadline, "no new mTLS caller got in"
            finally:
                for sock in idle:
                    sock.close()
        log = server.log().splitlines()[lines_before:]
        assert server.process.poll() is None  # still running
    assert len(log) < 50, f"{len(log)} log lines during the flood:\n" + "\n".join(log[:20])
    assert not any("Traceback" in line for line in log)
