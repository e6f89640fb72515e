"""Hostile files and requests against a running ``meshca serve``: mesh files that are
huge, not files at all, or alias bombs; a reload of a large file while serving; NaN and
infinite timeouts on the admin socket. Each is refused with one short line, the server
keeps what it had, and it keeps answering."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from meshca.serve.server import MeshcaServer
from tests.serve_harness import (
    default_config,
    fetch,
    kube_id,
    make_data_dir,
    served,
    short_tempdir,
    uds_channel,
)

pytestmark = pytest.mark.timeout(120)

A = kube_id("shop", "a")
MESH = """
workloads:
  - {name: a, namespace: shop, service_account: a, address: 127.0.0.71, ports: [8080],
     labels: {app: a}}
services:
  - {name: a, namespace: shop, address: 127.0.0.171, ports: [8080], selector: {app: a}}
"""


def alias_bomb(depth: int) -> str:
    """Each level lists the previous one nine times: 9**depth strings once walked (the
    issue's 371-byte file had nine levels; six keep the old code's failure affordable)."""
    levels = ['&l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    levels += [f"&l{i} [{','.join([f'*l{i - 1}'] * 9)}]" for i in range(1, depth + 1)]
    return f"trust_domain: [{', '.join(levels)}]\n"


def big_mesh(workloads: int) -> str:
    """A valid mesh file of ``workloads`` workloads (about 100 bytes each)."""
    lines = ["workloads:"]
    for i in range(workloads):
        address = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
        lines.append(
            f"  - {{name: w{i}, namespace: big, service_account: sa{i % 50}, "
            f"address: {address}, ports: [8080]}}"
        )
    return "\n".join(lines) + "\n"


@pytest.fixture
async def server() -> AsyncIterator[MeshcaServer]:
    with short_tempdir() as root:
        make_data_dir(root)
        (root / "mesh.yaml").write_text(MESH)
        config = default_config(
            root, listen=None, mesh_file=root / "mesh.yaml", uds_identities={os.getuid(): (A,)}
        )
        async with served(config) as running:
            yield running


def _replace(path: Path, write: object) -> None:
    """Put a new file at ``path`` the way deploy tools do (rename over it)."""
    staged = path.with_name(path.name + ".new")
    if callable(write):
        write(staged)
    os.replace(staged, path)


@pytest.mark.parametrize(
    ("name", "write", "expected"),
    [
        ("alias-bomb", lambda p: p.write_text(alias_bomb(6)), "aliases (*name) are not allowed"),
        (
            "too-large",
            lambda p: p.write_text("# padding\n" * 500_000),
            "is larger than the limit of 4194304 bytes",
        ),
        ("fifo", os.mkfifo, "is not a regular file"),
        ("dev-zero", lambda p: p.symlink_to("/dev/zero"), "is not a regular file"),
    ],
)
async def test_a_hostile_mesh_reload_is_one_short_line_and_changes_nothing(
    server: MeshcaServer,
    caplog: pytest.LogCaptureFixture,
    name: str,
    write: object,
    expected: str,
) -> None:
    assert server.mesh_file is not None
    before = server.mesh
    caplog.set_level(logging.INFO, logger="meshca.mesh")
    async with uds_channel(server) as channel:
        (first,) = await fetch(channel, [str(A)])
        _replace(server.mesh_file.path, write)

        def refused() -> list[logging.LogRecord]:
            return [r for r in caplog.records if r.name == "meshca.mesh" and r.levelname == "ERROR"]

        for _ in range(1000):  # bounded: the poll runs every 50 ms
            if refused():
                break
            await asyncio.sleep(0.01)
        [record] = refused()
        message = record.getMessage()
        assert expected in message, message
        assert len(message) < 300 and "\n" not in message
        assert "lol" not in message
        assert server.mesh is before  # the previous mesh stays in use
        (again,) = await fetch(channel, [str(A)])  # and the server still answers
        assert again.tls_certificate == first.tls_certificate


async def test_a_large_reload_never_blocks_the_event_loop(
    server: MeshcaServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A valid mesh file of 600 kB takes a second or more to read and validate. asyncio's
    own detector of blocking steps (debug mode) reports any loop step over half a second
    with the coroutine that took it: none may be the mesh file's watcher, which reads and
    validates in a worker thread. (Other slow steps, on a loaded machine, are not its.)"""
    assert server.mesh_file is not None
    path = server.mesh_file.path
    staged = path.with_name("big.yaml")
    await asyncio.to_thread(staged.write_text, big_mesh(6_000))
    loop = asyncio.get_running_loop()
    loop.slow_callback_duration = 0.5
    caplog.set_level(logging.WARNING, logger="asyncio")
    loop.set_debug(True)
    try:
        os.replace(staged, path)  # the next poll reloads it
        for _ in range(12_000):  # bounded (two minutes): until the new mesh is in use
            if len(server.mesh.workloads) == 6_000:
                break
            await asyncio.sleep(0.01)
        assert len(server.mesh.workloads) == 6_000
    finally:
        loop.set_debug(False)
    slow = [
        r.getMessage()
        for r in caplog.records
        if r.name == "asyncio" and "took" in r.getMessage() and "mesh_reload" in r.getMessage()
    ]
    assert slow == []


async def _admin(path: Path, line: bytes) -> dict[str, object]:
    def ask() -> dict[str, object]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(path))
            sock.sendall(line)
            reply = sock.makefile("rb").readline()
        answer: dict[str, object] = json.loads(reply)
        return answer

    return await asyncio.to_thread(ask)


@pytest.mark.parametrize("timeout", ["NaN", "Infinity", "-Infinity", "1e300"])
async def test_admin_timeouts_that_are_not_numbers_are_refused_cleanly(
    server: MeshcaServer, caplog: pytest.LogCaptureFixture, timeout: str
) -> None:
    """JSON as Python reads it accepts NaN and Infinity: a timeout must still be a
    positive, finite number of seconds, refused with a reason, not an internal error."""
    socket_path = server.config.data_dir / "admin.sock"
    request = f'{{"op": "rotate-root", "step": 1, "timeout": {timeout}}}\n'.encode()
    answer = await _admin(socket_path, request)
    assert answer["ok"] is False
    assert "timeout must be a positive number of seconds" in str(answer["error"])
    assert not [r for r in caplog.records if r.exc_info]  # no traceback in the log
