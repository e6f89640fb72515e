"""The secret store: issue on first use, scheduled renewal with notifications, idle sweep,
renewal from the issue time, retries with backoff, and no expired SVID ever served."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import pytest

from meshca.backends.errors import BackendUnavailable
from meshca.issuer import ActiveSigner, Issuer, LeafRequest, TrustBundle, TtlPolicy
from meshca.issuer.authority import SigningAuthority
from meshca.serve.health import life_left
from meshca.spiffe import SpiffeId, TrustDomain
from meshca.store import BundleChanged, SecretStore, StoreEvent, SvidChanged, SvidExpiredError
from meshca.util.retry import Backoff
from tests.ca_factory import TRUST_DOMAIN, InMemoryCa, make_ca

WEB = SpiffeId.from_kubernetes("default", "web", TRUST_DOMAIN)
DB = SpiffeId.from_kubernetes("default", "db", TRUST_DOMAIN)
SHORT_TTL = timedelta(seconds=4)
WAIT = 15.0  # an upper bound for a scheduled event to arrive, not an expectation


class CountingAuthority:
    """A real authority that counts what it signs."""

    requires_csr = False

    def __init__(self, inner: SigningAuthority) -> None:
        self.inner = inner
        self.signed = 0

    @property
    def trust_domain(self) -> TrustDomain:
        return self.inner.trust_domain

    def sign(self, request: LeafRequest) -> tuple[object, ...]:
        self.signed += 1
        return self.inner.sign(request)

    def bundle(self) -> TrustBundle:
        return self.inner.bundle()


@pytest.fixture(scope="module")
def ca() -> InMemoryCa:
    return make_ca()


@pytest.fixture
def authority(ca: InMemoryCa) -> CountingAuthority:
    return CountingAuthority(ActiveSigner(ca.signer, ca.bundle))


@pytest.fixture
def issuer(authority: CountingAuthority) -> Issuer:
    return Issuer(authority, TtlPolicy(skew=timedelta(seconds=1)))  # type: ignore[arg-type]


def collect(store: SecretStore) -> tuple[list[StoreEvent], asyncio.Event]:
    events: list[StoreEvent] = []
    arrived = asyncio.Event()

    def listener(event: StoreEvent) -> None:
        events.append(event)
        arrived.set()

    store.subscribe(listener)
    return events, arrived


async def until(condition: Callable[[], bool], timeout: float = WAIT) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.05)


async def test_issues_on_first_use_and_caches(issuer: Issuer, authority: CountingAuthority) -> None:
    store = SecretStore(issuer)
    assert store.cached(WEB) is None
    first = await store.svid(WEB)
    assert first.spiffe_id == WEB
    assert first.private_key is not None
    assert await store.svid(WEB) is first
    assert store.cached(WEB) is first
    assert store.identities() == [WEB]
    assert authority.signed == 1
    assert first.not_after - (first.not_before + timedelta(seconds=1)) == timedelta(hours=24)


async def test_concurrent_first_requests_issue_once(
    issuer: Issuer, authority: CountingAuthority
) -> None:
    store = SecretStore(issuer)
    results = await asyncio.gather(*(store.svid(WEB) for _ in range(20)))
    assert authority.signed == 1
    assert all(r is results[0] for r in results)
    await asyncio.gather(store.svid(WEB), store.svid(DB), store.svid(DB))
    assert authority.signed == 2


async def test_scheduled_renewal_issues_a_new_serial_and_notifies(issuer: Issuer) -> None:
    store = SecretStore(issuer, ttl=SHORT_TTL)
    events, arrived = collect(store)
    store.start()
    try:
        first = await store.svid(WEB)
        await asyncio.wait_for(arrived.wait(), WAIT)
    finally:
        store.stop()
    changed = events[0]
    assert isinstance(changed, SvidChanged)
    assert changed.spiffe_id == WEB
    assert changed.svid.serial != first.serial
    assert changed.svid.not_after > first.not_after
    assert store.cached(WEB) is changed.svid
    assert await store.svid(WEB) is changed.svid
    assert store.renewals >= 1


async def test_a_due_svid_is_reissued_on_read_even_without_the_scheduler(issuer: Issuer) -> None:
    store = SecretStore(issuer, ttl=timedelta(seconds=2), renew_fraction=0.0, renew_jitter=0.0)
    events, _ = collect(store)
    first = await store.svid(WEB)  # due at once: renewal at 0 % of its life
    second = await store.svid(WEB)
    assert second.serial != first.serial
    assert [type(e) for e in events] == [SvidChanged]


async def test_renew_all_reissues_every_identity(issuer: Issuer) -> None:
    store = SecretStore(issuer)
    events, _ = collect(store)
    before = {sid: (await store.svid(sid)).serial for sid in (WEB, DB)}
    await store.renew_all()
    after = {sid: store.cached(sid).serial for sid in (WEB, DB)}  # type: ignore[union-attr]
    assert all(after[sid] != before[sid] for sid in (WEB, DB))
    assert sorted(e.spiffe_id for e in events if isinstance(e, SvidChanged)) == [DB, WEB]
    assert store.renewals == 2


async def test_a_failing_listener_does_not_stop_the_others(issuer: Issuer) -> None:
    store = SecretStore(issuer)

    def broken(event: StoreEvent) -> None:
        raise RuntimeError("listener bug")

    store.subscribe(broken)
    events, _ = collect(store)
    unsubscribe_me: list[StoreEvent] = []
    unsubscribe = store.subscribe(unsubscribe_me.append)
    unsubscribe()
    await store.svid(WEB)
    await store.renew(WEB)
    assert len(events) == 1
    assert unsubscribe_me == []


async def test_idle_identities_are_swept_once_released(issuer: Issuer) -> None:
    store = SecretStore(issuer, idle_ttl=timedelta(0))
    store.retain(WEB)  # a stream subscribes before the first issuance
    await store.svid(WEB)
    await store.svid(DB)  # read once, never retained
    assert store.sweep_idle() == [DB]
    assert store.cached(WEB) is not None
    store.retain(WEB)
    store.release(WEB)
    assert store.sweep_idle() == []  # still one user
    store.release(WEB)
    assert store.sweep_idle() == [WEB]
    assert store.identities() == []


async def test_a_recently_released_identity_is_kept_until_idle_ttl(issuer: Issuer) -> None:
    store = SecretStore(issuer, idle_ttl=timedelta(hours=1))
    store.retain(WEB)
    await store.svid(WEB)
    store.release(WEB)
    assert store.sweep_idle() == []
    assert store.cached(WEB) is not None


async def test_the_scheduler_sweeps_idle_identities(issuer: Issuer) -> None:
    store = SecretStore(issuer, idle_ttl=timedelta(seconds=1))
    store.start()
    try:
        store.retain(WEB)
        await store.svid(WEB)
        await store.svid(DB)
        store.release(WEB)
        await until(lambda: store.identities() == [])
    finally:
        store.stop()


async def test_bundle_change_is_notified_once(ca: InMemoryCa) -> None:
    authority = ActiveSigner(ca.signer, ca.bundle)
    store = SecretStore(Issuer(authority))
    events, _ = collect(store)
    assert store.refresh_bundle() is False
    new = make_ca()
    both = ca.bundle.with_root(new.root.certificate)
    authority.activate(new.signer, both)
    assert store.refresh_bundle() is True
    assert store.refresh_bundle() is False
    assert events == [BundleChanged(both)]
    assert store.bundle() == both
    svid = await store.svid(WEB)
    assert svid.intermediates == (new.signer.certificate,)


# renewal from the issue time; retries with backoff; never an expired SVID ----------------
class BackdatingAuthority(CountingAuthority):
    """Signs with NotBefore an hour back, as a backend with its own backdating might."""

    def sign(self, request: LeafRequest) -> tuple[object, ...]:
        return super().sign(replace(request, skew=timedelta(hours=1)))


class FlakyAuthority(CountingAuthority):
    """Refuses to sign while ``failing`` (a backend outage)."""

    failing = False

    def sign(self, request: LeafRequest) -> tuple[object, ...]:
        self.signed += 1
        if self.failing:
            raise BackendUnavailable("vault: cannot reach http://127.0.0.1:1: connection refused")
        return self.inner.sign(request)


@dataclass(frozen=True)
class RecordingBackoff(Backoff):
    """Short delays; remembers which retry each delay was for."""

    attempts: list[int] = field(default_factory=list)

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        self.attempts.append(attempt)
        return super().delay(attempt, rng)


async def test_renewal_is_scheduled_from_the_issue_time_not_the_backdated_not_before() -> None:
    ca = make_ca(now=datetime.now(UTC) - timedelta(days=1))  # lets leaves backdate an hour
    authority = BackdatingAuthority(ActiveSigner(ca.signer, ca.bundle))
    ttl = timedelta(seconds=20)
    store = SecretStore(Issuer(authority, TtlPolicy(default=ttl)), ttl=ttl)  # type: ignore[arg-type]
    svid = await store.svid(WEB)
    schedule = store.renewal(WEB)
    assert schedule is not None
    issued, renew_at = schedule
    assert svid.not_before <= issued - timedelta(minutes=59)  # the backend's backdating
    # about half-way through the certificate's own life, +/- 5 % jitter (its NotAfter is
    # whole seconds, so the life can be up to a second under the ttl asked for)
    life = svid.not_after - issued
    assert ttl - timedelta(seconds=1) <= life <= ttl
    assert life * 0.45 <= renew_at - issued <= life * 0.55
    assert await store.svid(WEB) is svid  # not due: no re-issue on read
    assert authority.signed == 1
    # the health policy measures the life left from the same moment
    assert life_left(svid, issued + ttl / 2, issued=issued) == pytest.approx(0.5, abs=0.05)


async def test_failed_renewals_back_off_and_are_logged_once_per_streak(
    ca: InMemoryCa, caplog: pytest.LogCaptureFixture
) -> None:
    authority = FlakyAuthority(ActiveSigner(ca.signer, ca.bundle))
    backoff = RecordingBackoff(initial=0.05, maximum=0.2)
    issuer = Issuer(authority, TtlPolicy(skew=timedelta(seconds=1)))  # type: ignore[arg-type]
    store = SecretStore(
        issuer, ttl=timedelta(hours=1), renew_fraction=0.0, renew_jitter=0.0, backoff=backoff
    )
    events, _ = collect(store)
    first = await store.svid(WEB)  # due at once (0 % of its life) once the timers run
    authority.failing = True
    with caplog.at_level(logging.DEBUG, logger="meshca.store"):
        store.start()
        try:
            await until(lambda: len(backoff.attempts) >= 4)
            assert backoff.attempts[:4] == [0, 1, 2, 3]  # exponential: one step per failure
            assert store.failing() == [WEB]
            signed = authority.signed
            assert await store.svid(WEB) is first  # served while retried, unexpired
            assert authority.signed == signed  # a read does not add an attempt
            store.renew_fraction = 0.5  # the renewed one is not due at once again
            authority.failing = False
            await until(lambda: any(isinstance(e, SvidChanged) for e in events))
        finally:
            store.stop()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "renewal of" in warnings[0].getMessage()
    assert any("succeeded after" in r.getMessage() for r in caplog.records)
    assert store.failing() == []
    renewed = store.cached(WEB)
    assert renewed is not None and renewed.serial != first.serial


async def test_an_expired_svid_is_never_served(
    ca: InMemoryCa, caplog: pytest.LogCaptureFixture
) -> None:
    authority = FlakyAuthority(ActiveSigner(ca.signer, ca.bundle))
    policy = TtlPolicy(default=timedelta(seconds=1), skew=timedelta(0))
    store = SecretStore(Issuer(authority, policy), ttl=timedelta(seconds=1))  # type: ignore[arg-type]
    first = await store.svid(WEB)
    authority.failing = True
    while datetime.now(UTC) < first.not_after:
        await asyncio.sleep(0.05)
    with caplog.at_level(logging.ERROR, logger="meshca.store"):
        for _ in range(3):
            with pytest.raises(SvidExpiredError, match="expired"):
                await store.svid(WEB)
    assert len([r for r in caplog.records if "no longer served" in r.getMessage()]) == 1
    authority.failing = False
    fresh = await store.svid(WEB)  # renewed on demand once the backend is back
    assert fresh.serial != first.serial and datetime.now(UTC) < fresh.not_after
