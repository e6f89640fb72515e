"""Signing-CA rotation: the schedule (1/2 prepare, 5/6 activate), leaves never outliving
their signer, a new root published at once and activated only once ACKed, the root key
offline, the start-up checks, and ``meshca ca`` acting on the data directory."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from meshca.backends.local import ROOT_KEY, ca_directory, load_local_ca
from meshca.issuer import Issuer, TrustBundle, TtlError, TtlPolicy
from meshca.issuer.policy import check_signing_ca
from meshca.issuer.verify import verify_chain
from meshca.rotation.acks import AckedSecret, SecretPredicate, issued_by
from meshca.rotation.checks import check_new_ca_ttl, expiry_warnings, startup_checks
from meshca.rotation.journal import (
    RootRotationState,
    RotationError,
    SigningCa,
    SlotKind,
    SlotStatus,
)
from meshca.rotation.manager import RotationManager, RotationPolicy
from meshca.rotation.rotator import Rotator
from meshca.spiffe import SpiffeId
from meshca.store import BundleChanged, SecretStore, StoreEvent, SvidChanged
from tests.rotation_harness import TD, CountingSource, init_ca, init_self_signed_ca
from tests.sds_harness import wait_until

WEB = SpiffeId(TD, "/ns/app/sa/web")
DB = SpiffeId(TD, "/ns/app/sa/db")
REPO = Path(__file__).resolve().parent.parent


@dataclass
class FakeClock:
    now: datetime = field(default_factory=lambda: datetime.now(UTC))

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Proxies:
    """What each proxy last ACKed, answering the AckTracker question faithfully."""

    acked: dict[str, list[AckedSecret]] = field(default_factory=dict)

    def unacked(self, predicate: SecretPredicate) -> list[str]:
        return [name for name, secrets in self.acked.items() if not all(map(predicate, secrets))]


def manager_for(
    data_dir: Path,
    *,
    store: SecretStore | None = None,
    acks: Proxies | None = None,
    policy: RotationPolicy | None = None,
    clock: FakeClock | None = None,
) -> RotationManager:
    authority = store.issuer.authority if store is not None else load_local_ca(data_dir).authority()
    manager = RotationManager(
        data_dir,
        authority,  # type: ignore[arg-type]
        CountingSource(data_dir),
        store=store,
        acks=acks,
        policy=policy,
        clock=clock,
    )
    manager.open()
    return manager


def at(manager: RotationManager, fraction: float) -> datetime:
    schedule = manager.schedule()
    return schedule.issued + (schedule.not_after - schedule.issued) * fraction


async def test_prepares_at_half_and_activates_at_five_sixths(tmp_path: Path) -> None:
    data_dir = init_ca(tmp_path / "data", intermediate_ttl=timedelta(hours=6))
    manager = manager_for(data_dir)
    rotator = Rotator(manager)
    first = manager.journal.active
    bundle = manager.journal.bundle
    old_signer = manager.authority.signer

    await rotator.tick(at(manager, 0.49))
    assert manager.journal.prepared is None
    await rotator.tick(at(manager, 0.5))
    prepared = manager.journal.prepared
    assert prepared is not None and prepared.kind is SlotKind.INTERMEDIATE
    assert manager.journal.bundle == bundle  # same root: the bundle does not change
    assert manager.authority.signer == old_signer  # prepared, not signing

    await rotator.tick(at(manager, 0.83))
    assert manager.journal.active.id == first.id
    await rotator.tick(at(manager, 0.84))
    assert manager.journal.active.id == prepared.id
    assert manager.journal.slot(first.id).status is SlotStatus.OLD
    new_signer = manager.ca(prepared.id).signer
    assert manager.authority.signer == new_signer
    assert manager.journal.bundle == bundle and manager.authority.bundle() == bundle

    svid = Issuer(manager.authority).issue(WEB)
    assert svid.chain[1] == new_signer.certificate
    verify_chain(svid.leaf, svid.intermediates, bundle)
    loaded = load_local_ca(data_dir)  # what 'meshca issue' and a restart read
    assert loaded.signer.certificate == new_signer.certificate and loaded.bundle == bundle
    # The next look is no later than the new active CA's own preparation time.
    assert at(manager, 0.1) < await rotator.tick(at(manager, 0.1)) <= at(manager, 0.5)
    manager.close()


async def test_fractions_are_configurable(tmp_path: Path) -> None:
    data_dir = init_ca(tmp_path / "data", intermediate_ttl=timedelta(hours=6))
    policy = RotationPolicy(prepare_fraction=0.25, activate_fraction=0.5)
    manager = manager_for(data_dir, policy=policy)
    rotator = Rotator(manager)
    await rotator.tick(at(manager, 0.24))
    assert manager.journal.prepared is None
    await rotator.tick(at(manager, 0.25))
    prepared = manager.journal.prepared
    assert prepared is not None
    await rotator.tick(at(manager, 0.5))
    assert manager.journal.active.id == prepared.id
    manager.close()
    with pytest.raises(RotationError, match="0 < prepare < activate < 1"):
        RotationPolicy(prepare_fraction=0.9, activate_fraction=0.5)


async def test_short_lived_cas_rotate_under_traffic_and_leaves_never_outlive_them(
    tmp_path: Path,
) -> None:
    """Real timers and lifetimes of seconds: renewals, a CA rotation, and every leaf
    ending no later than the CA that signed it."""
    leaf_ttl = timedelta(seconds=1)
    data_dir = init_ca(tmp_path / "data", intermediate_ttl=6 * leaf_ttl)
    authority = load_local_ca(data_dir).authority()
    issuer = Issuer(authority, TtlPolicy(default=leaf_ttl))
    store = SecretStore(issuer, ttl=leaf_ttl)
    events: list[StoreEvent] = []
    store.subscribe(events.append)
    manager = manager_for(data_dir, store=store, policy=RotationPolicy(leaf_ttl=leaf_ttl))
    rotator = Rotator(manager)
    first = manager.journal.active.id
    bundle = manager.journal.bundle
    store.start()
    rotator.start()
    try:
        for identity in (WEB, DB):
            store.retain(identity)
            await store.svid(identity)

        def rotated_and_renewed() -> bool:
            active = manager.authority.signer.certificate
            renewed = {
                e.spiffe_id
                for e in events
                if isinstance(e, SvidChanged) and e.svid.chain[1] == active
            }
            return manager.journal.active.id != first and renewed == {WEB, DB}

        await wait_until(rotated_and_renewed, timeout=30, what="a CA rotation and renewals")
    finally:
        rotator.stop()
        manager.close()
        store.stop()
    renewals = [e for e in events if isinstance(e, SvidChanged)]
    assert len(renewals) >= 4
    assert not [e for e in events if isinstance(e, BundleChanged)]  # same root throughout
    for event in renewals:
        leaf, signer = event.svid.leaf, event.svid.chain[1]
        assert issued_by(leaf, signer)
        assert leaf.not_valid_after_utc <= signer.not_valid_after_utc
        assert issued_by(signer, bundle.roots[0])
    latest = {e.spiffe_id: e.svid for e in renewals}
    assert {svid.chain[1] for svid in latest.values()} == {
        load_local_ca(data_dir).signer.certificate
    }


async def test_a_new_root_is_published_at_once_and_signs_only_once_acked(
    tmp_path: Path,
) -> None:
    """A self-signed signer is replaced by a new root: it enters the bundle (pushed) when
    prepared, signs once every proxy ACKed it, and the old root leaves the bundle once
    nothing served chains to it."""
    data_dir = init_self_signed_ca(tmp_path / "data", timedelta(hours=6))
    authority = load_local_ca(data_dir).authority()
    store = SecretStore(Issuer(authority, TtlPolicy(default=timedelta(hours=1))))
    events: list[StoreEvent] = []
    store.subscribe(events.append)
    proxies = Proxies()
    clock = FakeClock()
    manager = manager_for(data_dir, store=store, acks=proxies, clock=clock)
    rotator = Rotator(manager)
    old_root = manager.active.root
    old_bundle = manager.journal.bundle
    served = await store.svid(WEB)
    proxies.acked["proxy-a"] = [
        AckedSecret("ROOTCA", bundle=old_bundle),
        AckedSecret("default", chain=served.chain),
    ]

    await rotator.tick(at(manager, 0.5))
    prepared = manager.journal.prepared
    assert prepared is not None and prepared.kind is SlotKind.ROOT
    new_root = manager.ca(prepared.id).root
    assert list(manager.journal.bundle) == [old_root, new_root]
    assert list(store.bundle()) == [old_root, new_root]
    assert [e.bundle for e in events if isinstance(e, BundleChanged)] == [store.bundle()]
    assert list(load_local_ca(data_dir).bundle) == [old_root, new_root]

    await rotator.tick(at(manager, 0.85))  # due, but proxy-a has not ACKed the new root
    assert manager.journal.active.id != prepared.id
    proxies.acked["proxy-a"][0] = AckedSecret("ROOTCA", bundle=store.bundle())
    await rotator.tick(at(manager, 0.85))
    assert manager.journal.active.id == prepared.id
    assert manager.authority.signer.certificate == new_root

    await rotator.tick(at(manager, 0.1))  # the old root still has a served certificate
    assert old_root in manager.journal.bundle
    await store.renew_all()
    renewed = store.cached(WEB)
    assert renewed is not None and renewed.leaf.issuer == new_root.subject
    await rotator.tick(at(manager, 0.1))  # proxy-a still presents the old certificate
    assert old_root in manager.journal.bundle
    proxies.acked["proxy-a"][1] = AckedSecret("default", chain=renewed.chain)
    await rotator.tick(at(manager, 0.1))
    assert list(manager.journal.bundle) == [new_root]
    assert list(store.bundle()) == [new_root]
    assert list(load_local_ca(data_dir).bundle) == [new_root]
    manager.close()


async def test_an_unacked_new_root_is_activated_before_the_old_ca_cuts_leaves_short(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = init_self_signed_ca(tmp_path / "data", timedelta(hours=6))
    proxies = Proxies({"stuck-proxy": [AckedSecret("ROOTCA", bundle=None)]})
    manager = manager_for(data_dir, acks=proxies)
    rotator = Rotator(manager)
    await rotator.tick(at(manager, 0.5))
    prepared = manager.journal.prepared
    assert prepared is not None
    proxies.acked["stuck-proxy"] = [
        AckedSecret("ROOTCA", bundle=TrustBundle.of(TD, [manager.active.root]))
    ]
    await rotator.tick(at(manager, 0.9))
    assert manager.journal.active.id != prepared.id
    with caplog.at_level(logging.WARNING, logger="meshca.rotation"):
        await rotator.tick(manager.schedule().force_at)
    assert manager.journal.active.id == prepared.id
    assert "stuck-proxy" in caplog.text
    manager.close()


async def test_root_key_offline_refuses_clearly_and_changes_nothing(tmp_path: Path) -> None:
    data_dir = init_ca(tmp_path / "data", intermediate_ttl=timedelta(hours=6))
    (ca_directory(data_dir) / ROOT_KEY).unlink()
    manager = manager_for(data_dir)
    rotator = Rotator(manager)
    before = manager.journal
    files = {p.name: p.read_bytes() for p in ca_directory(data_dir).iterdir()}
    await rotator.tick(at(manager, 0.6))
    assert manager.journal == before
    assert rotator.problem is not None and "root key is offline" in rotator.problem
    with pytest.raises(RotationError, match="root key is offline"):
        await manager.rotate_now()
    assert manager.journal == before
    assert {p.name: p.read_bytes() for p in ca_directory(data_dir).iterdir()} == files
    warnings = startup_checks(manager, timedelta(hours=1))
    assert any("no successor can be prepared" in w for w in warnings)
    manager.close()
    result = run_cli("ca", "rotate", data_dir=data_dir)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "root key is offline" in result.stderr


def test_publishing_the_current_ca_again_changes_nothing(tmp_path: Path) -> None:
    """ca/ is rebuilt in the layout 'meshca init' writes: publishing what is already there
    leaves every file in place, meta.json byte for byte."""
    data_dir = init_ca(tmp_path / "data")
    ca = load_local_ca(data_dir)
    directory = ca_directory(data_dir)
    before = {p.name: (p.read_bytes(), p.stat().st_ino) for p in directory.iterdir()}
    assert set(before) == {
        "root-cert.pem",
        "root-key.pem",
        "ca-cert.pem",
        "ca-key.pem",
        "cert-chain.pem",
        "meta.json",
    }
    CountingSource(data_dir).publish(SigningCa(ca.signer, ca.bundle.roots[0]), ca.bundle)
    assert {p.name: (p.read_bytes(), p.stat().st_ino) for p in directory.iterdir()} == before


def test_start_up_checks(tmp_path: Path) -> None:
    data_dir = init_ca(tmp_path / "data", intermediate_ttl=timedelta(hours=6))
    signer, bundle = load_local_ca(data_dir).signer, load_local_ca(data_dir).bundle
    check_signing_ca(signer.certificate, timedelta(hours=1))
    with pytest.raises(TtlError, match=r"at least 6 x the leaf TTL"):
        check_signing_ca(signer.certificate, timedelta(hours=2))
    with pytest.raises(TtlError, match="configured for new signing CAs"):
        check_new_ca_ttl(timedelta(hours=2), timedelta(minutes=30))
    assert expiry_warnings(signer, bundle, timedelta(hours=1), replacement_problem=None) == []
    late = signer.not_after - timedelta(minutes=30)
    warnings = expiry_warnings(
        signer, bundle, timedelta(hours=1), replacement_problem=None, now=late
    )
    assert len(warnings) == 1 and "cut short" in warnings[0]
    root_end = bundle.roots[0].not_valid_after_utc - timedelta(days=3)
    warnings = expiry_warnings(
        signer, bundle, timedelta(hours=1), replacement_problem=None, now=root_end
    )
    assert any("rotate-root" in w for w in warnings)


def run_cli(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshca", "--data-dir", str(data_dir), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def test_ca_commands_on_the_data_directory(tmp_path: Path) -> None:
    data_dir = init_ca(tmp_path / "data")
    status = run_cli("ca", "status", "--json", data_dir=data_dir)
    assert status.returncode == 0, status.stderr
    before = json.loads(status.stdout)
    assert [s["status"] for s in before["slots"]] == ["active"]
    assert before["root_rotation"] is None and before["waiting_on"] == []

    rotated = run_cli("ca", "rotate", data_dir=data_dir)
    assert rotated.returncode == 0, rotated.stderr
    assert "ca-0002 now signs" in rotated.stdout
    signer = load_local_ca(data_dir).signer
    out = tmp_path / "out"
    issued = run_cli("issue", str(WEB), "--out", str(out), data_dir=data_dir)
    assert issued.returncode == 0, issued.stderr
    chain = x509.load_pem_x509_certificates((out / "cert.pem").read_bytes())
    assert chain[1] == signer.certificate

    text = run_cli("ca", "status", data_dir=data_dir)
    assert "ca-0002  active" in text.stdout and "ca-0001  old" in text.stdout


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("ca", "rotate-root", "--step", "7"), 2, "invalid choice"),
        (("ca", "rotate-root", "--step", "2", "--rollback"), 2, "not allowed with"),
        (("ca", "rotate-root", "--timeout", "soon"), 2, "--timeout"),
        (("ca", "rotate-root", "--step", "3"), 1, "needs step 1 first"),
        (("ca", "rotate-root", "--rollback"), 1, "no root rotation is in progress"),
        (("ca",), 2, "required"),
    ],
)
def test_ca_command_refusals_are_one_line(
    tmp_path: Path, args: tuple[str, ...], code: int, message: str
) -> None:
    data_dir = init_ca(tmp_path / "data")
    result = run_cli(*args, data_dir=data_dir)
    assert result.returncode == code
    assert message in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_ca_status_without_a_ca_is_one_line(tmp_path: Path) -> None:
    result = run_cli("ca", "status", data_dir=tmp_path / "empty")
    assert result.returncode == 1
    assert "no CA in" in result.stderr and result.stderr.count("\n") == 1


async def test_concurrent_operators_are_serialised(tmp_path: Path) -> None:
    data_dir = init_ca(tmp_path / "data")
    manager = manager_for(data_dir)
    results = await asyncio.gather(manager.rotate_now(), manager.rotate_now())
    assert {r.id for r in results} == {"ca-0002", "ca-0003"}
    assert manager.journal.active.id == "ca-0003"
    assert manager.source.created == 2  # type: ignore[attr-defined]
    manager.close()


async def test_root_rotation_stage_is_written_only_when_it_changes(tmp_path: Path) -> None:
    data_dir = init_ca(tmp_path / "data")
    manager = manager_for(data_dir)
    journals = manager.journals
    sequence = manager.journal.sequence
    await manager.set_root_rotation(None)  # no rotation, none recorded: nothing to write
    assert manager.journal.sequence == sequence

    state = RootRotationState(new_slot=None, old_slot=manager.journal.active.id, running=1)
    await manager.set_root_rotation(state)
    recorded = manager.journal.root_rotation
    assert recorded is not None and recorded.running == 1
    assert manager.journal.sequence == sequence + 1
    await manager.set_root_rotation(replace(recorded, updated=datetime.now(UTC)))
    assert manager.journal.sequence == sequence + 1  # the same stage: not rewritten

    await manager.set_root_rotation(replace(recorded, done=1, running=None))
    saved = journals.load()
    assert saved is not None and saved.root_rotation is not None
    assert saved.root_rotation.done == 1 and saved.root_rotation.running is None
    await manager.set_root_rotation(None)
    saved = journals.load()
    assert saved is not None and saved.root_rotation is None
    assert saved.sequence == sequence + 3
    manager.close()
