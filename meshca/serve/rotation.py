"""Rotation inside ``meshca serve``: the manager's schedule, root rotation resuming after
a restart, the start-up checks and the admin endpoint, started and stopped as one.

The server calls :func:`open_rotation` (the local CA's source, or Vault's for an
intermediate Vault signs; None when rotation does not apply), then
``await rotation.start()`` once serving and ``await rotation.close()`` on the way out.
A backend that holds roots of its own also gets ``backend_roots``, which the server's
bundle poll reads and hands to :meth:`RotationManager.follow_roots`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

from meshca.backends.opened import (
    IntermediateCa,
    IntermediateRotation,
    LocalCaRotation,
    OpenedBackend,
)
from meshca.issuer import ActiveSigner, TrustBundle
from meshca.rotation.acks import AckTracker, Combined
from meshca.rotation.admin import AdminServer, CaOperations
from meshca.rotation.checks import startup_checks
from meshca.rotation.journal import JournalLockedError
from meshca.rotation.jwt_keys import DEFAULT_JWT_KEY_TTL
from meshca.rotation.local_ca import LocalCaSource
from meshca.rotation.manager import (
    DEFAULT_ACTIVATE_FRACTION,
    DEFAULT_PREPARE_FRACTION,
    CaSource,
    RotationManager,
    RotationPolicy,
)
from meshca.rotation.operator import ADMIN_SOCKET
from meshca.rotation.root import DEFAULT_ACK_TIMEOUT, RootRotation
from meshca.rotation.rotator import Rotator
from meshca.rotation.vault_ca import VaultCaSource
from meshca.serve.config import ServeConfig
from meshca.serve.engine_acks import EngineAcks, EngineView
from meshca.store import SecretStore
from meshca.util.aio import cancel_and_wait
from meshca.util.logger import get_logger

log = get_logger("meshca.rotation")

# After a restart with no record of who was connected (a journal from an older
# version), proxies get this long to reconnect before an interrupted root rotation
# judges who has acknowledged what.
DEFAULT_RESUME_GRACE = 15.0
# How often the proxies connected during a root rotation are recorded beside the journal.
RECORD_INTERVAL = 1.0


@dataclass(frozen=True)
class RotationOptions:
    """What an operator tunes (the option table's ``rotation_*`` rows)."""

    prepare_fraction: float = DEFAULT_PREPARE_FRACTION
    activate_fraction: float = DEFAULT_ACTIVATE_FRACTION
    ca_ttl: timedelta | None = None  # new signing CAs; None: as long as the one replaced
    jwt_key_ttl: timedelta = DEFAULT_JWT_KEY_TTL
    ack_timeout: timedelta = DEFAULT_ACK_TIMEOUT
    resume_grace: timedelta = timedelta(seconds=DEFAULT_RESUME_GRACE)

    @classmethod
    def of(cls, config: ServeConfig) -> RotationOptions:
        """The options ``meshca serve`` was given (unset ones keep their defaults)."""
        options = cls()
        if config.rotation_prepare_at is not None:
            options = replace(options, prepare_fraction=config.rotation_prepare_at)
        if config.rotation_activate_at is not None:
            options = replace(options, activate_fraction=config.rotation_activate_at)
        if config.rotation_ca_ttl is not None:
            options = replace(options, ca_ttl=config.rotation_ca_ttl)
        if config.rotation_jwt_key_ttl is not None:
            options = replace(options, jwt_key_ttl=config.rotation_jwt_key_ttl)
        if config.rotation_ack_timeout is not None:
            options = replace(options, ack_timeout=config.rotation_ack_timeout)
        if config.rotation_resume_grace is not None:
            options = replace(options, resume_grace=config.rotation_resume_grace)
        return options

    def policy(self, leaf_ttl: timedelta) -> RotationPolicy:
        """RotationError when the fractions are out of order or range."""
        return RotationPolicy(
            prepare_fraction=self.prepare_fraction,
            activate_fraction=self.activate_fraction,
            leaf_ttl=leaf_ttl,
            jwt_key_ttl=self.jwt_key_ttl,
        )


class RotationService:
    def __init__(
        self,
        data_dir: Path,
        authority: ActiveSigner,
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
        self.rotator = Rotator(self.manager)
        self.rotation = RootRotation(self.manager, rotator=self.rotator, ack_timeout=ack_timeout)
        self.operations = CaOperations(self.manager, self.rotation)
        self.admin = AdminServer(self.operations, admin_socket or data_dir / ADMIN_SOCKET)
        self.resume_grace = resume_grace
        # The backend's own roots, for the server's bundle poll (Vault); None: local CA.
        self.backend_roots: Callable[[], TrustBundle] | None = None
        self._resume: asyncio.Task[None] | None = None
        self._recorder: asyncio.Task[None] | None = None

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
        self.rotator.start()
        # After a restart mid-rotation, wait for the proxies recorded before it; with no
        # record (written by an older version), give proxies a fixed grace to reconnect.
        recorded = self.rotation.expect_recorded()
        grace = 0.0 if recorded else self.resume_grace
        if self.manager.journal.root_rotation is not None and not recorded:
            self.rotation.hold_for_reconnects(grace)
        try:
            await self.admin.start()
        except BaseException:  # e.g. the admin socket is in use: leave nothing running
            self.rotator.stop()
            raise
        loop = asyncio.get_running_loop()
        self._resume = loop.create_task(self.rotation.resume(grace=grace))
        self._recorder = loop.create_task(self._record_connected())

    async def _record_connected(self) -> None:
        """Keep the record of connected proxies current while a root rotation runs."""
        failed = False
        while True:
            try:
                self.rotation.record_connected()
                failed = False
            except OSError as exc:
                if not failed:
                    log.error("cannot record the connected proxies: %s", exc)
                failed = True
            await asyncio.sleep(RECORD_INTERVAL)

    async def close(self) -> None:
        await self.admin.close()
        for task in (self._resume, self._recorder):
            if task is not None and not task.done():
                await cancel_and_wait(task)
        self.rotator.stop()
        self.manager.close()


def open_rotation(
    data_dir: Path,
    backend: OpenedBackend,
    store: SecretStore,
    engine: EngineView,
    leaf_ttl: timedelta,
    options: RotationOptions | None = None,
    agents: AckTracker | None = None,
) -> RotationService | None:
    """Rotation for a server, opened and checked (TtlError when the CA cannot cover the
    leaves, RotationError for bad options), with the CA source the backend declares:
    the data directory's keys, or intermediates Vault signs. None when the backend
    declares none (Vault's per-workload mode holds no CA), or when another process
    already rotates this data directory."""
    options = options or RotationOptions()
    policy = options.policy(leaf_ttl)
    acks: AckTracker = EngineAcks(engine, store)
    if agents is not None:  # attested agents are waited for like proxies
        acks = Combined(acks, agents)
    match backend.rotation:
        case IntermediateRotation(intermediate):
            return _vault_rotation(data_dir, intermediate, store, acks, leaf_ttl, options, policy)
        case LocalCaRotation(ca_data_dir, authority):
            source = LocalCaSource(ca_data_dir, authority.trust_domain, ca_ttl=options.ca_ttl)
            service = _service(data_dir, authority, store, acks, source, options, policy)
            return _opened(service, leaf_ttl, options.ca_ttl)
    return None


def _vault_rotation(
    data_dir: Path,
    backend: IntermediateCa,
    store: SecretStore,
    acks: AckTracker,
    leaf_ttl: timedelta,
    options: RotationOptions,
    policy: RotationPolicy,
) -> RotationService | None:
    authority = backend.active_signer
    roots = authority.bundle()  # Vault's roots as read at start (or stored, in an outage)
    source = VaultCaSource(backend, ca_ttl=options.ca_ttl)
    service = _service(data_dir, authority, store, acks, source, options, policy)
    opened = _opened(service, leaf_ttl, options.ca_ttl)
    if opened is not None:
        opened.manager.follow_roots_now(roots)
        opened.backend_roots = backend.roots
    return opened


def _service(
    data_dir: Path,
    authority: ActiveSigner,
    store: SecretStore,
    acks: AckTracker,
    source: CaSource,
    options: RotationOptions,
    policy: RotationPolicy,
) -> RotationService:
    return RotationService(
        data_dir,
        authority,
        store,
        acks=acks,
        source=source,
        policy=policy,
        ack_timeout=options.ack_timeout,
        resume_grace=options.resume_grace.total_seconds(),
    )


def _opened(
    service: RotationService, leaf_ttl: timedelta, ca_ttl: timedelta | None
) -> RotationService | None:
    try:
        service.open(leaf_ttl, ca_ttl=ca_ttl)
    except JournalLockedError as exc:
        log.warning("serving without CA rotation: %s", exc)
        return None
    return service
