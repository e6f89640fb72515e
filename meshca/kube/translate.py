"""The cluster's objects as the mesh model: the same :class:`~meshca.envoy.model.Mesh` the
mesh file gives, so generation and ADS do not know where it came from.

- A Namespace labelled ``meshca.io/mesh=enabled`` is in the mesh; nothing else is.
- A Service with a ClusterIP is a mesh service at that address. Its TCP ports are its
  ports; the protocol is the port's ``appProtocol`` (``http``, ``grpc`` or
  ``kubernetes.io/h2c``, ``tcp``), else its name's prefix (``http``, ``http-web``,
  ``grpc-...``, ``tcp-...``), else ``tcp``: bytes are forwarded untouched unless the
  Service says they are HTTP. The target port is the one the Service's EndpointSlices
  give for the port's name (where the endpoints listen), else the Service's number.
- A Pod that an EndpointSlice lists as ready is a workload at that endpoint's address,
  running as its service account (its SPIFFE ID ``spiffe://<td>/ns/<ns>/sa/<sa>``), with
  its labels. Pods no slice lists (not ready, not selected) are not workloads; their
  proxies may still call out.
- A Service with a selector is backed by the workloads it selects (as the EndpointSlice
  controller decides); one without (slices written by hand) by the pods its own slices
  name.
- A workload's layout is its Pod's ``meshca.io/layout`` label, else its Namespace's
  (Istio's ``istio.io/dataplane-mode: ambient`` also means ambient), else the default
  (:mod:`meshca.kube.layouts`); an ambient workload's node is its ``spec.nodeName``, and
  with a node proxy service account configured each such node is a mesh node whose
  proxy's identity names the node.
- HTTPRoutes and AccessPolicies become traffic splits and access policies through
  :mod:`meshca.kube.policy`, with a verdict per object.

What cannot be used (a port the proxy itself needs, two protocols on one pod port) is
left out with a problem line; it never stops the rest of the mesh.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from meshca.envoy.model import (
    AMBIENT,
    RESERVED_PORTS,
    Labels,
    Mesh,
    Node,
    Service,
    ServicePort,
    Workload,
    WorkloadPort,
)
from meshca.kube.layouts import choose_layout, node_proxy_identity
from meshca.kube.objects import PodRecord, ServiceRecord, SliceRecord
from meshca.kube.policy import TrafficPolicy, Verdict, translate
from meshca.spiffe import SpiffeIdError, TrustDomain, check_segment

_APP_PROTOCOLS = {"http": "http", "grpc": "grpc", "kubernetes.io/h2c": "grpc", "tcp": "tcp"}


@dataclass(frozen=True)
class ClusterState:
    """What the watches hold at one moment (records by ``ns/name``)."""

    namespaces: Collection[str]
    services: Mapping[str, ServiceRecord]
    slices: Mapping[str, SliceRecord]
    pods: Mapping[str, PodRecord]
    routes: Sequence[Mapping[str, Any]] = ()
    access_policies: Sequence[Mapping[str, Any]] = ()
    namespace_labels: Mapping[str, Labels] = field(default_factory=dict)


@dataclass
class Translation:
    """The mesh, the verdicts on policy objects, and what was left out and why."""

    mesh: Mesh
    verdicts: tuple[Verdict, ...] = ()
    problems: list[str] = field(default_factory=list)


def port_protocol(name: str, app_protocol: str | None) -> str:
    """http, grpc or tcp for a Service port (Istio's conventions, tcp when unsaid)."""
    if app_protocol:
        known = _APP_PROTOCOLS.get(app_protocol.lower())
        if known:
            return known
    prefix = name.lower().split("-", 1)[0]
    if prefix in ("http", "http2"):
        return "http"
    if prefix == "grpc":
        return "grpc"
    return "tcp"


def _usable_name(value: str) -> bool:
    try:
        check_segment(value)
    except SpiffeIdError:
        return False
    return True


class _Builder:
    def __init__(
        self, trust_domain: TrustDomain, state: ClusterState, node_proxy: str | None = None
    ) -> None:
        self.trust_domain = trust_domain
        self.state = state
        self.node_proxy = node_proxy
        self.enabled = frozenset(state.namespaces)
        self.problems: list[str] = []
        self.slices: dict[str, list[SliceRecord]] = defaultdict(list)
        for record in sorted(state.slices.values(), key=lambda s: s.name):
            if record.namespace in self.enabled and record.service:
                self.slices[f"{record.namespace}/{record.service}"].append(record)

    def services(self) -> list[tuple[ServiceRecord, Service]]:
        made = []
        for key in sorted(self.state.services):
            record = self.state.services[key]
            if record.namespace not in self.enabled or record.cluster_ip is None:
                continue
            ports = tuple(sorted(p for p in map(self._port(record), record.ports) if p))
            made.append(
                (
                    record,
                    Service(
                        record.name,
                        record.namespace,
                        ports,
                        address=record.cluster_ip,
                        selector=record.selector,
                        backends=() if record.selector else self._backends(key),
                    ),
                )
            )
        return made

    def _port(self, record: ServiceRecord) -> Any:
        key = f"{record.namespace}/{record.name}"

        def convert(port: Any) -> ServicePort | None:
            if port.protocol != "TCP":
                return None
            # Where the endpoints listen is what the slices say for the port's name (a
            # named targetPort is resolved there only), else the Service's number.
            found = {
                p.port for s in self.slices.get(key, []) for p in s.ports if p.name == port.name
            }
            if len(found) > 1:
                self.problems.append(
                    f"Service {key} port {port.port}: its EndpointSlices give several "
                    f"target ports ({', '.join(map(str, sorted(found)))}); the lowest is used"
                )
            target: int | None = min(found) if found else None
            if target is None and not isinstance(port.target_port, str):
                target = port.port if port.target_port is None else port.target_port
            if target is None:
                return None  # a named port no endpoint resolves yet: nothing to reach
            for number, what in ((port.port, "port"), (target, "target port")):
                if number in RESERVED_PORTS:
                    self.problems.append(
                        f"Service {key} {what} {number} is left out: it is reserved for "
                        f"{RESERVED_PORTS[number]}"
                    )
                    return None
            return ServicePort(
                port.port,
                port_protocol(port.name, port.app_protocol),
                None if target == port.port else target,
            )

        return convert

    def _backends(self, key: str) -> tuple[str, ...]:
        namespace = key.split("/")[0]
        return tuple(sorted({f"{namespace}/{pod}" for pod, _ in self._ready(key)}))

    def _ready(self, key: str) -> Iterable[tuple[str, str]]:
        """(pod name, address) of the ready endpoints of Service ``key`` whose pod is known."""
        namespace = key.split("/")[0]
        for record in self.slices.get(key, []):
            for endpoint in record.endpoints:
                if (
                    endpoint.ready
                    and endpoint.pod
                    and f"{namespace}/{endpoint.pod}" in (self.state.pods)
                ):
                    yield endpoint.pod, endpoint.address

    def workloads(self, services: list[tuple[ServiceRecord, Service]]) -> list[Workload]:
        addresses: dict[str, set[str]] = defaultdict(set)
        for record, _ in services:
            for name, address in self._ready(f"{record.namespace}/{record.name}"):
                addresses[f"{record.namespace}/{name}"].add(address)
        bare: dict[str, Workload] = {}
        for key in sorted(addresses):
            pod = self.state.pods[key]
            if not _usable_name(pod.service_account):
                self.problems.append(
                    f"Pod {key}: service account {pod.service_account!r} cannot be part of a "
                    "SPIFFE ID; left out"
                )
                continue
            found = addresses[key]
            address = pod.ip if pod.ip in found else min(found)
            choice = choose_layout(
                key, pod.labels, pod.namespace, self.state.namespace_labels.get(pod.namespace, ())
            )
            if choice.problem:
                self.problems.append(choice.problem)
            bare[key] = Workload(pod.namespace, pod.name, pod.service_account, address,
                                 labels=pod.labels, layout=choice.layout,
                                 node=pod.node if choice.layout == AMBIENT else None)  # fmt: skip
        return self._with_ports(bare, [s for _, s in services])

    def nodes(self, workloads: Iterable[Workload]) -> tuple[Node, ...]:
        """The nodes of ambient workloads, each with its proxy's identity (none without a
        node proxy service account: ambient workloads are then carried by no proxy)."""
        names = sorted({w.node for w in workloads if w.ambient and w.node})
        if names and self.node_proxy is None:
            self.problems.append(
                f"{len(names)} node(s) have ambient workloads but no node proxy service "
                "account is configured (--kube-node-proxy): their traffic has no proxy"
            )
            return ()
        made = []
        for name in names:
            assert self.node_proxy is not None
            try:
                made.append(
                    Node(name, node_proxy_identity(self.trust_domain, self.node_proxy, name))
                )
            except SpiffeIdError:
                self.problems.append(f"node {name[:253]!r} cannot be part of a SPIFFE ID; no proxy")
        return tuple(made)

    def _with_ports(self, bare: dict[str, Workload], services: list[Service]) -> list[Workload]:
        ports: dict[str, dict[int, tuple[str, str]]] = defaultdict(dict)
        # (namespace, label, value) -> workload keys: a selector's workloads are the
        # intersection of its pairs' sets, not a scan of the namespace per Service
        labelled: dict[tuple[str, str, str], set[str]] = defaultdict(set)
        for workload in bare.values():
            for label, value in workload.labels:
                labelled[(workload.namespace, label, value)].add(workload.key)
        for service in services:
            if service.selector:
                sets = [labelled.get((service.namespace, k, v), set()) for k, v in service.selector]
                behind = [bare[key] for key in sorted(set.intersection(*sets))]
            else:
                behind = [bare[b] for b in service.backends if b in bare]
            for workload in behind:
                served = ports[workload.key]
                for port in service.ports:
                    first = served.setdefault(port.target, (port.protocol, service.key))
                    if first[0] != port.protocol:
                        self.problems.append(
                            f"Pod {workload.key} port {port.target}: Service {service.key} "
                            f"says {port.protocol}, {first[1]} says {first[0]}; {first[0]} is used"
                        )
        return [
            Workload(
                w.namespace,
                w.name,
                w.service_account,
                w.address,
                tuple(WorkloadPort(p, proto) for p, (proto, _) in sorted(ports[w.key].items())),
                w.labels,
                layout=w.layout,
                node=w.node,
            )
            for w in bare.values()
        ]


def build_mesh(
    trust_domain: TrustDomain, state: ClusterState, *, node_proxy: str | None = None
) -> Translation:
    """The mesh of ``state``: services and workloads, then the policy objects over them.
    ``node_proxy`` (``ns/sa``) is the service account of ambient node proxies."""
    builder = _Builder(trust_domain, state, node_proxy)
    services = builder.services()
    workloads = builder.workloads(services)
    base = Mesh(
        trust_domain,
        tuple(sorted((s for _, s in services), key=lambda s: s.key)),
        tuple(sorted(workloads)),
        nodes=builder.nodes(workloads),
    )
    policy: TrafficPolicy = translate(
        base, state.routes, state.access_policies, namespaces=builder.enabled
    )
    return Translation(policy.apply(base), policy.verdicts, builder.problems)
