"""The JWT-SVID signing key rotates through the rotation journal: a prepared key is
published in the JWKS before it signs, a token signed before the rotation keeps
validating (py-spiffe, through the agent) until its key is retired, a crash or restart
at any step resumes from the journal, and ``meshca ca`` shows and drives the slots."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from spiffe import JwtSource, WorkloadApiClient
from spiffe.errors import PySpiffeError
from spiffe.spiffe_id.spiffe_id import TrustDomain as PyTrustDomain

from meshca.backends.jwt_key import (
    PublishedJwtAuthorities,
    jwks_path,
    jwt_key_path,
    load_jwt_signer,
    load_or_create_jwt_signer,
)
from meshca.backends.local import load_local_ca
from meshca.cli.main import main
from meshca.issuer.jwt_svid import JwtError, parse_jwt_bundle, validate_jwt_svid
from meshca.rotation import jwt_keys
from meshca.rotation.journal import JournalStore, RotationError, SlotStatus
from meshca.rotation.jwt_keys import JWT_RETIRE_DELAY
from meshca.rotation.manager import RotationManager, RotationPolicy
from meshca.rotation.rotator import Rotator
from meshca.spiffe import SpiffeId
from tests.ca_api_harness import agent_for, ca_api
from tests.rotation_harness import TD, CountingSource, SimulatedCrash, init_ca
from tests.serve_harness import kube_id, short_tempdir

WEB = SpiffeId(TD, "/ns/app/sa/web")
WORKLOAD = kube_id("shop", "web")
WORKLOAD_TD = PyTrustDomain(WORKLOAD.trust_domain.name)


@dataclass
class FakeClock:
    now: datetime = field(default_factory=lambda: datetime.now(UTC))

    def __call__(self) -> datetime:
        return self.now


def opened(data_dir: Path, clock: FakeClock | None = None, **policy: object) -> RotationManager:
    ca = load_local_ca(data_dir)
    manager = RotationManager(
        data_dir,
        ca.authority(),
        CountingSource(data_dir),
        policy=RotationPolicy(**policy),  # type: ignore[arg-type]
        clock=clock,
    )
    manager.open()
    return manager


def published_kids(data_dir: Path) -> set[str]:
    return set(parse_jwt_bundle(jwks_path(data_dir).read_bytes()))


def _file_kid(data_dir: Path) -> str:
    signer = load_jwt_signer(data_dir)
    assert signer is not None
    return signer.kid


def validates(manager: RotationManager, token: str) -> bool:
    keys = parse_jwt_bundle(manager.jwt.authorities.bundle_json())
    try:
        validate_jwt_svid(token, "orders", keys, TD)
    except JwtError:
        return False
    return True


def test_a_prepared_key_is_published_before_it_signs(tmp_path: Path) -> None:
    data_dir = init_ca(tmp_path / "data")
    manager = opened(data_dir)
    try:
        with pytest.raises(RotationError, match="no prepared JWT key"):
            manager.jwt.activate()
        first = manager.jwt.active
        signer = manager.jwt.authorities.signer
        assert signer is not None and signer.kid == first.kid
        assert published_kids(data_dir) == {first.kid}
        prepared = manager.jwt.prepare()
        assert published_kids(data_dir) == {first.kid, prepared.kid}
        assert set(manager.jwt.authorities.kids) == {first.kid, prepared.kid}
        assert manager.jwt.authorities.signer is signer  # not signing yet
        assert manager.jwt.prepare() == prepared  # one prepared key at a time
        assert (
            manager.jwt.prepared is not None and manager.jwt.prepared.status is SlotStatus.PREPARED
        )
    finally:
        manager.close()


def test_a_token_signed_before_activation_validates_until_its_key_retires(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    data_dir = init_ca(tmp_path / "data")
    manager = opened(data_dir, clock)
    try:
        old_signer = manager.jwt.authorities.signer
        assert old_signer is not None
        token, _ = old_signer.sign(WEB, ["orders"], timedelta(hours=24), now=clock.now)
        prepared = manager.jwt.prepare()
        manager.jwt.activate()
        new_signer = manager.jwt.authorities.signer
        assert new_signer is not None and new_signer.kid == prepared.kid
        assert _file_kid(data_dir) == new_signer.kid  # jwt/jwt-key.pem follows
        assert validates(manager, token)
        # Too early: a token the old key signed may still be valid.
        with pytest.raises(RotationError, match="stays published until"):
            manager.jwt.retire()
        assert validates(manager, token)
        clock.now += JWT_RETIRE_DELAY
        assert manager.jwt.retire() == ["jwt-0001"]
        assert published_kids(data_dir) == {prepared.kid}
        assert not validates(manager, token)
        assert not JournalStore(data_dir).jwt_key_path("jwt-0001").exists()
    finally:
        manager.close()


def test_an_existing_key_is_adopted_so_its_tokens_keep_validating(tmp_path: Path) -> None:
    data_dir = init_ca(tmp_path / "data")
    # A key made by a server from before JWT keys had slots.
    before = load_or_create_jwt_signer(data_dir)
    manager = opened(data_dir)
    try:
        assert manager.jwt.active.kid == before.kid
        assert manager.jwt.authorities.kids == [before.kid]
    finally:
        manager.close()


def test_a_server_without_the_journal_follows_the_published_keys(tmp_path: Path) -> None:
    """A replica beside the one that rotates (it cannot take the journal) signs with the
    key the other one activated, and publishes what it publishes."""
    data_dir = init_ca(tmp_path / "data")
    manager = opened(data_dir)
    try:
        replica = PublishedJwtAuthorities(data_dir)
        first = manager.jwt.active
        assert replica.current() is not None and replica.current().kid == first.kid  # type: ignore[union-attr]
        prepared = manager.jwt.prepare()
        assert set(parse_jwt_bundle(replica.bundle_json())) == {first.kid, prepared.kid}
        manager.jwt.activate()
        signer = replica.current()
        assert signer is not None and signer.kid == prepared.kid
    finally:
        manager.close()


def test_the_schedule_prepares_activates_and_retires(tmp_path: Path) -> None:
    clock = FakeClock()
    data_dir = init_ca(tmp_path / "data")
    manager = opened(data_dir, clock, jwt_key_ttl=timedelta(hours=6))
    rotator = Rotator(manager)
    try:
        first = manager.jwt.active
        start = first.activated
        assert start is not None

        async def tick(at: datetime) -> None:
            clock.now = at
            await rotator.tick(at)

        asyncio.run(tick(start + timedelta(hours=2)))
        assert manager.jwt.prepared is None
        asyncio.run(tick(start + timedelta(hours=3)))  # 1/2 of 6h
        prepared = manager.jwt.prepared
        assert prepared is not None and prepared.kid in published_kids(data_dir)
        asyncio.run(tick(start + timedelta(hours=5)))  # 5/6 of 6h
        assert manager.jwt.active.id == prepared.id
        assert [r.id for r in manager.jwt.old] == [first.id]
        asyncio.run(tick(start + timedelta(hours=5) + JWT_RETIRE_DELAY - timedelta(seconds=1)))
        assert first.kid in published_kids(data_dir)
        asyncio.run(tick(start + timedelta(hours=5) + JWT_RETIRE_DELAY))
        assert first.kid not in published_kids(data_dir)
    finally:
        manager.close()


def test_a_restart_mid_rotation_resumes_from_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = init_ca(tmp_path / "data")
    manager = opened(data_dir)
    first = manager.jwt.active
    prepared = manager.jwt.prepare()
    manager.close()
    # A key file written just before a crash, never recorded: not published, removed.
    JournalStore(data_dir).write_jwt_key("jwt-0009", jwt_key_path(data_dir).read_bytes())

    manager = opened(data_dir)
    try:
        assert manager.jwt.prepared == prepared
        assert manager.jwt.active == first
        assert published_kids(data_dir) == {first.kid, prepared.kid}
        assert not JournalStore(data_dir).jwt_key_path("jwt-0009").exists()

        # A crash after the journal recorded the activation, before the files followed.
        def crash(*args: object) -> None:
            raise SimulatedCrash("crashed while publishing")

        monkeypatch.setattr(jwt_keys, "publish_jwt_keys", crash)
        with pytest.raises(SimulatedCrash):
            manager.jwt.activate()
        monkeypatch.undo()
    finally:
        manager.close()
    assert _file_kid(data_dir) == first.kid
    manager = opened(data_dir)
    try:
        assert manager.jwt.active.id == prepared.id
        assert _file_kid(data_dir) == prepared.kid  # repaired on open
        assert published_kids(data_dir) == {first.kid, prepared.kid}
    finally:
        manager.close()


def test_meshca_ca_shows_and_drives_the_jwt_key_slots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = init_ca(tmp_path / "data")
    args = ["--data-dir", str(data_dir)]
    assert main(["ca", "jwt-key", "prepare", *args]) == 0
    assert "jwt-0002" in capsys.readouterr().out
    assert main(["ca", "jwt-key", "activate", *args]) == 0
    capsys.readouterr()
    assert main(["ca", "jwt-key", "retire", *args]) == 1
    assert "stays published until" in capsys.readouterr().err
    assert main(["ca", "status", "--json", *args]) == 0
    keys = json.loads(capsys.readouterr().out)["jwt_keys"]["keys"]
    assert [(k["id"], k["status"]) for k in keys] == [("jwt-0001", "old"), ("jwt-0002", "active")]
    assert main(["ca", "status", *args]) == 0
    text = capsys.readouterr().out
    assert "jwt-0001  old" in text and "jwt-0002  active" in text
    assert main(["bundle", "--format", "jwks", *args]) == 0
    jwks = json.loads(capsys.readouterr().out)
    assert {k["kid"] for k in jwks["keys"] if k["use"] == "jwt-svid"} == {k["kid"] for k in keys}
    # A leaked key can be removed at once.
    assert main(["ca", "jwt-key", "retire", "--force", *args]) == 0
    assert "jwt-0001" in capsys.readouterr().out
    assert len(published_kids(data_dir)) == 1


async def test_py_spiffe_validates_an_old_token_after_activation_not_after_retirement() -> None:
    with short_tempdir() as root:
        async with ca_api(root) as api, agent_for(api, root, WORKLOAD) as agent:
            assert api.server.rotation is not None
            operations = api.server.rotation.operations
            manager = api.server.rotation.manager
            endpoint = f"unix://{agent.config.socket}"
            source = await asyncio.to_thread(JwtSource, socket_path=endpoint, timeout_in_seconds=10)
            try:
                before = await asyncio.to_thread(source.fetch_svid, {"orders"})
                old_kid = manager.jwt.active.kid
                prepared = (await operations.jwt_key("prepare"))["kid"]
                await agent.poll_once()
                # The streamed JWT bundle gains the prepared key before it signs.
                await _until(lambda: _kids(source) == {old_kid, prepared})
                await agent.poll_once()  # its report that it holds the key: the ACK
                await operations.jwt_key("activate")
                await agent.poll_once()
                with WorkloadApiClient(endpoint) as client:
                    checked = await asyncio.to_thread(
                        client.validate_jwt_svid, before.token, "orders"
                    )
                    assert str(checked.spiffe_id) == str(WORKLOAD)
                    other = await asyncio.to_thread(client.fetch_jwt_svid, {"payments"})
                    assert _kid(other.token) == prepared
                    # Retired once its longest token would have expired.
                    async with manager.lock:
                        manager.jwt.retire(now=datetime.now(UTC) + JWT_RETIRE_DELAY)
                    await agent.poll_once()
                    await _until(lambda: _kids(source) == {prepared})
                    with pytest.raises(PySpiffeError):
                        await asyncio.to_thread(client.validate_jwt_svid, before.token, "orders")
            finally:
                await asyncio.to_thread(source.close)


def _kids(source: JwtSource) -> set[str]:
    bundle = source.get_bundle_for_trust_domain(WORKLOAD_TD)
    return set(bundle.jwt_authorities) if bundle is not None else set()


def _kid(token: str) -> str:
    head = token.split(".")[0]
    return str(json.loads(base64.urlsafe_b64decode(head + "=="))["kid"])


async def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)
