"""The secret store: issue on first use, scheduled renewal with notifications, idle sweep."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta

import pytest

from meshca.issuer import Issuer, LeafRequest, SignerAuthority, TrustBundle, TtlPolicy
from meshca.issuer.authority import SigningAuthority
from meshca.spiffe import SpiffeId, TrustDomain
from meshca.store import BundleChanged, SecretStore, StoreEvent, SvidChanged
from tests.ca_factory import TRUST_DOMAIN, InMemoryCa, make_ca

WEB = SpiffeId.from_kubernetes("default", "web", TRUST_DOMAIN)
DB = SpiffeId.from_kubernetes("default", "db", TRUST_DOMAIN)
SHORT_TTL = timedelta(seconds=4)
WAIT = 15.0  # an upper bound for a scheduled event to arrive, not an expectation


class CountingAuthority:
    """A real authority that counts what it signs."""

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
    return CountingAuthority(SignerAuthority(ca.signer, ca.bundle))


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
    authority = SignerAuthority(ca.signer, ca.bundle)
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
