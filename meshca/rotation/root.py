"""Root rotation as five acknowledged steps, each runnable on its own.

1. add the new root to the trust bundle and push it;
2. wait until every connected proxy has ACKed a bundle holding it;
3. sign under the new root and re-issue every served SVID at once;
4. wait until every connected proxy has ACKed a certificate under the new root;
5. remove the old root once nothing served chains to it.

Moving on is driven by what proxies acknowledged, never by a sleep: at every moment
each proxy trusts the root of every certificate it may be shown. The stage is in the
journal, so a restart carries on from the step that was running; until step 5 starts,
:meth:`RootRotation.rollback` returns to the old root the same careful way.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

from cryptography import x509

from meshca.issuer.svid import fingerprint
from meshca.rotation.acks import (
    SecretPredicate,
    bundle_holds,
    certificate_not_under,
    certificate_under,
    shown,
)
from meshca.rotation.journal import (
    RootRotationState,
    RotationError,
    SlotKind,
    SlotStatus,
    cert_id,
)
from meshca.rotation.manager import RotationManager
from meshca.rotation.operator import LAST_STEP
from meshca.rotation.proxies import ProxyRecord
from meshca.rotation.rotator import Rotator
from meshca.util.logger import get_logger

log = get_logger("meshca.rotation")

STEPS = {
    1: "add the new root to the trust bundle and push it",
    2: "wait until every connected proxy has ACKed a bundle holding the new root",
    3: "sign under the new root and re-issue every served SVID",
    4: "wait until every connected proxy has ACKed a certificate under the new root",
    5: "remove the old root once nothing served chains to it",
}
DEFAULT_ACK_TIMEOUT = timedelta(minutes=5)


class AckTimeout(RotationError):
    """Some proxies did not acknowledge in time, or refused; the rotation holds where it was."""

    def __init__(
        self,
        what: str,
        waiting: list[str],
        timeout: timedelta,
        *,
        refusing: list[str] | None = None,
        rollback: bool = False,
        forcible: bool = True,
        offline: bool = False,
    ) -> None:
        refusing = refusing or []
        if offline:
            head = (
                f"{what}: no server is running, and the ACKs it saved lack "
                f"{len(waiting)}: {shown(waiting)}"
            )
        elif refusing and len(refusing) == len(waiting):
            head = f"{what}: {len(waiting)} proxies refused (NACKed) it: {shown(waiting)}"
        else:
            head = (
                f"{what}: timed out after {timeout.total_seconds():g}s, still waiting for "
                f"{len(waiting)}: {shown(waiting)}"
            )
            if refusing:
                head += f" ({len(refusing)} of them refused it: {shown(refusing)})"
        again = "run '--rollback' again" if rollback else "run the step again, or roll back"
        force = "; add --force-unacked to go on without them" if forcible else ""
        super().__init__(f"{head} (the rotation holds; {again}{force})")
        self.waiting = waiting
        self.refusing = refusing


@dataclass(frozen=True)
class StepReport:
    step: int
    title: str
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "title": self.title, "detail": self.detail}


class RootRotation:
    """Drives a root rotation through a :class:`RotationManager`."""

    def __init__(
        self,
        manager: RotationManager,
        *,
        rotator: Rotator | None = None,
        ack_timeout: timedelta = DEFAULT_ACK_TIMEOUT,
        poll_interval: float = 0.25,
        polled: bool = True,
    ) -> None:
        self.manager = manager
        # Whether anyone polls meanwhile (a running server). Working on the data directory
        # with no server, the saved ACKs are all there is: a wait is judged at once.
        self.polled = polled
        # The clock to re-plan after each change (one not started, offline: a no-op).
        self.rotator = rotator or Rotator(manager)
        self.ack_timeout = ack_timeout
        self.poll_interval = poll_interval
        self._operation = asyncio.Lock()  # one operator action at a time
        # Until then (monotonic), no wait is judged complete: after a restart, proxies
        # connected before it may not have reconnected yet, and would not be counted.
        self._reconnect_until = 0.0
        # Who was connected, recorded beside the journal; after a restart, the recorded
        # proxies not seen back yet (each wait holds for them, within its timeout).
        self.record = ProxyRecord(manager.journals.directory)
        self._expected: dict[str, int] = {}  # name -> streams it had open
        self._timeout: timedelta | None = None  # of the operator's last command

    @property
    def state(self) -> RootRotationState | None:
        return self.manager.journal.root_rotation

    # operator entry points ------------------------------------------------------------
    async def run(
        self, through: int = LAST_STEP, *, timeout: timedelta | None = None, force: bool = False
    ) -> list[StepReport]:
        """Run every remaining step up to ``through``. With ``force``, a wait that times
        out (or that only proxies refusing the change hold up) goes on without them."""
        _check_step(through)
        async with self._operation:
            state = self.state
            if state is not None and state.rolling_back:
                raise RotationError(
                    "a rollback is in progress: run 'meshca ca rotate-root --rollback'"
                )
            if state is not None and state.done >= through:
                return [StepReport(through, STEPS[through], "already done")]
            start = (state.running or state.done + 1) if state is not None else 1
            await self._set_target(through)
            reports = []
            for step in range(start, through + 1):
                reports.append(
                    await self._run_step(step, through, timeout or self.ack_timeout, force)
                )
            return reports

    async def step(
        self, step: int, *, timeout: timedelta | None = None, force: bool = False
    ) -> StepReport:
        """Run exactly ``step`` (the previous steps must be done); ``force`` as in :meth:`run`."""
        _check_step(step)
        async with self._operation:
            state = self.state
            done = state.done if state else 0
            if state is not None and state.rolling_back:
                raise RotationError(
                    "a rollback is in progress: run 'meshca ca rotate-root --rollback'"
                )
            if step <= done:
                return StepReport(step, STEPS[step], "already done")
            if step > done + 1:
                raise RotationError(
                    f"step {step} ({STEPS[step]}) needs step {done + 1} first; "
                    f"the rotation is at step {done}"
                )
            await self._set_target(step)
            return await self._run_step(step, step, timeout or self.ack_timeout, force)

    async def rollback(
        self, *, timeout: timedelta | None = None, force: bool = False
    ) -> StepReport:
        """Return to the old root: signing back under it (re-issuing every SVID, waiting for
        the ACKs) if step 3 ran, then the new root leaves the bundle. Proxies that refuse
        the change never hold a rollback up; ``force`` also goes on without those that
        did not answer in time."""
        async with self._operation:
            return await self._rollback(timeout or self.ack_timeout, force)

    def hold_for_reconnects(self, grace: float) -> None:
        """After a restart in the middle of a root rotation: for ``grace`` seconds, every
        wait (the resumed one or an operator's step) holds even when every connected proxy
        has acknowledged, so that proxies connected before the restart are back and
        counted; a proxy not yet reconnected may still present a certificate under the old
        root, or trust only the old root."""
        self._reconnect_until = max(self._reconnect_until, time.monotonic() + grace)

    def record_connected(self) -> None:
        """While a root rotation is in progress, record who is connected (and who is
        still expected back) beside the journal; once none is, remove the record."""
        if self.state is None:
            self.record.remove()
            return
        connected = self.manager.acks.connected()
        self._back(connected)
        timeout = self._timeout.total_seconds() if self._timeout is not None else None
        for name, streams in self._expected.items():  # still expected back: kept
            connected[name] = max(streams, connected.get(name, 0))
        self.record.save(connected, timeout)

    def expect_recorded(self) -> bool:
        """After a restart: wait for the proxies recorded before it (each wait holds until
        they are back and have acknowledged, within its timeout). False when there is no
        record to go by (then :meth:`hold_for_reconnects` is the fallback)."""
        recorded = self.record.load()
        if self.state is None:
            self.record.remove()
            return False
        if recorded is None:
            return False
        self._expected = dict(recorded.proxies)
        if recorded.timeout is not None:
            self._timeout = timedelta(seconds=recorded.timeout)
        log.info(
            "a root rotation is in progress: its waits hold for the %d proxies connected "
            "before the restart until they are back and have acknowledged",
            len(self._expected),
        )
        return True

    def _back(self, connected: dict[str, int] | None = None) -> list[str]:
        """The recorded proxies not connected again since the restart with as many
        streams as before, as waits name them."""
        if not self._expected:
            return []
        now = self.manager.acks.connected() if connected is None else connected
        self._expected = {k: n for k, n in self._expected.items() if now.get(k, 0) < n}
        return [
            f"{name} (not reconnected since the restart: {now.get(name, 0)} of {n} streams)"
            for name, n in sorted(self._expected.items())
        ]

    async def resume(self, *, grace: float = 0.0) -> None:
        """After a restart: carry on with what was running when the process stopped.

        ``grace`` seconds pass first, so proxies that were connected before the restart
        are connected again (and counted) before any wait is judged complete.
        """
        state = self.state
        if state is None or not (state.rolling_back or state.running or state.target > state.done):
            return
        log.info("a root rotation was interrupted; resuming in %gs", grace)
        await asyncio.sleep(grace)
        state = self.state
        if state is None:
            return
        try:
            if state.rolling_back:
                log.info("resuming the rollback of the root rotation")
                await self.rollback(timeout=self._timeout)
            elif state.running is not None or state.target > state.done:
                log.info(
                    "resuming the root rotation at step %d (up to step %d)",
                    state.running or state.done + 1,
                    max(state.target, state.running or 0),
                )
                await self.run(max(state.target, state.running or 0), timeout=self._timeout)
        except RotationError as exc:
            log.error("the resumed root rotation stopped: %s", exc)

    # the steps --------------------------------------------------------------------------------
    async def _run_step(
        self, step: int, target: int, timeout: timedelta, force: bool = False
    ) -> StepReport:
        log.info("root rotation step %d: %s", step, STEPS[step])
        self._timeout = timeout
        skipped: list[str] = []
        if step == 1:
            detail = await self._add_new_root(target)
        elif step == 2:
            await self._mark_running(2)
            root = self._new_root()
            skipped = await self._wait(
                "step 2: proxies to ACK a bundle holding the new root",
                bundle_holds(root),
                timeout,
                force=force,
            )
            detail = "every connected proxy trusts the new root"
        elif step == 3:
            detail = await self._switch_signing()
        elif step == 4:
            await self._mark_running(4)
            new_root = self._new_root()
            skipped = await self._wait(
                "step 4: proxies to ACK certificates under the new root",
                certificate_under(new_root),
                timeout,
                force=force,
                also=lambda: self._served_under_old_root(),
            )
            detail = "every connected proxy presents a certificate under the new root"
        else:
            await self._mark_running(5)
            old_root = self._old_root()
            if old_root is not None:
                skipped = await self._wait(
                    "step 5: certificates under the old root to go out of use",
                    certificate_not_under(old_root),
                    timeout,
                    force=force,
                    also=lambda: self.manager.served_under(old_root),
                )
            detail = await self._remove_old_root()
        if skipped:
            detail += f" (went on without {len(skipped)}: {shown(skipped)})"
        if step < LAST_STEP:
            await self._mark_done(step)
        log.info("root rotation step %d done: %s", step, detail)
        return StepReport(step, STEPS[step], detail)

    async def _add_new_root(self, target: int) -> str:
        manager = self.manager
        async with manager.lock:
            # A refused step changes nothing: asked before anything is written (a replica
            # with its own intermediate, or Vault, makes no root of its own).
            problem = manager.source.problem(manager.active, new_root=True)
            if problem is not None:
                raise RotationError(problem)
            before = state = self.state
            if state is None:
                state = RootRotationState(
                    new_slot=None, old_slot=manager.journal.active.id, running=1, target=target
                )
                await manager.set_root_rotation(state)
            else:
                await manager.set_root_rotation(replace(state, running=1))
            prepared = manager.journal.prepared
            if prepared is not None and prepared.kind is SlotKind.INTERMEDIATE:
                await manager.discard_prepared()  # it signed nothing; a new root replaces it
            try:
                record = await manager.prepare(SlotKind.ROOT)
            except RotationError:
                # The source refused after all: no rotation is left recorded as running.
                await manager.set_root_rotation(before)
                raise
            state = self.state
            assert state is not None
            await manager.set_root_rotation(replace(state, new_slot=record.id))
        return f"root {fingerprint(manager.ca(record.id).root)} (slot {record.id}) is in the bundle"

    async def _switch_signing(self) -> str:
        manager = self.manager
        await self._mark_running(3)
        state = self._require_state()
        assert state.new_slot is not None
        async with manager.lock:
            await manager.activate(state.new_slot, renew=True)
        count = len(manager.store.identities()) if manager.store is not None else 0
        return f"slot {state.new_slot} signs; {count} SVIDs re-issued under the new root"

    async def _remove_old_root(self) -> str:
        manager = self.manager
        old_root = self._old_root()
        async with manager.lock:
            if old_root is not None:
                old_id = cert_id(old_root)
                for record in list(manager.journal.old):
                    if record.root == old_id:
                        await manager.retire(record.id)
            await manager.set_root_rotation(None)
        self.rotator.replan()
        if old_root is not None and old_root in manager.journal.bundle:
            return (
                f"nothing chains to the old root {fingerprint(old_root)} any more; it stays in "
                "the trust bundle while the backend holds it (in Vault: delete its issuer); "
                "the rotation is complete"
            )
        shown = fingerprint(old_root) if old_root is not None else "(already removed)"
        return f"old root {shown} left the trust bundle; the rotation is complete"

    async def _rollback(self, timeout: timedelta, force: bool = False) -> StepReport:
        manager = self.manager
        self._timeout = timeout
        state = self.state
        if state is None:
            raise RotationError("no root rotation is in progress")
        if state.running == 5 or state.done >= 5:
            raise RotationError("the old root is being removed (step 5): too late to roll back")
        # Whether anything may have been signed under the new root (step 3 started).
        signed = state.done >= 3 or state.running in (3, 4)
        state = replace(state, rolling_back=True, running=None, target=0)
        async with manager.lock:
            await manager.set_root_rotation(state)
        detail = "no new root had been added; nothing else to undo"
        slots = {record.id for record in manager.journal.slots}
        if state.new_slot is not None and state.new_slot in slots:
            detail = "the new root left the trust bundle"
            new_root = manager.ca(state.new_slot).root
            async with manager.lock:
                if manager.journal.slot(state.new_slot).status is SlotStatus.ACTIVE:
                    signed = True
                    await manager.activate(state.old_slot)
                    detail = "signing is back under the old root; " + detail
                if manager.served_under(new_root) and manager.store is not None:
                    signed = True
                    await manager.store.renew_all()
            if signed:
                # Nothing may chain to the new root when it leaves the bundle. A proxy
                # that refuses the change is not waited for: it must not trap the operator.
                skipped = await self._wait(
                    "rollback: certificates under the new root to go out of use",
                    certificate_not_under(new_root),
                    timeout,
                    force=force,
                    also=lambda: manager.served_under(new_root),
                    skip_refusing=True,
                )
                if skipped:
                    detail += f" (went on without {len(skipped)}: {shown(skipped)})"
        async with manager.lock:
            prepared = manager.journal.prepared
            if prepared is not None and prepared.kind is SlotKind.ROOT:
                await manager.discard_prepared()
            await manager.set_root_rotation(None)
        self.rotator.replan()
        log.info("root rotation rolled back: %s", detail)
        return StepReport(0, "roll back", detail)

    # helpers -------------------------------------------------------------------------------------
    async def _wait(
        self,
        what: str,
        predicate: SecretPredicate,
        timeout: timedelta,
        *,
        force: bool = False,
        also: Callable[[], list[str]] | None = None,
        skip_refusing: bool = False,
    ) -> list[str]:
        """Wait until every connected proxy has acknowledged what ``predicate`` asks for
        and ``also`` (the store's own state, never skipped) names nothing; return the
        proxies it went on without.

        Bounded: at ``timeout``, or at once when only proxies that refused (NACKed) the
        change are left (they will not ACK it), AckTimeout names them and the rotation
        holds; with ``force`` the wait goes on without them instead, logged.
        ``skip_refusing``: proxies that refuse are never waited for (rollback).
        """
        # The timeout never ends a wait before the reconnect grace does.
        deadline = max(time.monotonic() + timeout.total_seconds(), self._reconnect_until)
        held = False
        while True:
            # Proxies connected before a restart and not back yet are waited for too.
            waiting = self.manager.unacked(predicate) + self._back()
            refusing = self.manager.acks.refusing() if waiting else []
            skipped = [name for name in waiting if name in refusing] if skip_refusing else []
            waiting = [name for name in waiting if name not in skipped]
            store = also() if also is not None else []
            now = time.monotonic()
            if not waiting and not store:
                if now >= self._reconnect_until:
                    if skipped:
                        log.warning(
                            "%s: not waiting for %d proxies that refused the change: %s",
                            what,
                            len(skipped),
                            shown(skipped),
                        )
                    return skipped
                if not held:
                    held = True
                    log.info(
                        "%s: holding %.1fs more for proxies to reconnect after the restart",
                        what,
                        self._reconnect_until - now,
                    )
            elif (
                now >= deadline
                or not self.polled
                or (not store and now >= self._reconnect_until and set(waiting) <= set(refusing))
            ):
                if force and not store:
                    log.warning(
                        "%s: going on without %d proxies (--force-unacked): %s",
                        what,
                        len(waiting),
                        shown(waiting),
                    )
                    return skipped + waiting
                state = self.state
                if state is not None and not state.rolling_back:
                    async with self.manager.lock:
                        await self.manager.set_root_rotation(
                            replace(state, running=None, target=state.done)
                        )
                raise AckTimeout(
                    what,
                    waiting + store,
                    timeout,
                    refusing=[name for name in waiting if name in refusing],
                    rollback=state is not None and state.rolling_back,
                    forcible=not store,
                    offline=not self.polled,
                )
            await asyncio.sleep(self.poll_interval)

    def waiting_on(self) -> list[str]:
        """Who the rotation waits for now (for ``meshca ca status``)."""
        state = self.state
        manager = self.manager
        if state is None or state.new_slot not in {r.id for r in manager.journal.slots}:
            return []
        new_root = self._new_root()
        if state.rolling_back:
            waiting = manager.unacked(certificate_not_under(new_root)) + manager.served_under(
                new_root
            )
        elif state.done <= 1:
            waiting = manager.unacked(bundle_holds(new_root))
        elif state.done >= 3:
            waiting = manager.unacked(certificate_under(new_root)) + self._served_under_old_root()
        else:
            waiting = []
        return waiting + self._back()

    def status(self) -> dict[str, Any] | None:
        state = self.state
        if state is None:
            return None
        data = state.to_json()
        data["next_step"] = None if state.rolling_back else min(state.done + 1, LAST_STEP)
        data["next_step_title"] = (
            None if state.rolling_back else STEPS[min(state.done + 1, LAST_STEP)]
        )
        data["waiting_on"] = self.waiting_on()
        return data

    def _require_state(self) -> RootRotationState:
        state = self.state
        if state is None:
            raise RotationError("no root rotation is in progress: start it with step 1")
        return state

    def _new_root(self) -> x509.Certificate:
        state = self._require_state()
        if state.new_slot is None:
            raise RotationError("step 1 has not added a new root yet")
        return self.manager.ca(state.new_slot).root

    def _old_root(self) -> x509.Certificate | None:
        """The root being replaced; None once its slot is gone (step 5 was interrupted
        after removing it)."""
        old_slot = self._require_state().old_slot
        if not any(record.id == old_slot for record in self.manager.journal.slots):
            return None
        return self.manager.ca(old_slot).root

    def _served_under_old_root(self) -> list[str]:
        old_root = self._old_root()
        return self.manager.served_under(old_root) if old_root is not None else []

    async def _set_target(self, target: int) -> None:
        state = self.state
        if state is not None and state.target < target:
            async with self.manager.lock:
                await self.manager.set_root_rotation(replace(state, target=target))

    async def _mark_running(self, step: int) -> None:
        state = self._require_state()
        async with self.manager.lock:
            await self.manager.set_root_rotation(replace(state, running=step))

    async def _mark_done(self, step: int) -> None:
        state = self._require_state()
        async with self.manager.lock:
            await self.manager.set_root_rotation(replace(state, done=step, running=None))


def _check_step(step: int) -> None:
    if step not in STEPS:
        raise RotationError(f"there is no step {step}: the steps are 1 to {LAST_STEP}")
