"""A server that stops answering never makes ``meshca ca`` hang, and a request whose
client went away before the server got to it is not carried out later."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

from meshca.rotation.admin import AdminServer, CaOperations
from meshca.util.unix_socket import reachable
from tests.test_root_rotation import cli, mesh


async def test_a_server_that_does_not_answer_does_not_make_status_hang(tmp_path: Path) -> None:
    """Something listens on the admin socket and never answers (a stopped server): the
    command gives up, and its advice is not to run a command that would hang too."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    silent = socket.socket(socket.AF_UNIX)
    with reachable(data_dir / "admin.sock") as address:
        silent.bind(address)
    silent.listen(8)  # connections queue; nobody ever accepts them
    try:
        code, out, err = await cli(tmp_path, "ca", "status", "--timeout", "1s")
    finally:
        silent.close()
    assert code == 1 and out == ""
    assert "did not answer within" in err and err.count("\n") == 1
    assert "meshca ca status" not in err


def send_and_leave(path: Path, request: dict[str, object]) -> None:
    """A client that sends its request and goes away (killed, or gave up) before the
    server reads it: run without yielding, so the server's loop cannot see it meanwhile."""
    with socket.socket(socket.AF_UNIX) as sock, reachable(path) as address:
        sock.connect(address)
        sock.sendall((json.dumps(request) + "\n").encode())


def ask_and_keep_waiting(path: Path, request: dict[str, object]) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    with reachable(path) as address:
        sock.connect(address)
    sock.sendall((json.dumps(request) + "\n").encode())
    return sock


async def answer(sock: socket.socket) -> dict[str, object]:
    def read() -> bytes:
        sock.settimeout(30)
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data

    try:
        result: dict[str, object] = json.loads(await asyncio.to_thread(read))
        return result
    finally:
        sock.close()


async def test_a_request_whose_client_went_away_is_not_carried_out(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        path = tmp_path / "data" / "admin.sock"
        admin = AdminServer(CaOperations(m.manager, m.rotation), path)
        await admin.start()
        try:
            signer = m.manager.authority.signer.certificate
            # Killed before the server read its request:
            send_and_leave(path, {"op": "rotate"})
            # Still connected, but past the deadline it gave (it timed out meanwhile):
            late = ask_and_keep_waiting(path, {"op": "rotate", "deadline": time.time() - 1})
            refused = await answer(late)
            assert refused["ok"] is False and "not carried out" in str(refused["error"])
            # Let the server see the first one too, then check that neither rotated.
            live = ask_and_keep_waiting(path, {"op": "status", "deadline": time.time() + 30})
            status = await answer(live)
            assert status["ok"] is True
            assert m.manager.authority.signer.certificate == signer
            assert [s.id for s in m.manager.journal.slots] == ["ca-0001"]
            # A client that waits is served as before.
            code, _, err = await cli(tmp_path, "ca", "rotate")
            assert code == 0, err
            assert m.manager.authority.signer.certificate != signer
        finally:
            await admin.close()
