"""The Unix-socket front door: SO_PEERCRED reaches the gRPC handler, and nothing else can
pretend to be a relayed caller."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshca.util import unix_socket
from meshca.xds.auth import PeerCred
from meshca.xds.uds import PeerCredTable, UdsError, UdsFrontDoor
from tests.serve_harness import short_tempdir

pytestmark = pytest.mark.timeout(60)


class _RecordingHealth(health_pb2_grpc.HealthServicer):
    """Answers Check and records who the front door says is calling."""

    def __init__(self, table: PeerCredTable) -> None:
        self.table = table
        self.seen: list[tuple[str, PeerCred | None]] = []

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        peer = context.peer()
        self.seen.append((peer, self.table.lookup(peer)))
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with short_tempdir() as path:
        yield path


class _Served:
    def __init__(self, door: UdsFrontDoor, servicer: _RecordingHealth) -> None:
        self.door = door
        self.servicer = servicer


@pytest.fixture
async def served(short_dir: Path) -> AsyncIterator[_Served]:
    door = UdsFrontDoor(short_dir / "meshca.sock", private_dir=short_dir / "private")
    servicer = _RecordingHealth(door.peer_creds)
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(door.prepare())
    await server.start()
    await door.start()
    try:
        yield _Served(door, servicer)
    finally:
        await server.stop(0)
        await door.close()


async def _check(target: str) -> health_pb2.HealthCheckResponse:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)


async def test_the_handler_learns_the_callers_uid_gid_and_pid(served: _Served) -> None:
    response = await _check(f"unix:{served.door.public_path}")
    assert response.status == health_pb2.HealthCheckResponse.SERVING
    [(peer, cred)] = served.servicer.seen
    assert peer.startswith("unix:" + str(served.door.private_dir) + "/")
    assert cred == PeerCred(uid=os.getuid(), gid=os.getgid(), pid=os.getpid())


async def test_the_mapping_is_dropped_when_the_connection_closes(served: _Served) -> None:
    await _check(f"unix:{served.door.public_path}")
    [(peer, _)] = served.servicer.seen
    for _ in range(100):
        if served.door.peer_creds.lookup(peer) is None:
            break
        await asyncio.sleep(0.02)
    assert served.door.peer_creds.lookup(peer) is None
    assert len(served.door.peer_creds) == 0
    # the relay's bound client socket names are removed right after connecting
    assert sorted(p.name for p in served.door.private_dir.iterdir()) == ["grpc.sock"]


async def test_a_direct_connection_to_the_private_socket_maps_to_nobody(served: _Served) -> None:
    await _check("unix:" + str(served.door.backend_path))
    [(peer, cred)] = served.servicer.seen
    assert cred is None  # gRPC reports an unbound client as "unix:", never a relay's name
    assert not peer.startswith("unix:" + str(served.door.private_dir) + "/")


async def test_private_directory_and_public_socket_modes(served: _Served) -> None:
    private = os.stat(served.door.private_dir)
    assert stat.S_IMODE(private.st_mode) == 0o700
    assert private.st_uid == os.getuid()
    public = os.lstat(served.door.public_path)
    assert stat.S_ISSOCK(public.st_mode)
    assert stat.S_IMODE(public.st_mode) == 0o660


SYSTEM_PYTHON = "/usr/bin/python3"  # runnable by any user, unlike a venv under /root


@pytest.mark.skipif(
    os.getuid() != 0 or not os.access(SYSTEM_PYTHON, os.X_OK),
    reason="needs root and a system python to run a client as another user",
)
async def test_another_user_cannot_reach_the_private_socket(served: _Served) -> None:
    os.chmod(served.door.public_path.parent, 0o755)  # the test's own dir: traversable...
    probe = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        "    s.connect(sys.argv[1])\n"
        "except PermissionError:\n"
        "    print('denied')\n"
        "else:\n"
        "    print('connected')\n"
    )
    result = await asyncio.to_thread(
        subprocess.run,
        [SYSTEM_PYTHON, "-c", probe, str(served.door.backend_path)],
        user=65534,
        group=65534,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.stdout.strip() == "denied", result.stderr  # ...the private one is not


def test_a_mode_looser_than_0660_is_refused(short_dir: Path) -> None:
    for mode in (0o666, 0o662, 0o770, 0o664):
        with pytest.raises(UdsError, match="too open"):
            UdsFrontDoor(short_dir / "s.sock", mode=mode)


def test_a_mode_that_shuts_out_meshcas_own_user_is_refused(short_dir: Path) -> None:
    with pytest.raises(UdsError, match="would stop meshca's own user"):
        UdsFrontDoor(short_dir / "s.sock", mode=0o460)


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(250):
        if condition():
            return
        await asyncio.sleep(0.02)
    assert condition()


async def test_connections_beyond_the_limit_are_closed_at_once(served: _Served) -> None:
    door = served.door
    door.max_connections = 1
    _, first = await asyncio.open_unix_connection(str(door.public_path))
    await _until(lambda: door.connections == 1)
    reader, second = await asyncio.open_unix_connection(str(door.public_path))
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed without a relay
    second.close()
    assert door.connections == 1
    first.close()
    await _until(lambda: door.connections == 0)
    response = await _check(f"unix:{door.public_path}")  # room again
    assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_tighter_mode_is_honoured(short_dir: Path) -> None:
    door = UdsFrontDoor(short_dir / "s.sock", mode=0o600)
    await door.start()
    try:
        assert stat.S_IMODE(os.lstat(short_dir / "s.sock").st_mode) == 0o600
    finally:
        await door.close()
    assert not (short_dir / "s.sock").exists()
    assert not door.private_dir.exists()


async def test_a_stale_socket_is_replaced_but_a_live_one_or_a_file_is_not(
    short_dir: Path,
) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(short_dir / "stale.sock"))
    stale.close()  # a socket file nobody listens on, as a crashed server leaves it
    door = UdsFrontDoor(short_dir / "stale.sock")
    await door.start()
    try:
        second = UdsFrontDoor(short_dir / "stale.sock")
        with pytest.raises(UdsError, match="in use"):
            await second.start()
        await second.close()
        assert (short_dir / "stale.sock").exists()  # the live one was left alone
    finally:
        await door.close()

    (short_dir / "file").write_text("precious")
    door = UdsFrontDoor(short_dir / "file")
    with pytest.raises(UdsError, match="not a socket"):
        await door.start()
    await door.close()
    assert (short_dir / "file").read_text() == "precious"


def test_a_path_too_long_for_a_unix_socket_is_a_clear_error(short_dir: Path) -> None:
    with pytest.raises(UdsError, match="too long"):
        UdsFrontDoor(short_dir / ("x" * 120))


def test_the_socket_appears_only_with_its_final_mode(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bound in a private staging directory, chmod'ed there, then renamed into place: the
    public path never holds a socket with the umask's looser mode."""
    path = short_dir / "s.sock"
    seen: list[tuple[int, int, bool]] = []
    real_rename = os.rename

    def rename(src: str | Path, dst: str | Path) -> None:
        staged = os.lstat(src)
        staging_dir = os.stat(Path(src).parent)
        seen.append(
            (stat.S_IMODE(staged.st_mode), stat.S_IMODE(staging_dir.st_mode), path.exists())
        )
        real_rename(src, dst)

    monkeypatch.setattr(unix_socket.os, "rename", rename)
    old_umask = os.umask(0)  # a bind in place would leave the socket 0777
    try:
        sock = unix_socket.bind_listening_socket(path, 0o600)
    finally:
        os.umask(old_umask)
    try:
        assert seen == [(0o600, 0o700, False)]  # chmod'ed before the path existed
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        assert [p.name for p in short_dir.iterdir()] == ["s.sock"]  # no staging left over
    finally:
        sock.close()


async def test_a_path_whose_staging_name_is_too_long_still_listens(short_dir: Path) -> None:
    """The staging directory adds to the path; a public path that fits sun_path is enough."""
    path = short_dir / ("x" * (unix_socket.MAX_SOCKET_PATH - len(os.fsencode(short_dir)) - 1))
    assert len(os.fsencode(path)) == unix_socket.MAX_SOCKET_PATH
    door = UdsFrontDoor(path, private_dir=short_dir / "private")
    await door.start()
    try:
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o660
        _, writer = await asyncio.open_unix_connection(str(path))
        writer.close()
    finally:
        await door.close()
    assert not path.exists()
