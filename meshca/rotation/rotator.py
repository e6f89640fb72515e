"""The rotation clock (SPIRE's rotator): when the next signing CA is prepared, activated,
and when an old one retires; likewise for the JWT-SVID signing key
(:mod:`meshca.rotation.jwt_keys`, on ``jwt_key_ttl`` with the same fractions).

At ``prepare_fraction`` of the active CA's life (default 1/2) the next CA is prepared;
at ``activate_fraction`` (default 5/6) it starts signing, a CA under a new root only
once every connected proxy has ACKed a bundle holding that root (or, failing that, at
:attr:`Schedule.force_at`); an old slot retires once nothing served chains through it.
The slot operations themselves (prepare, activate, retire) are the
:class:`~meshca.rotation.manager.RotationManager`'s; this module only decides when, on
wall-clock timers (an ``AsyncIOScheduler``), and looks again after an operator's change
(:meth:`Rotator.replan`).
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from meshca.issuer.svid import fingerprint
from meshca.rotation.acks import bundle_holds, certificate_not_under
from meshca.rotation.journal import RotationError, SlotKind, SlotRecord
from meshca.rotation.manager import RotationManager, Schedule
from meshca.util.formats import rfc3339
from meshca.util.logger import get_logger

log = get_logger("meshca.rotation")

MAX_TICK_INTERVAL = timedelta(minutes=10)


class Rotator:
    """Drives one manager's schedule. :meth:`tick` does what is due at a moment (tests
    pass explicit moments); :meth:`start` runs it on the event loop's timers. A rotator
    that is not started (``meshca ca`` working offline) makes :meth:`replan` a no-op."""

    def __init__(self, manager: RotationManager) -> None:
        self.manager = manager
        self.problem: str | None = None  # why the next CA cannot be prepared, if so
        self.root_notice: str | None = None  # why a due new root is not prepared, if so
        self._scheduler: AsyncIOScheduler | None = None

    async def tick(self, now: datetime | None = None) -> datetime:
        """Do whatever is due at ``now`` and return when to look again."""
        async with self.manager.lock:
            return await self._tick(now or self.manager.clock())

    async def _tick(self, now: datetime) -> datetime:
        manager = self.manager
        retry = now + manager.policy.retry_interval
        journal = manager.journal
        schedule = manager.schedule()
        # The JWT key's own slots: prepared, activated and retired on their own schedule.
        jwt_due = manager.jwt.tick(now)
        if journal.root_rotation is not None:
            # An operator drives this rotation step by step; the schedule holds off.
            if now >= schedule.activate_at:
                log.warning(
                    "a root rotation is held at step %d while the signing CA nears its end "
                    "(%s): finish or roll it back",
                    journal.root_rotation.done,
                    rfc3339(schedule.not_after),
                )
            return self._next_look(now, [schedule.activate_at, *jwt_due])
        due: list[datetime] = [*jwt_due]
        if journal.prepared is None and now >= schedule.prepare_at:
            try:
                await manager.prepare(self._due_kind(now))
                self.problem = None
            except RotationError as exc:
                if self.problem != str(exc):
                    log.error("cannot prepare the next signing CA: %s", exc)
                self.problem = str(exc)
                due.append(retry)
        prepared = manager.journal.prepared
        if prepared is not None:
            if now >= schedule.activate_at:
                if await self._auto_activate(prepared, schedule, now):
                    schedule = manager.schedule()
                else:
                    due.append(retry)
            else:
                due.append(schedule.activate_at)
        if manager.journal.prepared is None:
            due.append(schedule.prepare_at)
        for record in list(manager.journal.old):
            later = await self._maybe_retire(record, now)
            if later is not None:
                due.append(later)
        return self._next_look(now, due)

    def _due_kind(self, now: datetime) -> SlotKind:
        """The kind to prepare on schedule: the manager's ``next_kind``, except that when
        a new root is due but the source cannot make one (a backend whose roots are
        created by its operator), a CA under the current root keeps certificates renewed
        meanwhile."""
        manager = self.manager
        kind = manager.next_kind(now)
        active = manager.active
        if kind is SlotKind.ROOT and not active.is_self_signed:
            notice = manager.source.problem(active, new_root=True)
            if notice is not None and manager.source.problem(active, new_root=False) is None:
                if notice != self.root_notice:
                    log.warning(
                        "root %s ends %s, too soon for the next signing CA's full life, and "
                        "no new root can be prepared (%s): preparing a signing CA under the "
                        "current root meanwhile (it ends with the root)",
                        fingerprint(active.root),
                        rfc3339(active.root.not_valid_after_utc),
                        notice,
                    )
                self.root_notice = notice
                return SlotKind.INTERMEDIATE
        self.root_notice = None
        return kind

    def _next_look(self, now: datetime, due: list[datetime]) -> datetime:
        """The earliest future moment in ``due`` (past ones mean "retry soon"), capped so
        a clock jump is noticed."""
        retry = now + self.manager.policy.retry_interval
        upcoming = [moment if moment > now else retry for moment in due]
        return min([*upcoming, now + MAX_TICK_INTERVAL])

    async def _auto_activate(self, prepared: SlotRecord, schedule: Schedule, now: datetime) -> bool:
        manager = self.manager
        if prepared.kind is SlotKind.ROOT:
            waiting = manager.unacked(bundle_holds(manager.ca(prepared.id).root))
            if waiting and now < schedule.force_at:
                log.info(
                    "slot %s waits for %d proxies to ACK its root: %s",
                    prepared.id,
                    len(waiting),
                    ", ".join(waiting),
                )
                return False
            if waiting:
                log.warning(
                    "activating slot %s although these proxies never ACKed its root: %s",
                    prepared.id,
                    ", ".join(waiting),
                )
        await manager.activate(prepared.id)
        return True

    async def _maybe_retire(self, record: SlotRecord, now: datetime) -> datetime | None:
        """Retire an old slot once nothing served can chain through it; otherwise return
        when to look again."""
        manager = self.manager
        if now >= record.not_after:
            await manager.retire(record.id)
            return None
        if record.root == manager.journal.active.root:
            return record.not_after  # same root: the bundle is unaffected; kept until expiry
        root = manager.ca(record.id).root
        if manager.served_under(root) or manager.unacked(certificate_not_under(root)):
            return now + manager.policy.retry_interval
        await manager.retire(record.id)
        return None

    # the timers ---------------------------------------------------------------------------
    def start(self) -> None:
        """Run the schedule on the current event loop (wall-clock timers); opens the
        manager if needed."""
        if self._scheduler is not None:
            return
        self.manager.open()
        self._scheduler = AsyncIOScheduler(timezone=UTC)
        self._scheduler.start()
        self._plan(self.manager.clock())

    def stop(self) -> None:
        if self._scheduler is not None:
            with contextlib.suppress(Exception):
                self._scheduler.shutdown(wait=False)
            self._scheduler = None

    def _plan(self, when: datetime) -> None:
        if self._scheduler is None:
            return
        self._scheduler.add_job(
            self._tick_job,
            "date",
            run_date=when,
            id="meshca-ca-rotation",
            replace_existing=True,
            misfire_grace_time=None,
        )

    async def _tick_job(self) -> None:
        try:
            when = await self.tick()
        except Exception:
            log.exception("signing-CA rotation check failed")
            when = self.manager.clock() + self.manager.policy.retry_interval
        self._plan(when)

    def replan(self) -> None:
        """Look at the schedule again now (after an operator's change)."""
        self._plan(self.manager.clock())
