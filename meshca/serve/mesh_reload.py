"""Keeps the mesh file current: re-read it when it changes, keep the last good one on error.

Polling the file's (mtime, size, inode) once a second works the same for editors that
rewrite in place, tools that rename a new file over the old one, and Kubernetes
ConfigMap volumes (a symlink swap), without a platform-specific watcher. The file is
read and validated in a worker thread, so serving never waits for a large file; the
size and alias limits of :func:`meshca.util.files.read_yaml` bound what it may cost.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

from meshca.envoy.mesh import Mesh, MeshError, load_mesh
from meshca.serve.config import DEFAULT_POLL_INTERVAL
from meshca.spiffe import TrustDomain
from meshca.util.aio import Periodic
from meshca.util.logger import get_logger

log = get_logger("meshca.mesh")

_Signature = tuple[int, int, int] | None


def _signature(path: Path) -> _Signature:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_mtime_ns, info.st_size, info.st_ino)


class MeshFile:
    """The current mesh from ``path``; ``on_change`` runs after each successful reload."""

    def __init__(
        self,
        path: Path,
        trust_domain: TrustDomain,
        on_change: Callable[[Mesh], None] | None = None,
        *,
        interval: float = DEFAULT_POLL_INTERVAL,
    ) -> None:
        self.path = Path(path)
        self.trust_domain = trust_domain
        self.on_change = on_change
        self.interval = interval
        self._signature = _signature(self.path)
        self.mesh = load_mesh(self.path, trust_domain)  # a bad file at start-up is fatal
        self.reloads = 0
        self.failed_reloads = 0
        self._poll = Periodic(self._reload, lambda: self.interval, log=log, what="mesh file check")

    def check(self) -> bool:
        """Reload if the file changed since the last look; True when a new mesh is in use."""
        return self._apply(self._load_if_changed())

    def _load_if_changed(self) -> Mesh | None:
        """The new mesh when the file changed and is valid (errors are logged: one line
        that never echoes the file); None otherwise. Runs in a worker thread when polled."""
        signature = _signature(self.path)
        if signature == self._signature:
            return None
        self._signature = signature  # a bad version is reported once, not every poll
        try:
            return load_mesh(self.path, self.trust_domain)
        except MeshError as exc:
            self.failed_reloads += 1
            log.error("mesh file not reloaded, still using the previous one: %s", exc)
            return None

    def _apply(self, mesh: Mesh | None) -> bool:
        if mesh is None:
            return False
        self.mesh = mesh
        self.reloads += 1
        log.info("mesh file %s reloaded: %d services", self.path, len(mesh.services))
        if self.on_change is not None:
            self.on_change(mesh)
        return True

    def start(self) -> None:
        self._poll.start()

    async def stop(self) -> None:
        await self._poll.stop()

    async def _reload(self) -> None:
        # Reading and validating a large file takes a while: never on the loop.
        self._apply(await asyncio.to_thread(self._load_if_changed))
