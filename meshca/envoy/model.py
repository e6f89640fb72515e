"""The mesh model: workloads, services, traffic splits and access policies.

Plain frozen values with deterministic ordering; parsing and validation live in
:mod:`meshca.envoy.mesh`. The derived views every consumer needs (a service's
endpoints and identities, who may call what, what an identity may reach) are
computed once per :class:`Mesh` and cached on it, because a mesh with thousands of
workloads is queried once per proxy.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from meshca.spiffe import SpiffeId, TrustDomain

PROTOCOLS = ("http", "tcp", "grpc")
EGRESS_MODES = ("blackhole", "passthrough")
MTLS_MODES = ("strict", "permissive")
LAYOUTS = ("osm", "istio-sidecar", "ambient")
DEFAULT_LAYOUT = "osm"
AMBIENT = "ambient"
DEFAULT_CLUSTER_DOMAIN = "cluster.local"
# ports the proxy itself listens on in intercept mode: an app port there would clash
RESERVED_PORTS = {
    15001: "the outbound capture listener",
    15003: "OSM's inbound capture listener",
    15006: "Istio's inbound capture listener",
    15008: "the HBONE tunnel port",
}

Labels = tuple[tuple[str, str], ...]


class MeshError(ValueError):
    """A mesh file that cannot be used; the message points at the offending entry."""


def labels_of(mapping: Mapping[str, str]) -> Labels:
    return tuple(sorted(mapping.items()))


def matches(selector: Labels, labels: Labels) -> bool:
    """Kubernetes selector semantics: every selector pair is present in ``labels``."""
    have = dict(labels)
    return all(have.get(key) == value for key, value in selector)


@dataclass(frozen=True, order=True)
class ServicePort:
    """A port a service exposes; traffic goes to ``target_port`` on its workloads.

    ``timeout`` bounds a whole HTTP request through the caller's proxy, in seconds; 0
    means none (OSM and Istio both disable Envoy's default of 15 s).
    """

    port: int
    protocol: str = "http"
    target_port: int | None = None
    timeout: int = 0

    @property
    def target(self) -> int:
        return self.port if self.target_port is None else self.target_port


@dataclass(frozen=True, order=True)
class WorkloadPort:
    port: int
    protocol: str = "http"


@dataclass(frozen=True, order=True)
class Workload:
    """One instance (a pod, a VM process) running as ``service_account``.

    ``address`` receives the mesh's traffic for it (the pod IP). ``app_address`` is where
    the application itself listens behind its proxy. ``outbound_address``, in explicit
    capture mode only, is where this proxy binds its outbound listeners instead of each
    service's ClusterIP, so that several proxies can share one host. ``layout`` names
    the Envoy layout its proxy gets (None: the proxy's bootstrap says, else ``osm``).
    """

    namespace: str
    name: str
    service_account: str
    address: str
    ports: tuple[WorkloadPort, ...] = ()
    labels: Labels = ()
    app_address: str = "127.0.0.1"
    outbound_address: str | None = None
    layout: str | None = None
    node: str | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def ambient(self) -> bool:
        return self.layout == AMBIENT

    def port(self, number: int) -> WorkloadPort | None:
        return next((p for p in self.ports if p.port == number), None)


@dataclass(frozen=True, order=True)
class Node:
    """A host whose ``ambient`` workloads share one node proxy, which authenticates to
    meshca as ``identity`` and may obtain exactly those workloads' certificates."""

    name: str
    identity: SpiffeId


@dataclass(frozen=True)
class Service:
    """A named set of workloads behind one address (the ClusterIP).

    Backed by the workloads its ``selector`` matches in its namespace, or by the
    ``backends`` it names (``ns/name``). ``service_accounts`` is the older form that
    names identities without workloads; it still defines the service's identities (for
    SDS validation contexts) but gives no endpoints. ``mtls`` is ``strict`` (callers
    must present a certificate) or ``permissive`` (its workloads also accept plaintext
    on its target ports, told apart from mTLS by transport detection).
    """

    name: str
    namespace: str
    ports: tuple[ServicePort, ...]
    service_accounts: tuple[str, ...] = ()
    address: str | None = None
    selector: Labels | None = None
    backends: tuple[str, ...] = ()
    mtls: str = "strict"
    cluster_domain: str = DEFAULT_CLUSTER_DOMAIN

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def has_workloads(self) -> bool:
        return self.selector is not None or bool(self.backends)

    def port(self, number: int) -> ServicePort | None:
        return next((p for p in self.ports if p.port == number), None)

    def hostnames(self) -> tuple[str, ...]:
        """Every name a client may use for it (Kubernetes DNS forms)."""
        base = f"{self.name}.{self.namespace}"
        partial = f"{base}.svc.{self.cluster_domain.split('.')[0]}"
        forms = (self.name, base, f"{base}.svc", partial, self.sni)
        return tuple(dict.fromkeys(forms))

    @property
    def sni(self) -> str:
        """The fully qualified name (Kubernetes DNS under the mesh's cluster domain)."""
        return f"{self.name}.{self.namespace}.svc.{self.cluster_domain}"


@dataclass(frozen=True, order=True)
class SplitBackend:
    """A share of a service's traffic: the service's workloads that carry ``labels``."""

    name: str
    labels: Labels
    weight: int


@dataclass(frozen=True, order=True)
class TrafficSplit:
    service: str  # ns/name
    backends: tuple[SplitBackend, ...]


@dataclass(frozen=True)
class Callers:
    """Who may call a service port: exact identities, every identity of some namespaces
    (``ns/*``), or every identity of the trust domain (``*``)."""

    identities: frozenset[SpiffeId] = frozenset()
    namespaces: frozenset[str] = frozenset()
    anyone: bool = False

    def __or__(self, other: Callers) -> Callers:
        return Callers(
            self.identities | other.identities,
            self.namespaces | other.namespaces,
            self.anyone or other.anyone,
        )

    def admits(self, caller: SpiffeId) -> bool:
        """Within the trust domain (the caller checks that): is ``caller`` one of these?"""
        if self.anyone or caller in self.identities:
            return True
        kube = caller.kubernetes
        return kube is not None and kube[0] in self.namespaces


NOBODY = Callers()
ANYONE = Callers(anyone=True)


@dataclass(frozen=True, order=True)
class AccessPolicy:
    """``sources`` may call ``service`` on ``ports`` (every port when empty); so may every
    identity of ``namespaces``, and, with ``anyone``, every identity of the mesh."""

    service: str  # ns/name
    sources: tuple[SpiffeId, ...]
    ports: tuple[int, ...] = ()
    namespaces: tuple[str, ...] = ()
    anyone: bool = False

    @property
    def callers(self) -> Callers:
        return Callers(frozenset(self.sources), frozenset(self.namespaces), self.anyone)


@dataclass(frozen=True)
class Mesh:
    trust_domain: TrustDomain
    services: tuple[Service, ...] = ()
    workloads: tuple[Workload, ...] = ()
    traffic_splits: tuple[TrafficSplit, ...] = ()
    policies: tuple[AccessPolicy, ...] = ()
    permissive: bool = False
    egress: str = "blackhole"
    nodes: tuple[Node, ...] = ()
    cluster_domain: str = DEFAULT_CLUSTER_DOMAIN

    @classmethod
    def empty(cls, trust_domain: TrustDomain) -> Mesh:
        return cls(trust_domain)

    @cached_property
    def _index(self) -> _Index:
        return _Index(self)

    def with_policy(
        self, traffic_splits: tuple[TrafficSplit, ...], policies: tuple[AccessPolicy, ...]
    ) -> Mesh:
        """This mesh with these splits and access policies instead of its own. Its
        services and workloads are the same, so what was derived from them alone
        (endpoints, identities: most of the indexing of a large mesh) is reused, not
        recomputed."""
        mesh = dataclasses.replace(self, traffic_splits=traffic_splits, policies=policies)
        if "_index" in self.__dict__:  # a cached_property's value
            mesh.__dict__["_index"] = _Index(mesh, self.__dict__["_index"])
        return mesh

    @cached_property
    def derived(self) -> dict[Hashable, Any]:
        """Artefacts other modules compute from this mesh and share between proxies
        (generated endpoints, per-identity outbound resources); they live as long as the
        mesh, which never changes. Treat what is stored here as read-only."""
        return {}

    def service(self, namespace: str, name: str) -> Service | None:
        return self._index.services.get(f"{namespace}/{name}")

    def workload(self, namespace: str, name: str) -> Workload | None:
        return self._index.workloads.get(f"{namespace}/{name}")

    def identity_of(self, workload: Workload) -> SpiffeId:
        return _kubernetes_identity(workload.namespace, workload.service_account, self.trust_domain)

    def endpoints(self, service: Service) -> tuple[Workload, ...]:
        """The workloads behind ``service``, sorted by namespace/name."""
        return self._index.endpoints.get(service.key, ())

    def service_identities(self, namespace: str, name: str) -> tuple[SpiffeId, ...] | None:
        """The SPIFFE IDs backing a service (sorted), or None when the service is unknown."""
        service = self.service(namespace, name)
        if service is None:
            return None
        return self._index.identities[service.key]

    def node(self, name: str) -> Node | None:
        return self._index.nodes.get(name)

    def node_proxied_by(self, identity: SpiffeId) -> Node | None:
        """The node whose node proxy authenticates as ``identity``, if any."""
        return self._index.node_by_identity.get(identity)

    def ambient_workloads(self, node: Node) -> tuple[Workload, ...]:
        """The ``ambient`` workloads on ``node`` (its node proxy carries their traffic)."""
        return self._index.ambient_on.get(node.name, ())

    def node_proxies_of(self, identity: SpiffeId) -> frozenset[SpiffeId]:
        """The node proxies that may hold ``identity``'s key: those of the nodes where an
        ``ambient`` workload runs as it."""
        return self._index.proxies_of.get(identity, frozenset())

    def split_for(self, service: Service) -> TrafficSplit | None:
        return self._index.splits.get(service.key)

    def workloads_of(self, identity: SpiffeId) -> tuple[Workload, ...]:
        return self._index.by_identity.get(identity, ())

    def services_of(self, workload: Workload) -> tuple[Service, ...]:
        """The services whose endpoints include ``workload``."""
        return self._index.services_of.get(workload.key, ())

    def allowed_callers(self, service: Service, port: int) -> Callers:
        """Who of the trust domain may call ``service`` on ``port``."""
        if self.permissive:
            return ANYONE
        return self._index.callers.get((service.key, port), NOBODY)

    def may_call(self, caller: SpiffeId, service: Service, port: int) -> bool:
        if caller.trust_domain != self.trust_domain:
            return False
        return self.allowed_callers(service, port).admits(caller)

    def may_reach(self, caller: SpiffeId, namespace: str, name: str) -> bool:
        """Whether ``caller`` may call service ``namespace/name`` on any port (a policy
        lists it, or the mesh is permissive): only then may it learn who serves it."""
        if caller.trust_domain != self.trust_domain:
            return False
        if self.permissive:
            return True
        key = f"{namespace}/{name}"
        return any(p.service == key and p.callers.admits(caller) for p in self.policies)

    def reachable(self, caller: SpiffeId) -> tuple[tuple[Service, ServicePort], ...]:
        """The (service, port) pairs ``caller`` may call, sorted; only services with an address."""
        if caller.trust_domain != self.trust_domain:
            return ()
        if self.permissive:
            return self._index.addressable
        index = self._index
        found = set(index.reach_any) | set(index.reach.get(caller, ()))
        kube = caller.kubernetes
        if kube is not None:
            found.update(index.reach_namespace.get(kube[0], ()))
        return tuple(index.addressable[i] for i in sorted(found))


class _Index:
    """Lookups derived from a mesh, built once (the mesh is immutable). Given ``same``,
    the index of a mesh with the same services, workloads and nodes, the lookups that
    depend on nothing else are taken from it. ``_policy_side`` computes every lookup
    that depends on the splits, the access policies or the access mode."""

    def __init__(self, mesh: Mesh, same: _Index | None = None) -> None:
        if same is None:
            self._workload_side(mesh)
        else:  # all of it; what depends on the policy is recomputed just below
            self.__dict__.update(same.__dict__)
        self._policy_side(mesh)

    def _workload_side(self, mesh: Mesh) -> None:
        self.services = {s.key: s for s in mesh.services}
        self.workloads = {w.key: w for w in mesh.workloads}
        ordered = _sorted_workloads(mesh.workloads, unique=len(self.workloads))
        by_identity: dict[SpiffeId, list[Workload]] = defaultdict(list)
        for workload in ordered:
            by_identity[mesh.identity_of(workload)].append(workload)
        self.by_identity = {k: tuple(v) for k, v in by_identity.items()}
        self.nodes = {n.name: n for n in mesh.nodes}
        self.node_by_identity = {n.identity: n for n in mesh.nodes}
        ambient_on: dict[str, list[Workload]] = defaultdict(list)
        proxies_of: dict[SpiffeId, set[SpiffeId]] = defaultdict(set)
        for workload in ordered:
            node = self.nodes.get(workload.node or "")
            if workload.ambient and node is not None:
                ambient_on[node.name].append(workload)
                proxies_of[mesh.identity_of(workload)].add(node.identity)
        self.ambient_on = {k: tuple(v) for k, v in ambient_on.items()}
        self.proxies_of = {k: frozenset(v) for k, v in proxies_of.items()}
        # (namespace, label, value) -> the positions in ``ordered`` of the workloads that
        # carry it: a selector's workloads are the intersection of its pairs' sets, not a
        # scan of the namespace per service
        labelled: dict[tuple[str, str, str], set[int]] = defaultdict(set)
        for position, workload in enumerate(ordered):
            for label, value in workload.labels:
                labelled[(workload.namespace, label, value)].add(position)
        self.endpoints = {s.key: self._endpoints_of(s, ordered, labelled) for s in mesh.services}
        services_of: dict[str, list[Service]] = defaultdict(list)
        for service in sorted(mesh.services, key=lambda s: s.key):
            for workload in self.endpoints[service.key]:
                services_of[workload.key].append(service)
        self.services_of = {k: tuple(v) for k, v in services_of.items()}
        self.identities = {
            s.key: _sorted_unique(
                [
                    SpiffeId.from_kubernetes(s.namespace, sa, mesh.trust_domain)
                    for sa in s.service_accounts
                ]
                + [mesh.identity_of(w) for w in self.endpoints[s.key]]
            )
            for s in mesh.services
        }
        self.addressable = tuple(
            (service, port)
            for service in sorted(mesh.services, key=lambda s: s.key)
            if service.address is not None
            for port in sorted(service.ports)
        )

    def _policy_side(self, mesh: Mesh) -> None:
        self.splits = {t.service: t for t in mesh.traffic_splits}
        self.callers: dict[tuple[str, int], Callers] = {}
        for policy in mesh.policies:
            target = self.services.get(policy.service)
            if target is None:
                continue
            for number in policy.ports or tuple(p.port for p in target.ports):
                key = (policy.service, number)
                self.callers[key] = self.callers.get(key, NOBODY) | policy.callers
        # positions in ``addressable`` each caller reaches: by identity, by namespace, all
        reach: dict[SpiffeId, list[int]] = defaultdict(list)
        reach_namespace: dict[str, list[int]] = defaultdict(list)
        self.reach_any: list[int] = []
        for position, (reachable, port) in enumerate(self.addressable):
            allowed = self.callers.get((reachable.key, port.port), NOBODY)
            if allowed.anyone:
                self.reach_any.append(position)
            for caller in allowed.identities:
                reach[caller].append(position)
            for namespace in allowed.namespaces:
                reach_namespace[namespace].append(position)
        self.reach = dict(reach)
        self.reach_namespace = dict(reach_namespace)

    def _endpoints_of(
        self,
        service: Service,
        ordered: tuple[Workload, ...],
        labelled: Mapping[tuple[str, str, str], set[int]],
    ) -> tuple[Workload, ...]:
        if service.selector is not None:
            sets = [labelled.get((service.namespace, k, v), set()) for k, v in service.selector]
            if not sets:  # an empty selector selects the whole namespace
                return tuple(w for w in ordered if w.namespace == service.namespace)
            return tuple(ordered[i] for i in sorted(set.intersection(*sets)))
        return tuple(sorted(self.workloads[b] for b in service.backends if b in self.workloads))


def _sorted_unique(ids: Iterable[SpiffeId]) -> tuple[SpiffeId, ...]:
    return tuple(sorted(set(ids)))


def _sorted_workloads(workloads: tuple[Workload, ...], unique: int) -> tuple[Workload, ...]:
    """``workloads`` in their order; by (namespace, name) alone when those are unique (the
    same order, without comparing every field)."""
    if unique == len(workloads):
        return tuple(sorted(workloads, key=lambda w: (w.namespace, w.name)))
    return tuple(sorted(workloads))


@functools.lru_cache(maxsize=65536)
def _kubernetes_identity(namespace: str, account: str, trust_domain: TrustDomain) -> SpiffeId:
    """Checked once per (namespace, account), not once per workload and lookup; bounded."""
    return SpiffeId.from_kubernetes(namespace, account, trust_domain)
