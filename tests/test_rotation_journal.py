"""The rotation journal: it round-trips, and a crash at any stage resumes where it was
without creating a CA twice (simulated in-process, and by SIGKILL of a real process)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from meshca.backends.local import ca_directory, init_local_ca, load_local_ca
from meshca.issuer import Issuer
from meshca.rotation.journal import (
    Journal,
    JournalError,
    JournalLockedError,
    JournalStore,
    PendingCa,
    RootRotationState,
    SlotKind,
    SlotStatus,
    cert_id,
)
from meshca.rotation.manager import RotationManager
from meshca.rotation.root import RootRotation
from meshca.spiffe import SpiffeId
from tests.rotation_harness import TD, CountingSource, SimulatedCrash, chain_root, init_ca

WORKLOAD = SpiffeId(TD, "/ns/app/sa/web")


def open_manager(data_dir: Path, source: CountingSource | None = None) -> RotationManager:
    """A manager as a freshly started process would build it: from the files alone."""
    manager = RotationManager(
        data_dir, load_local_ca(data_dir).authority(), source or CountingSource(data_dir)
    )
    manager.open()
    return manager


def ca_files(data_dir: Path) -> dict[str, bytes]:
    directory = ca_directory(data_dir)
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_journal_round_trips_through_its_file(tmp_path: Path) -> None:
    data_dir = init_ca(tmp_path / "data")
    manager = open_manager(data_dir)
    journal = manager.journal
    state = RootRotationState(new_slot="ca-0002", old_slot="ca-0001", done=2, target=5)
    changed = Journal(
        journal.trust_domain,
        journal.slots,
        journal.bundle,
        sequence=journal.sequence,
        next_slot=7,
        pending=PendingCa("ca-0006", SlotKind.ROOT),
        root_rotation=state,
    )
    saved = manager.journals.save(changed)
    loaded = JournalStore(data_dir).load()
    assert loaded == saved
    assert loaded.sequence == journal.sequence + 1
    manager.close()


def test_an_unreadable_journal_is_one_clear_error(tmp_path: Path) -> None:
    data_dir = init_ca(tmp_path / "data")
    open_manager(data_dir).close()
    path = JournalStore(data_dir).path
    path.write_text("{ not json")
    with pytest.raises(JournalError, match=str(path)):
        open_manager(data_dir)
    path.write_text(json.dumps({"format": 99}))
    with pytest.raises(JournalError, match="unsupported journal format"):
        open_manager(data_dir)


def test_first_open_adopts_the_ca_without_touching_it(tmp_path: Path) -> None:
    data_dir = init_ca(tmp_path / "data")
    before = ca_files(data_dir)
    manager = open_manager(data_dir)
    active = manager.journal.active
    assert active.id == "ca-0001"
    assert active.ca == cert_id(load_local_ca(data_dir).signer.certificate)
    assert ca_files(data_dir) == before
    assert (JournalStore(data_dir).slot_dir("ca-0001") / "ca-key.pem").stat().st_mode & 0o777 == (
        0o600
    )
    manager.close()


def test_one_process_at_a_time(tmp_path: Path) -> None:
    data_dir = init_ca(tmp_path / "data")
    first = open_manager(data_dir)
    with pytest.raises(JournalLockedError, match="another meshca process"):
        open_manager(data_dir)
    first.close()
    open_manager(data_dir).close()


def test_a_ca_replaced_outside_rotation_starts_a_new_journal(tmp_path: Path) -> None:
    data_dir = init_ca(tmp_path / "data")
    open_manager(data_dir).close()
    replaced = init_local_ca(data_dir, TD, force=True)
    manager = open_manager(data_dir)
    assert manager.journal.active.ca == cert_id(replaced.signer.certificate)
    assert load_local_ca(data_dir).signer.certificate == replaced.signer.certificate
    assert list((data_dir / "backup").glob("rotation-*/journal.json"))
    manager.close()


# --- crash at each stage, simulated in-process ----------------------------------------


async def crash_during_prepare(data_dir: Path, point: str) -> None:
    source = CountingSource(data_dir)
    manager = open_manager(data_dir, source)
    if point == "intent":
        source.crash_in = "create"
    elif point == "slot-written":
        original = manager.journals.write_slot

        def write_then_crash(slot_id: str, ca: object) -> None:
            original(slot_id, ca)  # type: ignore[arg-type]
            raise SimulatedCrash("crashed after writing the slot")

        manager.journals.write_slot = write_then_crash  # type: ignore[method-assign]
    elif point == "published":
        source.crash_in = "publish"
    with pytest.raises(SimulatedCrash):
        await manager.prepare(SlotKind.ROOT)
    manager.close()  # the process is gone: only the files remain


@pytest.mark.parametrize(
    ("point", "created_on_resume"),
    [("intent", 1), ("slot-written", 0), ("published", 0)],
)
async def test_resume_after_a_crash_while_preparing(
    tmp_path: Path, point: str, created_on_resume: int
) -> None:
    data_dir = init_ca(tmp_path / "data")
    old_root = load_local_ca(data_dir).bundle.roots[0]
    await crash_during_prepare(data_dir, point)
    source = CountingSource(data_dir)
    manager = open_manager(data_dir, source)
    journal = manager.journal
    assert source.created == created_on_resume
    assert journal.pending is None
    prepared = journal.prepared
    assert prepared is not None and prepared.id == "ca-0002" and prepared.kind is SlotKind.ROOT
    assert journal.next_slot == 3  # no second CA was ever allocated
    new_root = manager.ca(prepared.id).root
    assert list(journal.bundle) == [old_root, new_root]
    assert list(load_local_ca(data_dir).bundle) == [old_root, new_root]
    # A second restart changes nothing and creates nothing.
    manager.close()
    again = CountingSource(data_dir)
    manager = open_manager(data_dir, again)
    assert again.created == 0 and manager.journal.prepared == prepared
    manager.close()


async def test_resume_after_a_crash_while_publishing_an_activation(tmp_path: Path) -> None:
    data_dir = init_ca(tmp_path / "data")
    source = CountingSource(data_dir)
    manager = open_manager(data_dir, source)
    record = await manager.prepare(SlotKind.INTERMEDIATE)
    new_signer = manager.ca(record.id).signer
    source.crash_in = "publish"
    with pytest.raises(SimulatedCrash):
        await manager.activate(record.id)
    manager.close()
    # ca/ still holds the previous signer; the journal says the new one is active.
    assert load_local_ca(data_dir).signer.certificate != new_signer.certificate
    resumed_source = CountingSource(data_dir)
    resumed = open_manager(data_dir, resumed_source)
    assert resumed_source.created == 0
    assert resumed.journal.active.id == record.id
    assert resumed.authority.signer.certificate == new_signer.certificate
    assert load_local_ca(data_dir).signer.certificate == new_signer.certificate
    svid = Issuer(resumed.authority).issue(WORKLOAD)
    assert svid.chain[1] == new_signer.certificate
    resumed.close()


# --- crash by SIGKILL of a real process, between root-rotation steps ---------------------

CHILD = textwrap.dedent(
    """
    import asyncio, sys, time
    from pathlib import Path
    from meshca.backends.local import load_local_ca
    from meshca.rotation.local_ca import LocalCaSource
    from meshca.rotation.manager import RotationManager
    from meshca.rotation.root import RootRotation

    data_dir, point, marker = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    original = load_local_ca(data_dir)

    def stop_here():
        marker.write_text(point)
        time.sleep(3600)  # SIGKILL arrives here

    class Source(LocalCaSource):
        def create(self, active, *, new_root):
            ca = super().create(active, new_root=new_root)
            if point == "creating-ca":
                stop_here()
            return ca

        def publish(self, active, bundle):
            moved = active.root not in original.bundle
            if point == "publishing-activation" and moved:
                stop_here()
            super().publish(active, bundle)

    class Proxies:
        def unacked(self, predicate):
            if point == "waiting-for-acks":
                marker.write_text(point)
            return ["proxy-that-never-acks"]

    async def main():
        manager = RotationManager(
            data_dir, original.authority(), Source(data_dir, original.trust_domain),
            acks=Proxies() if point == "waiting-for-acks" else None,
        )
        manager.open()
        await RootRotation(manager, poll_interval=0.02).run()

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("point", ["creating-ca", "waiting-for-acks", "publishing-activation"])
async def test_root_rotation_survives_sigkill(tmp_path: Path, point: str) -> None:
    data_dir = init_ca(tmp_path / "data")
    old_root = load_local_ca(data_dir).bundle.roots[0]
    marker = tmp_path / "stopped"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(data_dir), point, str(marker)],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert child.poll() is None, child.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "the child never reached the crash point"
            await asyncio.sleep(0.02)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.communicate(timeout=30)
    state = JournalStore(data_dir).load()
    assert state is not None and state.root_rotation is not None
    expected_running = {"creating-ca": 1, "waiting-for-acks": 2, "publishing-activation": 3}
    assert state.root_rotation.running == expected_running[point]
    assert state.root_rotation.target == 5

    source = CountingSource(data_dir)
    manager = open_manager(data_dir, source)
    await RootRotation(manager).resume()  # carries on up to the step the operator asked for
    assert source.created == (1 if point == "creating-ca" else 0)
    journal = manager.journal
    assert journal.root_rotation is None
    assert journal.next_slot == 3  # exactly one new CA in the whole rotation
    assert [r.status for r in journal.slots] == [SlotStatus.ACTIVE]
    new_root = manager.active.root
    assert new_root != old_root and list(journal.bundle) == [new_root]
    signer, bundle = load_local_ca(data_dir).signer, load_local_ca(data_dir).bundle
    assert list(bundle) == [new_root]
    svid = Issuer(manager.authority).issue(WORKLOAD)
    assert svid.chain[1] == signer.certificate
    assert chain_root(svid.chain, bundle) == new_root
    assert not list((data_dir / "rotation" / "root-keys").iterdir())
    manager.close()
