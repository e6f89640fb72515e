"""The secret store: one current SVID per identity in use, renewed on schedule, and
change notifications for whoever serves them (Istio's secret cache, in its own module).

Serving code (``meshca.sds``) reads from here and subscribes to changes; it never
signs. Listeners are plain callbacks run on the event loop and must not block: a
stream sets its own wake-up event and sends in its own task, so one slow or stuck
stream cannot hold up a push to the others.

Renewal is scheduled from the moment an SVID was requested (the wall clock, recorded
here), not from its NotBefore: backends backdate differently (meshca by its skew, a
Vault role by its ``not_before_duration``), and a schedule that guessed the backdating
would renew a short-lived SVID at once or only at expiry. A failed renewal is retried
with exponential backoff and jitter, logged once per failure streak; the current SVID
is served meanwhile, never past its NotAfter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from meshca.issuer import Issuer, IssuerError, TrustBundle, X509Svid
from meshca.issuer.policy import RENEW_FRACTION, RENEW_JITTER, issued_at, renewal_time
from meshca.spiffe import SpiffeId
from meshca.util.aio import call_inline_or_in_thread
from meshca.util.formats import rfc3339, serial_hex
from meshca.util.logger import get_logger
from meshca.util.retry import Backoff

log = get_logger("meshca.store")

DEFAULT_IDLE_TTL = timedelta(minutes=10)
# Renewal retries: 1 s doubling to 60 s, each delay randomised over its upper half.
DEFAULT_RENEW_BACKOFF = Backoff(initial=1.0, maximum=60.0)


@dataclass(frozen=True)
class SvidChanged:
    """A new SVID replaced the previous one of its identity (renewal or re-issue)."""

    svid: X509Svid

    @property
    def spiffe_id(self) -> SpiffeId:
        return self.svid.spiffe_id


@dataclass(frozen=True)
class BundleChanged:
    bundle: TrustBundle


StoreEvent = SvidChanged | BundleChanged
Listener = Callable[[StoreEvent], None]


@dataclass
class _Entry:
    svid: X509Svid
    issued: datetime  # wall clock when it was requested: its life starts here
    renew_at: datetime
    users: int = 0
    idle_since: datetime | None = None
    failures: int = 0  # consecutive failed renewals (the current streak)
    expiry_reported: bool = False


class SvidExpiredError(IssuerError):
    """The SVID expired and could not be renewed: it is not served."""


class SecretStore:
    """Issues on first use, renews at ``fraction`` of life (+/- jitter), retries failed
    renewals with ``backoff``, drops idle identities."""

    def __init__(
        self,
        issuer: Issuer,
        *,
        ttl: timedelta | None = None,
        dns_names: dict[SpiffeId, tuple[str, ...]] | None = None,
        idle_ttl: timedelta = DEFAULT_IDLE_TTL,
        renew_fraction: float = RENEW_FRACTION,
        renew_jitter: float = RENEW_JITTER,
        rng: random.Random | None = None,
        backoff: Backoff = DEFAULT_RENEW_BACKOFF,
    ) -> None:
        self.issuer = issuer
        self.ttl = ttl
        self.dns_names = dict(dns_names or {})
        self.idle_ttl = idle_ttl
        self.renew_fraction = renew_fraction
        self.renew_jitter = renew_jitter
        self.backoff = backoff
        self._rng = rng or random.Random()
        self._entries: dict[SpiffeId, _Entry] = {}
        self._locks: dict[SpiffeId, asyncio.Lock] = {}
        self._listeners: list[Listener] = []
        self._pending_users: dict[SpiffeId, int] = {}  # retained before first issuance
        self._bundle = issuer.bundle()
        self._scheduler: AsyncIOScheduler | None = None
        # Renewal timers, one per identity: a plain event-loop timer (an APScheduler job
        # cost more than signing the certificate). Each re-reads the wall clock when it
        # fires and waits again if the clock says it is early.
        self._timers: dict[SpiffeId, asyncio.TimerHandle] = {}
        self._renewing: set[asyncio.Task[None]] = set()
        self.renewals = 0
        self.issue_failures = 0

    # lifecycle -----------------------------------------------------------
    def start(self) -> None:
        """Start the renewal timers (needs a running event loop)."""
        if self._scheduler is None:
            self._scheduler = AsyncIOScheduler(timezone=UTC)
            self._scheduler.start()
            for spiffe_id, entry in self._entries.items():
                self._schedule(spiffe_id, entry.renew_at)
            self._scheduler.add_job(
                self.sweep_idle,
                "interval",
                seconds=max(1, int(self.idle_ttl.total_seconds() / 4)),
                id="meshca-sweep-idle",
            )

    def stop(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    # reads ----------------------------------------------------------------
    def bundle(self) -> TrustBundle:
        return self._bundle

    def cached(self, spiffe_id: SpiffeId) -> X509Svid | None:
        entry = self._entries.get(spiffe_id)
        return entry.svid if entry else None

    def identities(self) -> list[SpiffeId]:
        return sorted(self._entries)

    def renewal(self, spiffe_id: SpiffeId) -> tuple[datetime, datetime] | None:
        """When the current SVID of ``spiffe_id`` was requested and when it is due for
        renewal (wall clock); None when the store holds none."""
        entry = self._entries.get(spiffe_id)
        return (entry.issued, entry.renew_at) if entry else None

    def failing(self) -> list[SpiffeId]:
        """Identities whose renewal is failing (being retried with backoff)."""
        return sorted(sid for sid, entry in self._entries.items() if entry.failures)

    def _fresh(self, entry: _Entry | None, now: datetime) -> bool:
        """Whether ``entry`` is served as it is: not yet due, or due while the timers retry
        its renewal with backoff (reads do not add attempts); never once expired."""
        if entry is None or now >= entry.svid.not_after:
            return False
        return now < entry.renew_at or (entry.failures > 0 and self._scheduler is not None)

    async def svid(self, spiffe_id: SpiffeId) -> X509Svid:
        """The current SVID for ``spiffe_id``, issued now if absent, expired or due.

        An expired SVID is never returned: if it cannot be renewed, the issuing error
        is raised (:class:`SvidExpiredError` when the renewal is already being retried).
        """
        entry = self._entries.get(spiffe_id)
        if self._fresh(entry, datetime.now(UTC)):
            assert entry is not None
            return entry.svid
        async with self._lock(spiffe_id):
            entry = self._entries.get(spiffe_id)
            if self._fresh(entry, datetime.now(UTC)):
                assert entry is not None
                return entry.svid
            try:
                return await self._issue(spiffe_id)
            except Exception as exc:
                if entry is None:
                    raise
                self._renewal_failed(spiffe_id, entry, exc)
                if datetime.now(UTC) >= entry.svid.not_after:
                    raise SvidExpiredError(
                        f"the SVID of {spiffe_id} expired at {rfc3339(entry.svid.not_after)} "
                        f"and cannot be renewed: {exc}"
                    ) from exc
                return entry.svid  # due, unexpired: served through a backend outage

    # usage tracking (bounded memory) ---------------------------------------
    def retain(self, spiffe_id: SpiffeId) -> None:
        entry = self._entries.get(spiffe_id)
        if entry is not None:
            entry.users += 1
            entry.idle_since = None
        else:
            self._pending_users[spiffe_id] = self._pending_users.get(spiffe_id, 0) + 1

    def release(self, spiffe_id: SpiffeId) -> None:
        entry = self._entries.get(spiffe_id)
        if entry is None:
            count = self._pending_users.get(spiffe_id, 0) - 1
            if count > 0:
                self._pending_users[spiffe_id] = count
            else:
                self._pending_users.pop(spiffe_id, None)
            return
        entry.users = max(0, entry.users - 1)
        if entry.users == 0:
            entry.idle_since = datetime.now(UTC)

    def sweep_idle(self) -> list[SpiffeId]:
        """Drop identities nobody has used for ``idle_ttl``; returns what was dropped."""
        cutoff = datetime.now(UTC) - self.idle_ttl
        dropped = [
            sid
            for sid, e in self._entries.items()
            if e.users == 0 and e.idle_since is not None and e.idle_since <= cutoff
        ]
        for sid in dropped:
            del self._entries[sid]
            self._locks.pop(sid, None)
            timer = self._timers.pop(sid, None)
            if timer is not None:
                timer.cancel()
            log.info("dropped idle identity %s", sid)
        return dropped

    # notifications -----------------------------------------------------------
    def subscribe(self, listener: Listener) -> Callable[[], None]:
        self._listeners.append(listener)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return unsubscribe

    def _notify(self, event: StoreEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # a broken listener must not stop the others
                log.exception("store listener failed")

    def refresh_bundle(self) -> bool:
        """Re-read the authority's bundle; notify if it changed. Returns whether it did."""
        bundle = self.issuer.bundle()
        if bundle == self._bundle:
            return False
        self._bundle = bundle
        self._notify(BundleChanged(bundle))
        return True

    # issuance and renewal ------------------------------------------------------
    def _lock(self, spiffe_id: SpiffeId) -> asyncio.Lock:
        """One issuance at a time per identity."""
        lock = self._locks.get(spiffe_id)
        if lock is None:
            lock = self._locks[spiffe_id] = asyncio.Lock()
        return lock

    def _schedule(self, spiffe_id: SpiffeId, when: datetime) -> None:
        """Renew ``spiffe_id`` at ``when`` (wall clock), replacing any renewal planned."""
        if self._scheduler is None:
            return
        previous = self._timers.pop(spiffe_id, None)
        if previous is not None:
            previous.cancel()
        self._arm(spiffe_id, when)

    def _arm(self, spiffe_id: SpiffeId, when: datetime) -> None:
        delay = max(0.0, (when - datetime.now(UTC)).total_seconds())
        loop = asyncio.get_running_loop()
        self._timers[spiffe_id] = loop.call_later(delay, self._due, spiffe_id, when)

    def _due(self, spiffe_id: SpiffeId, when: datetime) -> None:
        if datetime.now(UTC) < when:  # the event loop's clock ran ahead of the wall clock
            self._arm(spiffe_id, when)
            return
        self._timers.pop(spiffe_id, None)
        task = asyncio.get_running_loop().create_task(self._renew_job(spiffe_id))
        self._renewing.add(task)  # held until it ends; a renewal may schedule the next
        task.add_done_callback(self._renewing.discard)

    async def _issue(self, spiffe_id: SpiffeId) -> X509Svid:
        dns = self.dns_names.get(spiffe_id, ())
        requested = datetime.now(UTC)
        try:
            svid = await call_inline_or_in_thread(
                self.issuer.issues_quickly(),
                self.issuer.issue,
                spiffe_id,
                ttl=self.ttl,
                dns_names=dns,
            )
        except Exception:
            self.issue_failures += 1
            raise
        # The life the schedule divides starts when the SVID was asked for, whatever
        # NotBefore the backend wrote.
        issued = issued_at(svid.not_before, svid.not_after, requested=requested)
        renew_at = renewal_time(
            issued,
            svid.not_after,
            fraction=self.renew_fraction,
            jitter=self.renew_jitter,
            rng=self._rng,
        )
        previous = self._entries.get(spiffe_id)
        users = previous.users if previous else self._pending_users.pop(spiffe_id, 0)
        idle_since = None if users else (previous.idle_since if previous else datetime.now(UTC))
        self._entries[spiffe_id] = _Entry(svid, issued, renew_at, users, idle_since)
        self._schedule(spiffe_id, renew_at)
        if previous is not None:
            self.renewals += 1
            if previous.failures:
                log.info(
                    "renewal of %s succeeded after %d failed attempt(s)",
                    spiffe_id,
                    previous.failures,
                )
            self._log_issued("renewed", svid)
            self._notify(SvidChanged(svid))
        else:
            self._log_issued("issued", svid)
        self.refresh_bundle()
        return svid

    @staticmethod
    def _log_issued(what: str, svid: X509Svid) -> None:
        """The audit line of an issuance; its fields are worked out only when it is
        written (the serial and NotAfter are read from the certificate)."""
        if log.isEnabledFor(logging.INFO):
            log.info(
                "%s %s serial=%s not_after=%s",
                what,
                svid.spiffe_id,
                serial_hex(svid.serial),
                rfc3339(svid.not_after),
            )

    def retry_failing_now(self) -> list[SpiffeId]:
        """The backend answers again: renew at once every SVID whose renewal failed (due
        or overdue), instead of when its backoff timer fires. Returns those identities."""
        now = datetime.now(UTC)
        failing = [sid for sid, entry in self._entries.items() if entry.failures]
        for spiffe_id in failing:
            self._schedule(spiffe_id, now)
        if failing:
            log.info("backend healthy again: renewing %d identities now", len(failing))
        return failing

    async def renew(self, spiffe_id: SpiffeId) -> X509Svid:
        """Re-issue now (and push), whatever the schedule says."""
        async with self._lock(spiffe_id):
            return await self._issue(spiffe_id)

    async def renew_all(self) -> None:
        """Re-issue every held SVID at once (after a CA switch), concurrently."""
        await asyncio.gather(*(self.renew(sid) for sid in list(self._entries)))

    async def _renew_job(self, spiffe_id: SpiffeId) -> None:
        entry = self._entries.get(spiffe_id)
        if entry is None:
            return
        try:
            await self.renew(spiffe_id)
        except Exception as exc:
            if self._entries.get(spiffe_id) is entry:  # not replaced or dropped meanwhile
                self._renewal_failed(spiffe_id, entry, exc)

    def _renewal_failed(self, spiffe_id: SpiffeId, entry: _Entry, exc: Exception) -> None:
        """Count a failed renewal and schedule the next attempt with backoff and jitter.
        Logged at WARNING once per streak (and once more if the SVID expires meanwhile);
        each further attempt at DEBUG."""
        now = datetime.now(UTC)
        delay = timedelta(seconds=self.backoff.delay(entry.failures, self._rng))
        entry.failures += 1
        retry = now + delay
        if now < entry.svid.not_after:
            retry = min(retry, entry.svid.not_after)  # at its expiry at the latest
        self._schedule(spiffe_id, retry)
        expired = now >= entry.svid.not_after
        if entry.failures == 1 and not expired:
            log.warning(
                "renewal of %s failed (%s); serving the current SVID until %s and retrying "
                "with backoff",
                spiffe_id,
                exc,
                rfc3339(entry.svid.not_after),
            )
        elif expired and not entry.expiry_reported:
            entry.expiry_reported = True
            log.error(
                "the SVID of %s expired at %s and is no longer served; renewal keeps failing "
                "(%d attempts, last: %s)",
                spiffe_id,
                rfc3339(entry.svid.not_after),
                entry.failures,
                exc,
            )
        else:
            log.debug("renewal of %s failed again (attempt %d): %s", spiffe_id, entry.failures, exc)
