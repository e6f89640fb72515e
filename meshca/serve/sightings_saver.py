"""Keeps ``<data-dir>/agents/sightings.json`` in step with the agents' sightings, off the
event loop and coalesced: agents poll every few seconds, the file is not rewritten per
poll.

What an agent acknowledged (a bundle, its SVID, a JWT key set) is saved within
:data:`SAVE_INTERVAL` of changing; a call that changed nothing but its time is saved
at most every :data:`IDLE_INTERVAL` (the time only names how long ago an agent called).
On the way out the latest state is saved once more, so a clean restart loses nothing; a
crash loses at most the last interval, and an agent acknowledges again at its next poll.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from meshca.ca_api.sightings import AgentSightings
from meshca.ca_api.sightings_file import SightingsFileError, load, save
from meshca.spiffe import TrustDomain
from meshca.util.aio import cancel_and_wait
from meshca.util.logger import get_logger

log = get_logger("meshca.ca_api")

SAVE_INTERVAL = 1.0
IDLE_INTERVAL = 30.0


class SightingsSaver:
    def __init__(
        self,
        sightings: AgentSightings,
        path: Path,
        *,
        interval: float = SAVE_INTERVAL,
        idle_interval: float = IDLE_INTERVAL,
    ) -> None:
        self.sightings = sightings
        self.path = Path(path)
        self.interval = interval
        self.idle_interval = idle_interval
        self._saved = (sightings.changes, sightings.calls)
        self._saved_at = time.monotonic()
        self._failing = False
        self._task: asyncio.Task[None] | None = None

    def load(self, trust_domain: TrustDomain) -> None:
        """Start from the saved sightings; a damaged file is reported in one line and
        ignored (every agent counts as unseen until its next poll)."""
        try:
            saved = load(self.path, trust_domain)
        except SightingsFileError as exc:
            log.error(
                "agent ACKs not restored (every agent counts as unseen until it polls): %s", exc
            )
            return
        self.sightings.restore(saved)
        self._saved = (self.sightings.changes, self.sightings.calls)
        if saved:
            log.info("restored the ACKs of %d agents from %s", len(saved), self.path)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="agent-sightings")

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        await self.save_if_changed(final=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.save_if_changed()

    async def save_if_changed(self, *, final: bool = False) -> None:
        changes, calls = self.sightings.changes, self.sightings.calls
        if (changes, calls) == self._saved:
            return
        recently = time.monotonic() - self._saved_at < self.idle_interval
        if changes == self._saved[0] and recently and not final:
            return  # only call times changed, and they were saved a moment ago
        snapshot = self.sightings.snapshot()
        try:
            await asyncio.to_thread(save, self.path, snapshot)
        except OSError as exc:
            if not self._failing:
                log.error("cannot save the agents' ACKs to %s: %s", self.path, exc)
            self._failing = True
            return
        if self._failing:
            log.info("agents' ACKs saved to %s again", self.path)
        self._failing = False
        self._saved = (changes, calls)
        self._saved_at = time.monotonic()
