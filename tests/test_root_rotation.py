"""Root rotation, step by step, with the secret store and real SDS streams: ACK waits
name who has not acknowledged, every served SVID moves to the new root at step 3, the
old root leaves only at step 5, and rollback from steps 1-3 restores the old state.
Also the admin endpoint, driven by the real ``meshca ca`` command."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography import x509

from meshca.backends.local import init_local_ca, load_local_ca
from meshca.rotation import admin
from meshca.rotation.admin import AdminServer, CaOperations, admin_request
from meshca.rotation.journal import JournalStore, RotationError
from meshca.rotation.local_ca import LocalCaSource
from meshca.rotation.manager import RotationManager
from meshca.rotation.operator import ADMIN_SOCKET
from meshca.rotation.root import AckTimeout, RootRotation
from meshca.serve.engine_acks import EngineAcks
from meshca.serve.rotation import RotationService
from meshca.store import SecretStore
from meshca.util.unix_socket import UnixSocketError, bind_listening_socket, reachable
from meshca.xds.resources import SECRET_TYPE
from tests.rotation_harness import TD, Proxy, chain_root
from tests.sds_harness import SdsHarness, k8s, sds_harness, wait_until

SHORT = timedelta(seconds=0.5)
CLI_TIMEOUT = 60.0  # one 'meshca ca' command; a hang fails here, not at pytest's timeout
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Mesh:
    harness: SdsHarness
    manager: RotationManager
    rotation: RootRotation
    a: Proxy
    b: Proxy
    old_root: x509.Certificate
    old_signer: x509.Certificate

    @property
    def store(self) -> SecretStore:
        return self.harness.store

    def served_roots(self) -> set[x509.Certificate]:
        bundle = self.manager.journal.bundle
        roots = set()
        for identity in self.store.identities():
            svid = self.store.cached(identity)
            assert svid is not None
            roots.add(chain_root(svid.chain, bundle))
        return roots


@asynccontextmanager
async def mesh(root: Path) -> AsyncIterator[Mesh]:
    async with sds_harness(root) as harness:
        data_dir = root / "data"
        acks = EngineAcks(harness.servicer.engine, harness.store)
        authority = harness.issuer.authority
        manager = RotationManager(
            data_dir,
            authority,  # type: ignore[arg-type]
            LocalCaSource(data_dir, TD),
            store=harness.store,
            acks=acks,
        )
        manager.open()
        rotation = RootRotation(manager, ack_timeout=timedelta(seconds=10), poll_interval=0.02)
        a = await Proxy(harness, k8s("shop", "web"), "node-a").start()
        b = await Proxy(harness, k8s("shop", "db"), "node-b").start()
        await wait_until(lambda: "default" in a.acked and "default" in b.acked, what="first ACKs")
        signer = manager.authority.signer.certificate
        try:
            yield Mesh(harness, manager, rotation, a, b, manager.active.root, signer)
        finally:
            await a.stop()
            await b.stop()
            manager.close()


def roots_of(proxy: Proxy) -> list[x509.Certificate]:
    return proxy.bundle()


async def test_root_rotation_step_by_step(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        # Step 1: the new root joins the bundle and is pushed; nothing is signed under it.
        m.b.holding = True  # node-b will not ACK the new bundle for a while
        await m.rotation.step(1)
        new_root = m.manager.ca(m.rotation.state.new_slot).root  # type: ignore[union-attr, arg-type]
        assert list(m.store.bundle()) == [m.old_root, new_root]
        assert m.served_roots() == {m.old_root}

        # Step 2 waits for node-b, which holds its ACK, and names it.
        await wait_until(lambda: roots_of(m.a) == [m.old_root, new_root], what="node-a ACK")
        with pytest.raises(AckTimeout) as timeout:
            await m.rotation.step(2, timeout=SHORT)
        assert "node-b" in str(timeout.value) and "node-a" not in str(timeout.value)
        assert m.rotation.state.done == 1  # type: ignore[union-attr]
        assert [w for w in m.rotation.waiting_on() if "node-b" in w]
        await m.b.release()
        await m.rotation.step(2)
        assert roots_of(m.b) == [m.old_root, new_root]

        # Step 3: signing moves to the new root and every served SVID is re-issued now.
        m.a.holding = True  # node-a will not ACK its new certificate for a while
        before = {i: m.store.cached(i).serial for i in m.store.identities()}  # type: ignore[union-attr]
        await m.rotation.step(3)
        after = {i: m.store.cached(i).serial for i in m.store.identities()}  # type: ignore[union-attr]
        assert before.keys() == after.keys() and all(before[i] != after[i] for i in before)
        assert m.served_roots() == {new_root}
        assert list(m.store.bundle()) == [m.old_root, new_root]  # both, until step 5

        # Step 4 waits for the proxies to hold certificates under the new root.
        await wait_until(lambda: m.a.held, what="node-a's new certificate")
        with pytest.raises(AckTimeout, match="node-a"):
            await m.rotation.step(4, timeout=SHORT)
        with pytest.raises(RotationError, match="needs step 4 first"):
            await m.rotation.step(5)
        assert m.old_root in m.store.bundle()
        await m.a.release()
        await m.rotation.step(4)
        assert chain_root(m.a.chain(), m.store.bundle()) == new_root
        assert chain_root(m.b.chain(), m.store.bundle()) == new_root

        # Step 5: the old root leaves the bundle, everywhere.
        await m.rotation.step(5)
        assert m.rotation.state is None
        assert list(m.store.bundle()) == [new_root]
        await wait_until(lambda: roots_of(m.a) == [new_root], what="node-a's final bundle")
        await wait_until(lambda: roots_of(m.b) == [new_root], what="node-b's final bundle")
        loaded = load_local_ca(tmp_path / "data")
        assert list(loaded.bundle) == [new_root]
        assert chain_root((loaded.signer.certificate,), loaded.bundle) == new_root


async def test_one_command_runs_every_step(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        reports = await m.rotation.run()
        assert [r.step for r in reports] == [1, 2, 3, 4, 5]
        new_root = m.manager.active.root
        assert new_root != m.old_root
        assert list(m.store.bundle()) == [new_root]
        assert m.served_roots() == {new_root}
        assert chain_root(m.a.chain(), m.store.bundle()) == new_root
        # Nothing is left of the old CA.
        assert [s.id for s in m.manager.journal.slots] == [m.manager.journal.active.id]
        slots = JournalStore(tmp_path / "data").slots_dir
        assert sorted(p.name for p in slots.iterdir()) == [m.manager.journal.active.id]


@pytest.mark.parametrize("after_step", [1, 2, 3])
async def test_rollback_restores_the_old_state(tmp_path: Path, after_step: int) -> None:
    async with mesh(tmp_path) as m:
        old_bundle = m.store.bundle()
        await m.rotation.run(through=after_step)
        new_slot = m.rotation.state.new_slot  # type: ignore[union-attr]
        if after_step == 3:
            assert m.served_roots() == {m.manager.ca(new_slot).root}  # type: ignore[arg-type]
        await m.rotation.rollback()
        assert m.rotation.state is None
        assert m.store.bundle() == old_bundle
        assert m.manager.authority.signer.certificate == m.old_signer
        assert m.served_roots() == {m.old_root}
        await wait_until(lambda: roots_of(m.a) == [m.old_root], what="node-a's bundle")
        assert chain_root(m.a.chain(), old_bundle) == m.old_root
        loaded = load_local_ca(tmp_path / "data")
        assert loaded.bundle == old_bundle and loaded.signer.certificate == m.old_signer
        assert not JournalStore(tmp_path / "data").slot_dir(new_slot).exists()  # type: ignore[arg-type]
        assert not list((tmp_path / "data" / "rotation" / "root-keys").iterdir())
        # The root key is the old one again: a signing-CA rotation under it works.
        await m.manager.rotate_now()
        assert m.served_roots() == {m.old_root}


async def test_no_rollback_once_the_old_root_is_gone(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        await m.rotation.run()
        with pytest.raises(RotationError, match="no root rotation is in progress"):
            await m.rotation.rollback()


async def test_after_a_restart_a_step_waits_for_proxies_that_reconnect(tmp_path: Path) -> None:
    """A restart mid-rotation forgets who was connected: within the reconnect grace, a
    step does not complete just because the proxies back so far have ACKed."""
    async with mesh(tmp_path) as m:
        # node-b's next stream; its channel is made while the server's certificate is
        # still under the old root, which this test client trusts.
        back = Proxy(m.harness, k8s("shop", "db"), "node-b")
        await m.rotation.run(through=3)
        await m.b.stop()  # node-b has not reconnected yet after the restart
        grace = 2.0
        m.rotation.hold_for_reconnects(grace)
        started = asyncio.get_running_loop().time()
        step4 = asyncio.create_task(m.rotation.step(4, timeout=timedelta(seconds=30)))
        await asyncio.sleep(0.2)
        assert not step4.done()  # node-a has ACKed; the grace is not over
        back.holding = True  # reconnected within the grace, not ACKed yet
        await back.start()
        try:
            await wait_until(lambda: back.held, what="node-b's first response")
            await asyncio.sleep(grace)
            assert not step4.done()  # the grace is over, but node-b has not ACKed
            await back.release()
            await asyncio.wait_for(step4, 10)
            assert asyncio.get_running_loop().time() - started >= grace
            new_root = m.manager.active.root
            assert chain_root(back.chain(), m.store.bundle()) == new_root
        finally:
            await back.stop()


async def test_operator_commands_reach_the_running_server(tmp_path: Path) -> None:
    """The real ``meshca ca`` command against the admin socket of a running manager:
    status shows who still has to ACK, and rotate-root steps act on live proxies."""
    async with mesh(tmp_path) as m:
        socket_path = tmp_path / "data" / "admin.sock"  # where the command looks for it
        admin = AdminServer(CaOperations(m.manager, m.rotation), socket_path)
        await admin.start()
        assert socket_path.stat().st_mode & 0o777 == 0o600
        try:
            m.b.holding = True
            code, out, err = await cli(tmp_path, "ca", "rotate-root", "--step", "1")
            assert code == 0, err
            assert "step 1:" in out and "server running" in out
            code, out, err = await cli(tmp_path, "ca", "status", "--json")
            status = json.loads(out)
            assert status["root_rotation"]["done"] == 1
            assert [w for w in status["waiting_on"] if "node-b" in w]
            assert len(status["bundle"]) == 2
            code, out, err = await cli(
                tmp_path, "ca", "rotate-root", "--step", "2", "--timeout", "1s"
            )
            assert code == 1 and "node-b" in err and err.count("\n") == 1
            await m.b.release()
            code, out, err = await cli(tmp_path, "ca", "rotate-root")
            assert code == 0, err
            assert "the rotation is complete" in out
            assert len(m.store.bundle()) == 1 and m.store.bundle().roots[0] != m.old_root
            code, out, err = await cli(tmp_path, "ca", "rotate")
            assert code == 0, err
        finally:
            await admin.close()
        assert not socket_path.exists()


class _RecordingOperations(CaOperations):
    """CaOperations noting, when the status of a reply is composed, what every stream
    had sent (the bundle version) and whether a write was still under way."""

    composed: list[list[tuple[str | None, bool]]]

    def status(self) -> dict[str, Any]:
        engine = cast(EngineAcks, self.manager.acks).engine
        self.composed.append(
            [
                (stream.types[SECRET_TYPE].sent_version, stream.writing)
                for stream in engine.streams()
                if SECRET_TYPE in stream.types
            ]
        )
        return super().status()


async def test_the_reply_to_the_operator_is_composed_after_the_pushes(tmp_path: Path) -> None:
    """Composing the reply reads every stream (tens of thousands in a large mesh): it
    waits until each stream the change woke has written its push, never holding one up."""
    async with mesh(tmp_path) as m:
        operations = _RecordingOperations(m.manager, m.rotation)
        operations.composed = []
        engine = m.harness.servicer.engine
        before = {s.id: s.types[SECRET_TYPE].sent_version for s in engine.streams()}
        answer = await operations.handle({"op": "rotate-root", "step": 1})
        assert answer["ok"], answer
        [seen] = operations.composed
        assert len(seen) == len(before) >= 2
        assert all(not writing for _, writing in seen), seen
        assert {version for version, _ in seen}.isdisjoint(before.values())


async def cli(root: Path, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "meshca",
        "--data-dir",
        str(root / "data"),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), CLI_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        command = " ".join(args)
        raise AssertionError(f"'meshca {command}' did not finish in {CLI_TIMEOUT:g}s") from None
    return process.returncode or 0, out.decode(), err.decode()


class _Echo:
    """Stands in for CaOperations behind the admin socket: answers with the request."""

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "result": {"asked": request}}


ECHO = cast(CaOperations, _Echo())


async def _ask(path: Path) -> dict[str, Any]:
    """The request the server received, less the deadline every request carries."""
    answer = await asyncio.to_thread(admin_request, path, {"op": "status"}, timeout=5)
    assert answer["asked"].pop("deadline") > 0
    return answer


async def test_the_admin_socket_is_0600_from_the_moment_it_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bound through the helper that chmods before the path appears (never under the
    umask), also in a data directory too long for a Unix socket address."""
    binds: list[tuple[Path, int]] = []

    def spy(path: Path, mode: int, **options: Any) -> socket.socket:
        binds.append((path, mode))
        return bind_listening_socket(path, mode, **options)

    monkeypatch.setattr(admin, "bind_listening_socket", spy)
    data_dir = tmp_path / ("d" * 120)
    data_dir.mkdir()
    path = data_dir / ADMIN_SOCKET
    server = AdminServer(ECHO, path)
    umask = os.umask(0)  # a socket bound in place would be 0777
    try:
        await server.start()
    finally:
        os.umask(umask)
    try:
        assert binds == [(path, 0o600)]
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        assert sorted(p.name for p in data_dir.iterdir()) == [ADMIN_SOCKET]
        assert await _ask(path) == {"asked": {"op": "status"}}
    finally:
        await server.close()
    assert not path.exists()


async def test_an_admin_socket_in_use_is_refused_and_a_stale_one_replaced(
    tmp_path: Path,
) -> None:
    path = tmp_path / ADMIN_SOCKET
    first = AdminServer(ECHO, path)
    await first.start()
    try:
        second = AdminServer(ECHO, path)  # another server given the same path
        with pytest.raises(UnixSocketError, match="in use"):
            await second.start()
        await second.close()  # removes nothing it did not create
        assert await _ask(path) == {"asked": {"op": "status"}}
    finally:
        await first.close()

    stale = socket.socket(socket.AF_UNIX)
    with reachable(path) as address:
        stale.bind(address)  # a socket nobody listens on, as a server that died leaves it
    stale.close()
    third = AdminServer(ECHO, path)
    await third.start()
    try:
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        assert await _ask(path) == {"asked": {"op": "status"}}
    finally:
        await third.close()


async def test_a_service_whose_admin_socket_is_in_use_leaves_no_schedule_running(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    ca = init_local_ca(data_dir, TD)
    occupant = AdminServer(ECHO, data_dir / ADMIN_SOCKET)  # another server holds the path
    await occupant.start()
    service = RotationService(data_dir, ca.authority(), None)
    service.open(timedelta(hours=1))
    try:
        with pytest.raises(UnixSocketError, match="in use"):
            await service.start()
        assert service.rotator._scheduler is None  # the CA schedule did not keep running
    finally:
        await occupant.close()
        await service.close()
