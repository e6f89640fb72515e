"""Rotation inside ``meshca serve``: the manager's schedule, root rotation resuming after
a restart, the start-up checks and the admin endpoint, started and stopped as one.

For the local CA the server calls :func:`local_rotation` (None when rotation does not
apply), then ``await rotation.start()`` once serving and ``await rotation.close()`` on
the way out. Another backend builds a :class:`RotationService` with its own source.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta
from pathlib import Path

from meshca.backends.local import ca_exists, load_local_ca
from meshca.issuer import SignerAuthority, SigningAuthority
from meshca.rotation.acks import AckTracker
from meshca.rotation.admin import ADMIN_SOCKET, AdminServer, CaOperations
from meshca.rotation.checks import startup_checks
from meshca.rotation.engine_acks import Engine, EngineAcks
from meshca.rotation.journal import JournalLockedError
from meshca.rotation.local_ca import LocalCaSource
from meshca.rotation.manager import CaSource, RotationManager, RotationPolicy
from meshca.rotation.root import DEFAULT_ACK_TIMEOUT, RootRotation
from meshca.store import SecretStore

log = logging.getLogger("meshca.rotation")

# After a restart, proxies reconnect (Envoy retries with backoff) before an interrupted
# root rotation judges who has acknowledged what.
DEFAULT_RESUME_GRACE = 15.0


class RotationService:
    def __init__(
        self,
        data_dir: Path,
        authority: SignerAuthority,
        store: SecretStore | None,
        *,
        acks: AckTracker | None = None,
        source: CaSource | None = None,
        policy: RotationPolicy | None = None,
        ack_timeout: timedelta = DEFAULT_ACK_TIMEOUT,
        admin_socket: Path | None = None,
        resume_grace: float = DEFAULT_RESUME_GRACE,
    ) -> None:
        data_dir = Path(data_dir)
        source = source or LocalCaSource(data_dir, authority.trust_domain)
        self.manager = RotationManager(
            data_dir, authority, source, store=store, acks=acks, policy=policy
        )
        self.rotation = RootRotation(self.manager, ack_timeout=ack_timeout)
        self.operations = CaOperations(self.manager, self.rotation)
        self.admin = AdminServer(self.operations, admin_socket or data_dir / ADMIN_SOCKET)
        self.resume_grace = resume_grace
        self._resume: asyncio.Task[None] | None = None

    def open(self, leaf_ttl: timedelta, *, ca_ttl: timedelta | None = None) -> list[str]:
        """Take the journal, finish an interrupted CA creation, and run the start-up
        checks (TtlError when the CA cannot cover the leaves). Returns the warnings."""
        self.manager.open()
        try:
            return startup_checks(self.manager, leaf_ttl, ca_ttl=ca_ttl)
        except BaseException:
            self.manager.close()
            raise

    async def start(self) -> None:
        self.manager.start()
        await self.admin.start()
        self._resume = asyncio.get_running_loop().create_task(
            self.rotation.resume(grace=self.resume_grace)
        )

    async def close(self) -> None:
        await self.admin.close()
        if self._resume is not None and not self._resume.done():
            self._resume.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._resume
        self.manager.close()


def local_rotation(
    data_dir: Path,
    authority: SigningAuthority,
    store: SecretStore,
    engine: Engine,
    leaf_ttl: timedelta,
) -> RotationService | None:
    """Rotation for a server signing with the data directory's local CA, opened and
    checked (TtlError when the CA cannot cover the leaves). None when the authority is
    another backend's, or when another process already rotates this data directory."""
    if not isinstance(authority, SignerAuthority) or not ca_exists(data_dir):
        return None
    if authority.bundle() != load_local_ca(data_dir).bundle:
        return None
    service = RotationService(data_dir, authority, store, acks=EngineAcks(engine, store))
    try:
        service.open(leaf_ttl)
    except JournalLockedError as exc:
        log.warning("serving without CA rotation: %s", exc)
        return None
    return service
