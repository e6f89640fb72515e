"""Vault's intermediate under the signing-CA rotation machinery, the server's poll of
Vault's roots, and renewal of short-lived Vault-signed SVIDs, against a real OpenBao.

The schedule is driven with explicit moments (``rotator.tick(now)``), so what is tested
is what happens at 1/2 and 5/6 of the intermediate's life, not how long a test waits;
Vault, the journal, the store and the certificates are real.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from cryptography import x509

from meshca.backends.vault.backend import (
    VaultAuthority,
    VaultIntermediateAuthority,
    open_vault_authority,
)
from meshca.backends.vault.settings import VaultSettings
from meshca.issuer import Issuer, TrustBundle, TtlPolicy
from meshca.rotation.admin import admin_request
from meshca.rotation.journal import JournalStore, RotationError, SlotKind, SlotStatus
from meshca.rotation.manager import RotationManager, RotationPolicy
from meshca.rotation.operator import ADMIN_SOCKET
from meshca.rotation.rotator import Rotator
from meshca.rotation.vault_ca import VaultCaSource
from meshca.serve.config import ServeConfig
from meshca.spiffe import SpiffeId, TrustDomain
from meshca.store import BundleChanged, SecretStore, StoreEvent, SvidChanged
from meshca.util.retry import Backoff
from tests.bao_harness import BaoServer, bao, mount, workload_role
from tests.serve_harness import short_tempdir
from tests.svid_checks import assert_independently_valid

pytestmark = pytest.mark.vault

if TYPE_CHECKING:
    from meshca.serve.server import MeshcaServer

__all__ = ["bao", "mount"]  # the OpenBao fixtures

TD = TrustDomain("cluster.local")
WEB = SpiffeId.from_kubernetes("default", "web", TD)
LEAF_TTL = timedelta(minutes=1)
SKEW = timedelta(minutes=1)
FAST = Backoff(initial=0.1, maximum=0.5)
SERVE_LIMIT = 60.0  # a served test, start to stop; far above its usual 3-25 s


def settings(server: BaoServer, mount: str, **overrides: object) -> VaultSettings:
    values: dict[str, object] = {
        "addr": server.url,
        "token": server.root_token,
        "timeout": 2,
        "mount": mount,
        "intermediate_ttl": "10m",
    }
    values.update(overrides)
    return VaultSettings.from_mapping(values)


class Acks:
    """The proxies' ACK state, as the SDS layer would report it."""

    def __init__(self) -> None:
        self.waiting: list[str] = []

    def unacked(self, predicate: Callable[[Any], bool]) -> list[str]:
        return list(self.waiting)


def intermediate_authority(
    server: BaoServer, mount: str, data_dir: Path, **overrides: object
) -> VaultIntermediateAuthority:
    authority = open_vault_authority(
        settings(server, mount, **overrides),
        TD,
        state_dir=data_dir / "vault",
        backoff=FAST,
        start=False,
    )
    assert isinstance(authority, VaultIntermediateAuthority)
    return authority


def open_manager(
    data_dir: Path,
    authority: VaultIntermediateAuthority,
    store: SecretStore,
    acks: Acks | None = None,
) -> RotationManager:
    manager = RotationManager(
        data_dir,
        authority.active_signer,
        VaultCaSource(authority),
        store=store,
        acks=acks,
        policy=RotationPolicy(leaf_ttl=LEAF_TTL),
    )
    manager.open()
    manager.follow_roots_now(authority.roots())
    return manager


def store_for(authority: VaultIntermediateAuthority) -> SecretStore:
    return SecretStore(Issuer(authority, TtlPolicy(default=LEAF_TTL)), ttl=LEAF_TTL)


def root_of_issuer(server: BaoServer, mount: str, root: x509.Certificate) -> str:
    client = server.client()
    for issuer_id in client.list(f"{mount}/issuers")["data"]["keys"]:
        pem = client.read(f"{mount}/issuer/{issuer_id}/json")["data"]["certificate"]
        if x509.load_pem_x509_certificate(pem.encode()) == root:
            return str(issuer_id)
    raise LookupError("no issuer holds that root")


# the schedule ------------------------------------------------------------------------------
async def test_next_intermediate_is_prepared_at_half_life_and_signs_from_five_sixths(
    bao: BaoServer, mount: str, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    authority = intermediate_authority(bao, mount, data_dir)
    store = store_for(authority)
    manager = open_manager(data_dir, authority, store)
    rotator = Rotator(manager)
    try:
        first = authority.signer
        issued = first.certificate.not_valid_before_utc + SKEW  # Vault backdates by the skew
        schedule = manager.schedule()
        assert schedule.prepare_at == issued + timedelta(minutes=5)
        assert schedule.activate_at == issued + timedelta(minutes=10) * 5 / 6
        before = await store.svid(WEB)

        await rotator.tick(schedule.prepare_at - timedelta(seconds=1))
        assert manager.journal.prepared is None  # not yet
        await rotator.tick(schedule.prepare_at)
        prepared = manager.journal.prepared
        assert prepared is not None and prepared.kind is SlotKind.INTERMEDIATE
        on_disk = JournalStore(data_dir).load()
        assert on_disk is not None and on_disk.prepared == prepared  # journaled
        assert authority.signer is first  # prepared, not signing yet
        await rotator.tick(schedule.prepare_at + timedelta(seconds=1))
        assert manager.journal.next_slot == 3  # no second CA is made while one is prepared

        await rotator.tick(schedule.activate_at)
        assert manager.journal.active.id == prepared.id
        second = authority.signer
        assert second.certificate != first.certificate
        after = await store.renew(WEB)
        assert after.intermediates == (second.certificate,)
        assert_independently_valid(after, store.bundle(), tmp_path / "after")
        assert_independently_valid(before, store.bundle(), tmp_path / "before")  # same root
    finally:
        manager.close()
        authority.close()

    # a restart reloads the active intermediate from <data-dir>/vault and the journal agrees
    reopened = intermediate_authority(bao, mount, data_dir)
    manager = open_manager(data_dir, reopened, store_for(reopened))
    try:
        assert reopened.signer.certificate == second.certificate
        assert manager.journal.active.id == prepared.id
        assert not (data_dir / "backup").exists()  # the journal was not replaced
    finally:
        manager.close()
        reopened.close()


async def test_a_new_vault_root_joins_the_bundle_and_its_intermediate_waits_for_acks(
    bao: BaoServer, mount: str, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    authority = intermediate_authority(bao, mount, data_dir)
    store = store_for(authority)
    events: list[StoreEvent] = []
    store.subscribe(events.append)
    acks = Acks()
    manager = open_manager(data_dir, authority, store, acks)
    rotator = Rotator(manager)
    try:
        [old_root] = store.bundle()
        old_issuer = root_of_issuer(bao, mount, old_root)
        await store.svid(WEB)
        answer = bao.client().write_data(
            f"{mount}/root/rotate/internal",
            data={"common_name": "second root", "key_type": "ec", "ttl": "87600h"},
        )
        new_root = x509.load_pem_x509_certificate(answer["data"]["certificate"].encode())

        # what the server's poll does: the new root is trusted (and pushed) at once
        assert await manager.follow_roots(await asyncio.to_thread(authority.roots))
        assert list(store.bundle()) == [old_root, new_root]
        assert [e.bundle for e in events if isinstance(e, BundleChanged)] == [store.bundle()]
        assert not await manager.follow_roots(authority.roots())  # nothing new

        # once Vault signs under the new root, the next intermediate is a new-root slot
        bao.client().write_data(
            f"{mount}/root/replace", data={"default": answer["data"]["issuer_id"]}
        )
        schedule = manager.schedule()
        await rotator.tick(schedule.prepare_at)
        prepared = manager.journal.prepared
        assert prepared is not None and prepared.kind is SlotKind.ROOT
        assert manager.ca(prepared.id).root == new_root

        acks.waiting = ["sidecar-a (uid 1000)"]  # a proxy has not ACKed the new root yet
        await rotator.tick(schedule.activate_at)
        assert manager.journal.prepared == prepared  # so nothing signs under it
        acks.waiting = []
        await rotator.tick(schedule.activate_at)
        assert manager.journal.active.id == prepared.id
        svid = await store.renew(WEB)
        assert_independently_valid(svid, TrustBundle.of(TD, [new_root]), tmp_path / "new")

        # nothing served chains to the old root: its slot goes, the root stays while
        # Vault holds it, and leaves once its issuer is deleted there
        await rotator.tick(datetime.now(UTC))  # early in the new intermediate's life
        assert [r.status for r in manager.journal.slots] == [SlotStatus.ACTIVE]
        assert old_root in store.bundle()
        bao.client().adapter.delete(f"/v1/{mount}/issuer/{old_issuer}")
        assert await manager.follow_roots(authority.roots())
        assert list(store.bundle()) == [new_root]
        assert list(authority.bundle()) == [new_root]
    finally:
        manager.close()
        authority.close()


async def test_an_outage_when_the_next_intermediate_is_due_is_retried_and_logged_once(
    bao: BaoServer, mount: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "data"
    authority = intermediate_authority(bao, mount, data_dir, timeout=1)
    manager = open_manager(data_dir, authority, store_for(authority))
    rotator = Rotator(manager)
    schedule = manager.schedule()
    try:
        bao.pause()
        try:
            with caplog.at_level(logging.ERROR, logger="meshca.rotation"):
                for _ in range(3):
                    await rotator.tick(schedule.prepare_at)
            assert manager.journal.prepared is None
            assert manager.journal.pending is None  # no intent left for a restart to finish
            assert "cannot obtain the next intermediate" in (rotator.problem or "")
            errors = [r for r in caplog.records if r.name == "meshca.rotation"]
            assert len(errors) == 1, [r.getMessage() for r in errors]
        finally:
            bao.resume()
        async with asyncio.timeout(30):
            while manager.journal.prepared is None:  # the backend lets a call through again
                await rotator.tick(schedule.prepare_at)
                await asyncio.sleep(0.2)
        assert rotator.problem is None
    finally:
        manager.close()
        authority.close()


# the server: rotation, roots poll and health, one path for every backend --------------------
@contextlib.asynccontextmanager
async def serving(config: ServeConfig, authority: VaultAuthority) -> AsyncIterator[MeshcaServer]:
    """``served``, bounded: a step that never ends (also in the server's shutdown, where a
    swallowed cancellation would otherwise let it pass unnoticed) fails the test at once."""
    from tests.serve_harness import served

    async with asyncio.timeout(SERVE_LIMIT) as deadline:
        async with served(config, backend=authority.opened()) as meshca:
            yield meshca
    assert not deadline.expired(), f"the server did not stop within {SERVE_LIMIT:g}s"


async def test_serve_rotates_the_vault_intermediate_and_follows_vault_roots(
    bao: BaoServer, mount: str
) -> None:
    with short_tempdir("mca-vrot-") as root:
        authority = open_vault_authority(
            settings(bao, mount), TD, state_dir=root / "data" / "vault", leaf_ttl=LEAF_TTL
        )
        config = ServeConfig(
            data_dir=root / "data",
            uds=root / "sds.sock",
            uds_identities={os.getuid(): (WEB,)},
            leaf_ttl=LEAF_TTL,
            grace=0.0,
            backend_poll_interval=0.2,
        )
        try:
            async with serving(config, authority) as meshca:
                assert meshca.rotation is not None and meshca.bundle_poll is not None
                assert isinstance(meshca.rotation.manager.source, VaultCaSource)
                health = await _backend_health(config.uds)  # type: ignore[arg-type]
                assert health == "SERVING"
                first = authority.signer
                svid = await meshca.store.svid(WEB)

                # a new root comes from Vault: 'rotate-root' is refused and changes nothing
                journal = config.data_dir / "rotation" / "journal.json"
                before = journal.read_bytes()
                with pytest.raises(RotationError, match="comes from Vault"):
                    await asyncio.to_thread(
                        admin_request,
                        config.data_dir / ADMIN_SOCKET,
                        {"op": "rotate-root", "step": 1},
                        timeout=30,
                    )
                assert journal.read_bytes() == before
                status = await asyncio.to_thread(
                    admin_request, config.data_dir / ADMIN_SOCKET, {"op": "status"}, timeout=30
                )
                assert status["root_rotation"] is None

                # 'meshca ca rotate' through the admin socket: Vault signs the successor
                result = await asyncio.to_thread(
                    admin_request, config.data_dir / ADMIN_SOCKET, {"op": "rotate"}, timeout=30
                )
                assert "Vault" in result["status"]["renewal"]
                assert authority.signer.certificate != first.certificate
                renewed = meshca.store.cached(WEB)
                assert renewed is not None and renewed.serial != svid.serial
                assert renewed.intermediates == (authority.signer.certificate,)

                # a root added inside Vault reaches the served bundle by the server's poll
                answer = bao.client().write_data(
                    f"{mount}/root/rotate/internal",
                    data={"common_name": "polled root", "key_type": "ec", "ttl": "87600h"},
                )
                new_root = x509.load_pem_x509_certificate(answer["data"]["certificate"].encode())
                async with asyncio.timeout(20):
                    while new_root not in meshca.store.bundle():
                        await asyncio.sleep(0.05)
                assert new_root in meshca.rotation.manager.journal.bundle
        finally:
            authority.close()


async def test_a_short_lived_vault_intermediate_is_replaced_on_the_wall_clock(
    bao: BaoServer, mount: str
) -> None:
    """The real timers: a 15 s intermediate with 2 s leaves (the 6 x minimum) is replaced
    at 5/6 of its life by a Vault-signed successor, and served SVIDs move under it."""
    leaf_ttl = timedelta(seconds=2)
    with short_tempdir("mca-vclk-") as root:
        authority = open_vault_authority(
            settings(bao, mount, intermediate_ttl="15s"),
            TD,
            state_dir=root / "data" / "vault",
            leaf_ttl=leaf_ttl,
        )
        assert isinstance(authority, VaultIntermediateAuthority)
        config = ServeConfig(
            data_dir=root / "data",
            uds=root / "sds.sock",
            uds_identities={os.getuid(): (WEB,)},
            leaf_ttl=leaf_ttl,
            grace=0.0,
        )
        try:
            async with serving(config, authority) as meshca:
                first = authority.signer.certificate
                await meshca.store.svid(WEB)
                async with asyncio.timeout(30):
                    while authority.signer.certificate == first:
                        await asyncio.sleep(0.1)
                second = authority.signer.certificate
                assert second.not_valid_after_utc > first.not_valid_after_utc
                async with asyncio.timeout(10):  # the next renewal is signed by it
                    while (svid := meshca.store.cached(WEB)) is None or svid.intermediates != (
                        second,
                    ):
                        await asyncio.sleep(0.1)
                assert svid.not_after <= second.not_valid_after_utc
        finally:
            authority.close()


async def _backend_health(socket_path: Path) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(f"unix:{socket_path}") as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="meshca.backend"), timeout=10
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))


# per-workload SVIDs: renewal follows the issue time, whatever Vault backdates ---------------
async def test_short_vault_signed_svids_renew_at_half_life_not_at_expiry(
    bao: BaoServer, mount: str
) -> None:
    ttl = timedelta(seconds=20)
    # a role that backdates by 5 minutes: a schedule assuming meshca's 1-minute skew would
    # take this SVID's life to start 4 minutes early and renew it over and over
    role = workload_role(TD.name) | {"not_before_duration": "5m"}
    bao.client().write_data(f"{mount}/roles/backdated", data=role)
    authority = open_vault_authority(
        settings(bao, mount, mode="per-workload", role="backdated"), TD, start=False
    )
    store = SecretStore(Issuer(authority, TtlPolicy(default=ttl)), ttl=ttl)
    renewed: list[SvidChanged] = []
    arrived = asyncio.Event()

    def listener(event: StoreEvent) -> None:
        if isinstance(event, SvidChanged):
            renewed.append(event)
            arrived.set()

    store.subscribe(listener)
    store.start()
    try:
        first = await store.svid(WEB)
        schedule = store.renewal(WEB)
        assert schedule is not None
        issued, renew_at = schedule
        assert first.not_before <= issued - timedelta(minutes=4)
        # The life renewal divides is the certificate's own, from the request to NotAfter:
        # Vault truncates NotAfter to whole seconds and signs after the request was made, so
        # it can be up to a second short of the requested ttl (never more).
        life = first.not_after - issued
        assert ttl - timedelta(seconds=1) <= life
        assert life * 0.45 <= renew_at - issued <= life * 0.55
        await asyncio.wait_for(arrived.wait(), 30)
        second = renewed[0].svid
        # renewed about half-way: the new one ends about 10 s after the first
        assert timedelta(seconds=5) <= second.not_after - first.not_after <= timedelta(seconds=15)
        assert store.renewals == 1
    finally:
        store.stop()
        authority.close()
