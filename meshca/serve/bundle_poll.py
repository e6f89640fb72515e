"""The server's poll of a backend's roots: a root added inside the backend (a new Vault
issuer) reaches the trust bundle, and every proxy, without a restart.

A backend whose bundle can change outside meshca declares it (``OpenedBackend.roots``,
whose ``refresh_bundle()`` re-reads and adopts the roots, blocking). When the
signing-CA rotation machinery manages the backend's CA (Vault's intermediate mode),
the roots are read with the rotation service's ``backend_roots`` and handed to the
manager, which keeps the journal, the authority and the store in step. Roots are read
every ``interval`` seconds (60), and every ``outage_interval`` (5) while the backend
reports itself unreachable. The local CA needs no poll: its bundle changes only through
rotation, in this process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from meshca.backends.opened import BackendHealth, OpenedBackend
from meshca.issuer import IssuerError, TrustBundle
from meshca.serve.config import DEFAULT_BACKEND_POLL_INTERVAL
from meshca.serve.rotation import RotationService
from meshca.store import SecretStore
from meshca.util.aio import Periodic
from meshca.util.logger import get_logger

log = get_logger("meshca.server")

DEFAULT_INTERVAL = DEFAULT_BACKEND_POLL_INTERVAL  # 60 s
DEFAULT_OUTAGE_INTERVAL = 5.0


class BundlePoll:
    def __init__(
        self,
        health: BackendHealth | None,
        poll: Callable[[], Awaitable[bool]],
        *,
        interval: float = DEFAULT_INTERVAL,
        outage_interval: float = DEFAULT_OUTAGE_INTERVAL,
    ) -> None:
        self.health = health
        self._poll = poll
        self.interval = interval
        self.outage_interval = outage_interval
        self._failing: str | None = None
        self._periodic = Periodic(
            self.poll, self._next_interval, log=log, what="applying the backend's roots"
        )

    async def poll(self) -> bool:
        """Read the roots once and apply them; returns whether the bundle changed.
        A failure (Vault unreachable) is logged once per streak and leaves the bundle
        as it was."""
        try:
            changed = await self._poll()
        except IssuerError as exc:
            if self._failing is None:
                log.warning("reading the backend's roots failed (%s); the bundle is unchanged", exc)
            self._failing = str(exc)
            return False
        if self._failing is not None:
            log.info("the backend's roots are readable again")
            self._failing = None
        return changed

    def _next_interval(self) -> float:
        reachable = self.health is None or self.health.healthy
        return self.interval if reachable and self._failing is None else self.outage_interval

    def start(self) -> None:
        self._periodic.start()

    async def stop(self) -> None:
        await self._periodic.stop()


def bundle_poll(
    backend: OpenedBackend,
    store: SecretStore,
    rotation: RotationService | None,
    *,
    interval: float = DEFAULT_INTERVAL,
    outage_interval: float = DEFAULT_OUTAGE_INTERVAL,
) -> BundlePoll | None:
    """The poll for ``backend``, or None when its bundle cannot change outside meshca."""
    intervals = {"interval": interval, "outage_interval": outage_interval}
    roots = rotation.backend_roots if rotation is not None else None
    if roots is not None and rotation is not None:
        manager = rotation.manager
        read_roots: Callable[[], TrustBundle] = roots

        async def follow() -> bool:
            return await manager.follow_roots(await asyncio.to_thread(read_roots))

        return BundlePoll(backend.health, follow, **intervals)
    source = backend.roots
    if source is None:
        return None

    async def adopt() -> bool:
        await asyncio.to_thread(source.refresh_bundle)
        return store.refresh_bundle()

    return BundlePoll(backend.health, adopt, **intervals)
