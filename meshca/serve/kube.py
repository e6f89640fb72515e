"""``--kubernetes``: the mesh from the API server, for a running ``meshca serve``.

The runtime's side of :mod:`meshca.kube.source`, as :mod:`meshca.serve.mesh_reload` is
the mesh file's: it opens the client from the kubeconfig or the pod's service account
(a bad configuration refuses to start, in one line), starts the watches and the writer
of policy objects' status (:class:`meshca.kube.status.StatusWriter`), and holds
``start`` until the first complete mesh, saying every 30 s what it still waits for, so
that nothing is served from half a cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from meshca.envoy.model import Mesh
from meshca.kube.client import KubeApi, KubeConfigError, KubeTarget, load_config
from meshca.kube.source import KubeMeshSource
from meshca.kube.status import StatusWriter
from meshca.serve.config import ServeConfig, ServeError
from meshca.spiffe import TrustDomain
from meshca.util.logger import get_logger

log = get_logger("meshca.kube")

WAITING_NOTICE = 30.0  # seconds between "still waiting" lines before the first mesh


class KubeSource:
    """The watches and where they point; ``first_mesh`` then ``stop``."""

    def __init__(self, source: KubeMeshSource, target: KubeTarget, status: StatusWriter) -> None:
        self.source = source
        self.target = target
        self.status = status
        self._status_task: asyncio.Task[None] | None = None

    @classmethod
    def open(
        cls, config: ServeConfig, trust_domain: TrustDomain, on_change: Callable[[Mesh], None]
    ) -> KubeSource:
        try:
            kube_config, target = load_config(config.kubeconfig)
            api = KubeApi(kube_config)
        except KubeConfigError as exc:
            raise ServeError(f"--kubernetes: {exc}") from None
        status = StatusWriter(api.merge_patch)
        source = KubeMeshSource(
            api,
            trust_domain,
            on_change,
            debounce=config.kube_debounce,
            on_verdicts=status.submit,
            node_proxy=config.kube_node_proxy,
        )
        return cls(source, target, status)

    async def first_mesh(self) -> Mesh:
        """Start the watches; the first complete mesh."""
        log.info("reading the mesh from the Kubernetes API at %s (%s)", *self._where())
        self.source.start()
        self._status_task = asyncio.get_running_loop().create_task(self.status.run())
        while True:
            try:
                return await asyncio.wait_for(self.source.complete(), WAITING_NOTICE)
            except TimeoutError:
                missing = [k for k, r in self.source.reflectors.items() if not r.synced.is_set()]
                log.warning(
                    "still waiting for the API server's first lists of %s: nothing is served "
                    "until the whole mesh is known",
                    ", ".join(missing) or "nothing (building)",
                )

    def _where(self) -> tuple[str, str]:
        return self.target.server, self.target.source

    async def stop(self) -> None:
        if self._status_task is not None:
            self._status_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._status_task
        await self.source.stop()
