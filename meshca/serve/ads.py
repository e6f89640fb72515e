"""Serving the mesh over ADS: the generated resource types as sources of the xDS engine.

Wiring, next to :mod:`meshca.serve.server`: it joins :mod:`meshca.envoy` (the mesh model and
the resources generated from it) to :mod:`meshca.sds` (the xDS engine and the Secret
source), which know nothing of each other.

Each stream's clusters, endpoints, listeners and routes come from the snapshot
generated for the caller's *authenticated* identity
(:func:`meshca.envoy.generate.generate`); the node only picks among the caller's own
identities and says how its traffic is captured and which of the identity's workloads
it fronts. Secrets on the same stream come from the
:class:`~meshca.sds.secrets.SecretSource`, so a caller receives only its own private
key on ADS exactly as on SDS.

:func:`ads_sources` lists the sources in the order Envoy needs them (the engine pushes
in that order): clusters before their endpoints, listeners before their routes,
secrets last (Envoy holds a cluster or listener warming until its secrets arrive). A
mesh change wakes every stream; each sends only the types whose content changed for
its proxy. A cluster, endpoint, listener or route name that is not in the proxy's
configuration is absent, not an error that ends the stream: a mesh change can race
with Envoy's request for a name the previous configuration gave it. The same holds for
secrets whose name no longer exists (``root-cert-for-mtls-outbound:<ns>/<svc>`` of a
service removed from the file, asked for again by a reconnecting proxy): absent, and
removed from a Delta stream that held it; a forbidden or malformed name still ends
the stream.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import any_pb2

from meshca.envoy.ads_bootstrap import CAPTURE_METADATA, LAYOUT_METADATA, WORKLOAD_METADATA
from meshca.envoy.delta import mesh_delta
from meshca.envoy.generate import generate
from meshca.envoy.mesh import Mesh, MeshError
from meshca.envoy.model import AMBIENT
from meshca.envoy.snapshot import Snapshot
from meshca.sds.secrets import SecretSource
from meshca.spiffe import SpiffeId
from meshca.xds.auth import Caller, Forbidden, node_identities
from meshca.xds.engine import (
    Resolution,
    Resource,
    ResourceError,
    StreamHandle,
    StreamRefused,
    XdsEngine,
)
from meshca.xds.limits import CallerLimits
from meshca.xds.resources import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    GENERATED_TYPES,
    LISTENER_TYPE,
    ROUTE_TYPE,
    SECRET_TYPE,
)
from meshca.xds.stats import XdsStats

ProxyKey = tuple[SpiffeId, str, str | None, str | None]
# The types generated from the mesh, in the order Envoy needs them; secrets come last.


def _metadata(node: Any, key: str) -> str | None:
    if node is None:
        return None
    fields = node.metadata.fields
    if key in fields and fields[key].WhichOneof("kind") == "string_value":
        return str(fields[key].string_value) or None
    return None


def proxy_key(caller: Caller, node: Any) -> ProxyKey:
    """(identity, capture, workload, layout) of the proxy on a stream; StreamRefused if
    unclear."""
    try:
        identities = node_identities(caller, node)
    except Forbidden as exc:
        raise StreamRefused(grpc.StatusCode.PERMISSION_DENIED, str(exc)) from None
    if len(identities) != 1:
        raise StreamRefused(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"caller {caller} holds several identities: set node.id to the SPIFFE ID this "
            "proxy runs as",
        )
    capture = _metadata(node, CAPTURE_METADATA) or "intercept"
    layout = _metadata(node, LAYOUT_METADATA)
    return identities[0], capture, _metadata(node, WORKLOAD_METADATA), layout


@dataclass
class _Generated:
    """A proxy's snapshot, valid for ``mesh``; ``reaches``: the keys of the services it
    may reach (what its configuration depends on besides its own identity), None for a
    node proxy (regenerated on every change)."""

    mesh: Mesh
    snapshot: Snapshot
    reaches: frozenset[str] | None
    resources: dict[str, dict[str, Resource]] = field(default_factory=dict)

    def of_type(self, type_url: str) -> dict[str, Resource]:
        built = self.resources.get(type_url)
        if built is None:
            built = self.resources[type_url] = {
                name: Resource(
                    name,
                    self.snapshot.resource_version(type_url, name) or "",
                    any_pb2.Any(type_url=type_url, value=data),
                )
                for name, data in self.snapshot.encoded.get(type_url, {}).items()
            }
        return built


class ProxySnapshots:
    """The current snapshot per proxy, generated once per mesh version, and kept across
    mesh versions for proxies none of whose inputs changed (:mod:`meshca.envoy.delta`)."""

    def __init__(self, mesh: Callable[[], Mesh]) -> None:
        self.mesh = mesh
        self._generated: dict[ProxyKey, _Generated] = {}
        self._seen: Mesh | None = None  # the mesh the kept snapshots were checked against

    def snapshot(self, caller: Caller, node: Any) -> Snapshot:
        return self._current(proxy_key(caller, node)).snapshot

    def resources(self, caller: Caller, node: Any, type_url: str) -> dict[str, Resource]:
        return self._current(proxy_key(caller, node)).of_type(type_url)

    def _current(self, key: ProxyKey) -> _Generated:
        mesh = self.mesh()
        if self._seen is None:
            self._seen = mesh
        generated = self._generated.get(key)
        if generated is None or generated.mesh is not mesh:
            identity, capture, workload, layout = key
            try:
                snapshot = generate(
                    mesh, identity, capture=capture, workload=workload, layout=layout
                )
            except MeshError as exc:
                raise StreamRefused(
                    grpc.StatusCode.FAILED_PRECONDITION, f"no configuration for {identity}: {exc}"
                ) from None
            reaches = None
            if layout != AMBIENT and mesh.node_proxied_by(identity) is None:
                reaches = frozenset(service.key for service, _ in mesh.reachable(identity))
            generated = self._generated[key] = _Generated(mesh, snapshot, reaches)
        return generated

    def keep_only(self, keys: set[ProxyKey]) -> None:
        """Drop the snapshots of proxies no longer connected: kept across mesh versions,
        they would otherwise pile up."""
        self._generated = {k: g for k, g in self._generated.items() if k in keys}

    def forget_stale(self) -> Callable[[ProxyKey], bool] | None:
        """After a mesh change: keep the snapshots of proxies whose inputs are the same in
        the new mesh, drop the others (regenerated on next use). Returns which proxies
        may have changed, None for all of them."""
        mesh = self.mesh()
        previous, self._seen = self._seen, mesh
        delta = mesh_delta(previous, mesh) if previous is not None else None
        if delta is None:
            self._generated = {k: g for k, g in self._generated.items() if g.mesh is mesh}
            return None

        def affected(key: ProxyKey) -> bool:
            generated = self._generated.get(key)
            return (
                generated is None
                or generated.reaches is None
                or delta.affects(key[0], generated.reaches)
            )

        kept = {}
        for key, generated in self._generated.items():
            if generated.mesh is mesh:
                kept[key] = generated
            elif generated.mesh is previous and not affected(key):
                generated.mesh = mesh
                kept[key] = generated
        self._generated = kept
        return affected


class SnapshotSource:
    """One generated resource type as an engine source.

    Clusters and listeners are wildcard subscriptions (Envoy asks for all of them);
    endpoints and routes are asked for by name. A name that is not in the proxy's
    configuration is NOT_FOUND (absent on the ADS engine): a proxy gets only what its
    identity may reach.
    """

    def __init__(self, type_url: str, wildcard: bool, snapshots: ProxySnapshots) -> None:
        self.type_url = type_url
        self.wildcard = wildcard
        self.snapshots = snapshots

    async def resolve(self, caller: Caller, node: Any, names: frozenset[str] | None) -> Resolution:
        available = self.snapshots.resources(caller, node, self.type_url)
        if names is None:
            return dict(available)
        kind = self.type_url.rsplit(".", 1)[1]
        return {
            name: available.get(name)
            or ResourceError(
                grpc.StatusCode.NOT_FOUND, f"{kind} {name!r} is not in this proxy's configuration"
            )
            for name in names
        }

    def watch(self, stream: StreamHandle, names: frozenset[str] | None) -> None:
        """Nothing to track per name: a mesh change wakes every stream."""

    def unwatch(self, stream: StreamHandle) -> None:
        """See :meth:`watch`."""


def ads_sources(snapshots: ProxySnapshots, secrets: SecretSource) -> list[Any]:
    """The five ADS types in the order Envoy needs them."""
    return [
        SnapshotSource(CLUSTER_TYPE, True, snapshots),
        SnapshotSource(ENDPOINT_TYPE, False, snapshots),
        SnapshotSource(LISTENER_TYPE, True, snapshots),
        SnapshotSource(ROUTE_TYPE, False, snapshots),
        secrets,
    ]


class MeshAds:
    """The ADS engine over a changing mesh; ``mesh_changed`` after each reload."""

    def __init__(
        self,
        mesh: Callable[[], Mesh],
        secrets: SecretSource,
        stats: XdsStats | None = None,
        limits: CallerLimits | None = None,
    ) -> None:
        self.snapshots = ProxySnapshots(mesh)
        self.engine = XdsEngine(
            ads_sources(self.snapshots, secrets),
            stats,
            limits=limits,
            absent_types=(*GENERATED_TYPES, SECRET_TYPE),
        )

    def mesh_changed(self) -> None:
        """Push the new mesh: every type to the proxies it may have changed, secrets
        (whose access rules follow the mesh too) to every stream."""
        affected = self.snapshots.forget_stale()
        if affected is None:
            self.engine.wake_all()
            return

        connected: set[ProxyKey] = set()

        def types(caller: Caller, node: Any) -> str | None:
            try:
                key = proxy_key(caller, node)
            except StreamRefused:
                return None  # all types: resolving refuses it as it should
            connected.add(key)
            return None if affected(key) else SECRET_TYPE

        self.engine.wake_each(types)
        self.snapshots.keep_only(connected)
