"""``meshca serve --kubernetes``: the mesh, kept current from the API server.

One :class:`~meshca.kube.watch.Reflector` per kind (mesh Namespaces, Services,
EndpointSlices, Pods, and the policy objects: HTTPRoutes, AccessPolicies). The first
mesh is built only once every kind's first list is in, so a proxy never receives a mesh
with part of the services missing; after that each change to any cache marks the mesh
dirty and one rebuild follows a short quiet period (``debounce``), so a Deployment
rolled out pod by pod costs a few rebuilds, not one per event. A rebuild runs off the
event loop (thousands of pods) and hands the new mesh to ``on_change`` only when it
differs: the same path the mesh file's reload takes to ADS.

``on_verdicts`` receives every rebuild's policy objects and their verdicts (the hook
:class:`meshca.kube.status.StatusWriter` writes status and logs refusals from); without
it, refused objects are logged here. Unusable objects and left-out ports are logged,
each once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from meshca.envoy.model import Mesh
from meshca.kube.client import KubeApi
from meshca.kube.objects import (
    ACCESS_POLICIES,
    ENDPOINT_SLICES,
    HTTP_ROUTES,
    MESH_KINDS,
    NAMESPACES,
    PODS,
    POLICY_KINDS,
    SERVICES,
    Kind,
)
from meshca.kube.policy import Verdict
from meshca.kube.translate import ClusterState, Translation, build_mesh
from meshca.kube.watch import Reflector
from meshca.spiffe import TrustDomain
from meshca.util.logger import get_logger
from meshca.util.logs import shorten

log = get_logger("meshca.kube")

DEFAULT_DEBOUNCE = 0.1
_REMEMBERED = 4096  # distinct problem lines remembered (each is logged once)


class _Once:
    """Log each distinct line once; bounded, forgetting everything when full."""

    def __init__(self, limit: int = _REMEMBERED) -> None:
        self.limit = limit
        self._seen: set[str] = set()

    def __call__(self, level: int, line: str) -> None:
        line = shorten(line, 1000)
        if line in self._seen:
            return
        if len(self._seen) >= self.limit:
            self._seen.clear()
        self._seen.add(line)
        log.log(level, "%s", line)


class KubeMeshSource:
    """The current mesh from the API server; ``on_change`` after each new complete one."""

    def __init__(
        self,
        api: KubeApi,
        trust_domain: TrustDomain,
        on_change: Callable[[Mesh], None] | None = None,
        *,
        debounce: float = DEFAULT_DEBOUNCE,
        on_verdicts: Callable[[list[Mapping[str, Any]], Sequence[Verdict]], None] | None = None,
        reflector_options: dict[str, Any] | None = None,
        node_proxy: str | None = None,
    ) -> None:
        self.api = api
        self.node_proxy = node_proxy  # ns/sa of ambient node proxies
        self.trust_domain = trust_domain
        self.on_change = on_change
        self.on_verdicts = on_verdicts
        self.debounce = debounce
        self.mesh: Mesh | None = None  # None until every kind's first list is in
        self.builds = 0
        self.last_build_seconds = 0.0
        self._once = _Once()
        self._dirty = asyncio.Event()
        self._complete = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.reflectors = {
            kind.name: Reflector(
                api,
                kind,
                self._dirty.set,
                on_unusable=self._unusable,
                **(reflector_options or {}),
            )
            for kind in (*MESH_KINDS, *POLICY_KINDS)
        }

    def _unusable(self, kind: Kind, name: str, why: str) -> None:
        self._once(logging.WARNING, f"{kind.name} {name} left out of the mesh: {why}")

    # lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for reflector in self.reflectors.values():
            self._tasks.append(loop.create_task(reflector.run()))
        self._tasks.append(loop.create_task(self._build_loop()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await self.api.close()

    async def complete(self) -> Mesh:
        """The first complete mesh (waits for every kind's first list)."""
        await self._complete.wait()
        assert self.mesh is not None
        return self.mesh

    @property
    def synced(self) -> bool:
        return all(r.synced.is_set() for r in self.reflectors.values())

    # building -----------------------------------------------------------------------
    def state(self) -> ClusterState:
        """A copy of what the caches hold now (records are immutable: shallow copies)."""
        r = self.reflectors
        namespaces = list(r[NAMESPACES.name].items.values())
        return ClusterState(
            namespaces=frozenset(n.name for n in namespaces),
            namespace_labels={n.name: n.labels for n in namespaces},
            services=dict(r[SERVICES.name].items),
            slices=dict(r[ENDPOINT_SLICES.name].items),
            pods=dict(r[PODS.name].items),
            routes=list(r[HTTP_ROUTES.name].items.values()),
            access_policies=list(r[ACCESS_POLICIES.name].items.values()),
        )

    async def _build_loop(self) -> None:
        while True:
            await self._dirty.wait()
            if not self.synced:
                await asyncio.sleep(self.debounce)  # more lists to come
                continue
            await asyncio.sleep(self.debounce)  # let a burst of events settle
            self._dirty.clear()
            try:
                await self._build()
            except Exception:  # never lose the source to a surprise: keep the last mesh
                log.exception("building the mesh from the API server failed; keeping the last")

    async def _build(self) -> None:
        state = self.state()
        started = time.perf_counter()
        translation = await asyncio.to_thread(
            build_mesh, self.trust_domain, state, node_proxy=self.node_proxy
        )
        self.last_build_seconds = time.perf_counter() - started
        self.builds += 1
        self._report(translation)
        if self.on_verdicts is not None:
            self.on_verdicts([*state.routes, *state.access_policies], translation.verdicts)
        mesh = translation.mesh
        first = self.mesh is None
        if not first and mesh == self.mesh:
            return
        self.mesh = mesh
        if first:
            log.info(
                "mesh from the API server complete: %d services, %d workloads, "
                "%d splits, %d access policies",
                len(mesh.services),
                len(mesh.workloads),
                len(mesh.traffic_splits),
                len(mesh.policies),
            )
            self._complete.set()
        else:
            log.info(
                "mesh from the API server changed: %d services, %d workloads",
                len(mesh.services),
                len(mesh.workloads),
            )
        if self.on_change is not None:
            self.on_change(mesh)

    def _report(self, translation: Translation) -> None:
        for problem in translation.problems:
            self._once(logging.WARNING, problem)
        if self.on_verdicts is not None:
            return  # the status writer logs each change of verdict
        for verdict in translation.verdicts:
            if not verdict.accepted:
                self._once(
                    logging.WARNING,
                    f"{verdict.ref} (generation {verdict.generation}) not applied: "
                    + "; ".join(verdict.problems()),
                )
