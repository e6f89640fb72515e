"""A proxy's listeners, routes, clusters and endpoints, derived from its identity.

The authenticated SPIFFE ID decides everything: which services the proxy may reach
(nothing else appears in its configuration, not even as a cluster name), which
certificate it presents, and who may call its own ports. ``workload`` only picks among
the workloads that run as that identity (their addresses and ports differ).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Literal, get_args

from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from google.protobuf.message import Message

from meshca.envoy import clusters, inbound, outbound
from meshca.envoy.ambient import node_of, node_snapshot
from meshca.envoy.endpoints import load_assignment
from meshca.envoy.layouts import DEFAULT_LAYOUT, Layout, layout_named
from meshca.envoy.model import AMBIENT, Mesh, Service, ServicePort, Workload, matches
from meshca.envoy.routes import Upstream, fallback_virtual_host, outbound_route_config
from meshca.envoy.snapshot import Snapshot
from meshca.envoy.tls import upstream_tls
from meshca.envoy.xds import GenerationError, kubernetes_identity
from meshca.spiffe import SpiffeId
from meshca.xds.resources import CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE

Capture = Literal["intercept", "explicit"]
CAPTURE_MODES: tuple[str, ...] = get_args(Capture)


def local_workload(mesh: Mesh, proxy: SpiffeId, name: str | None, capture: str) -> Workload | None:
    """The workload this proxy fronts: ``name`` (``name`` or ``ns/name``), or the only one
    running as ``proxy``; None for an identity that only calls out (a gateway, a job)."""
    namespace, _ = kubernetes_identity(proxy)
    if name is not None:
        if len(name) > 256:
            raise GenerationError("workload name longer than 256 characters")
        ns, _, short = name.rpartition("/")
        found = mesh.workload(ns or namespace, short)
        if found is None:
            raise GenerationError(f"workload {ns or namespace}/{short} is not in the mesh file")
        if mesh.identity_of(found) != proxy:
            raise GenerationError(
                f"workload {found.key} runs as {mesh.identity_of(found)}, not as {proxy}"
            )
        return found
    candidates = mesh.workloads_of(proxy)
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    shapes = {(w.ports, w.app_address, w.layout) for w in candidates}
    if capture == "explicit" or len(shapes) > 1:
        keys = ", ".join(w.key for w in candidates)
        raise GenerationError(f"{proxy} runs several workloads ({keys}): say which one")
    return candidates[0]


def _backends(
    mesh: Mesh, service: Service, port: ServicePort
) -> list[tuple[str | None, int, list[Workload]]]:
    """(split backend or None, weight, workloads) for each cluster of this service port."""
    workloads = mesh.endpoints(service)
    split = mesh.split_for(service)
    if split is None:
        return [(None, 1, list(workloads))]
    return [
        (
            backend.name,
            backend.weight,
            [w for w in workloads if matches(backend.labels, w.labels)],
        )
        for backend in split.backends
    ]


def resolve_layout(local: Workload | None, requested: str | None) -> Layout:
    """The mesh file's layout for the workload, else the bootstrap's, else ``osm``; the
    two must agree when both are given."""
    declared = local.layout if local is not None else None
    if declared is not None and requested is not None and declared != requested:
        raise GenerationError(
            f"workload {local.key if local else ''} has layout {declared} in the mesh file; "
            f"the proxy's bootstrap asks for {requested}"
        )
    layout = layout_named(declared or requested or DEFAULT_LAYOUT)
    return layout


@dataclass(frozen=True)
class _Outbound:
    """What a proxy needs to call out, the same for every workload of one identity (in one
    capture mode): the clusters, endpoints and routes, in intercept mode the outbound
    listener and its fallback cluster too, encoded once in ``shared``."""

    shared: Snapshot
    upstreams: tuple[Upstream, ...]
    listeners: tuple[listener_pb2.Listener, ...]


def _endpoints(
    mesh: Mesh, name: str, workloads: list[Workload], port: int
) -> endpoint_pb2.ClusterLoadAssignment:
    """Endpoints do not depend on who calls: one message per cluster, shared by all."""
    key = ("endpoints", name)
    cached = mesh.derived.get(key)
    if cached is None:
        cached = mesh.derived[key] = load_assignment(name, workloads, port)
    return cached


def _outbound(mesh: Mesh, proxy: SpiffeId, capture: str, layout: Layout) -> _Outbound:
    key = ("outbound", proxy, capture, layout.name)
    cached = mesh.derived.get(key)
    if isinstance(cached, _Outbound):
        return cached
    by_type: dict[str, dict[str, Message]] = defaultdict(dict)
    secrets = []
    upstreams = []
    for service, port in mesh.reachable(proxy):
        weights = []
        identities = mesh.service_identities(service.namespace, service.name) or ()
        validation = layout.outbound_validation_secret(service)
        for backend, weight, workloads in _backends(mesh, service, port):
            name = layout.cluster_name(service, port.port, backend)
            socket = upstream_tls(
                layout.cert_secret(proxy),
                validation,
                layout.sni(service, port.port, backend),
                identities,
                layout.upstream_alpn,
            )
            by_type[CLUSTER_TYPE][name] = clusters.upstream_cluster(name, port.protocol, socket)
            by_type[ENDPOINT_TYPE][name] = _endpoints(mesh, name, workloads, port.target)
            weights.append((name, weight))
        upstreams.append(Upstream(service, port, tuple(weights)))
        secrets.append(validation)
    handoff = layout.name != "osm"  # Istio's shape: virtualOutbound and per-port listeners
    fallback_name = layout.passthrough if mesh.egress == "passthrough" else layout.blackhole
    http_by_port: dict[int, list[Upstream]] = defaultdict(list)
    for upstream in upstreams:
        if upstream.port.protocol != "tcp":
            http_by_port[upstream.port.port].append(upstream)
    namespace, _ = kubernetes_identity(proxy)
    for port_number, sharing in http_by_port.items():
        hosts = [(layout.virtual_host_name(u.service, u.port.port), u) for u in sharing]
        fallback_host = None
        if handoff:  # 0.0.0.0_<port> also catches destinations outside the mesh
            passthrough = layout.passthrough if mesh.egress == "passthrough" else None
            fallback_host = fallback_virtual_host(passthrough)
        config = outbound_route_config(
            layout.route_config_name(port_number), hosts, namespace, fallback_host
        )
        by_type[ROUTE_TYPE][config.name] = config
    listeners = []
    if capture == "intercept":
        if handoff:
            listeners.extend(outbound.handoff_listeners(layout, upstreams, fallback_name))
            fallbacks = [
                clusters.blackhole_cluster(layout.blackhole),
                clusters.passthrough_cluster(layout.passthrough),
            ]
        else:
            listeners.append(outbound.intercept_listener(layout, upstreams, fallback_name))
            fallbacks = [
                clusters.passthrough_cluster(fallback_name)
                if mesh.egress == "passthrough"
                else clusters.blackhole_cluster(fallback_name)
            ]
        for fallback in fallbacks:
            by_type[CLUSTER_TYPE][fallback.name] = fallback
    by_type[LISTENER_TYPE] = {listener.name: listener for listener in listeners}
    shared = Snapshot.of(by_type, tuple(secrets))
    result = _Outbound(shared, tuple(upstreams), tuple(listeners))
    mesh.derived[key] = result
    return result


def generate(
    mesh: Mesh,
    proxy: SpiffeId,
    *,
    capture: Capture | str = "intercept",
    workload: str | None = None,
    layout: str | None = None,
) -> Snapshot:
    """Everything the proxy with identity ``proxy`` needs, as a versioned snapshot, in
    ``layout`` (the bootstrap's request; the mesh file's workload entry may also say).

    Messages may be shared with other snapshots of the same mesh: read-only.
    """
    if capture not in CAPTURE_MODES:
        raise GenerationError(f"capture mode {capture!r} is not one of {', '.join(CAPTURE_MODES)}")
    if layout is not None and len(layout) > 64:
        raise GenerationError("layout name longer than 64 characters")
    if proxy.trust_domain != mesh.trust_domain:
        raise GenerationError(f"{proxy} is outside the mesh's trust domain {mesh.trust_domain}")
    if layout == AMBIENT or mesh.node_proxied_by(proxy) is not None:
        return _node_proxy(mesh, proxy, capture, workload, layout)
    local = local_workload(mesh, proxy, workload, capture)
    chosen = resolve_layout(local, layout)
    if chosen.name == AMBIENT:
        raise GenerationError(
            f"workload {local.key if local else proxy} is in the ambient layout: the node "
            f"proxy of node {local.node if local else '?'} carries its traffic"
        )
    if capture not in chosen.captures:
        raise GenerationError(
            f"layout {chosen.name} supports capture {', '.join(chosen.captures)}, not {capture}"
        )
    out = _outbound(mesh, proxy, capture, chosen)
    secrets = [chosen.cert_secret(proxy)]
    local_clusters: dict[str, Message] = {}
    listeners: list[listener_pb2.Listener] = []
    if capture == "explicit":
        bind = local.outbound_address if local is not None else None
        listeners.extend(outbound.explicit_listeners(chosen, out.upstreams, bind))

    if local is not None and local.ports:
        ports = inbound.inbound_ports(mesh, local)
        if capture == "intercept":
            listeners.append(inbound.intercept_listener(chosen, proxy, ports))
        else:
            listeners.extend(inbound.explicit_listeners(chosen, proxy, local.address, ports))
        for local_port in ports:
            name = chosen.local_cluster_name(local_port.port)
            cluster = clusters.local_cluster(
                name, local_port.port, local.app_address, local_port.protocol
            )
            local_clusters[cluster.name] = cluster
        secrets.append(chosen.inbound_validation_secret(proxy))

    _check_unique_binds([*out.listeners, *listeners])
    own = {CLUSTER_TYPE: local_clusters, LISTENER_TYPE: {li.name: li for li in listeners}}
    return Snapshot.of(own, tuple(secrets), base=out.shared)


def _node_proxy(
    mesh: Mesh, proxy: SpiffeId, capture: str, workload: str | None, layout: str | None
) -> Snapshot:
    node = node_of(mesh, proxy)
    if layout not in (None, AMBIENT):
        raise GenerationError(
            f"{proxy} is the node proxy of node {node.name}: its layout is ambient, not {layout}"
        )
    if capture != "intercept":
        raise GenerationError(f"layout ambient supports capture intercept, not {capture}")
    if workload is not None:
        raise GenerationError(
            f"{proxy} is the node proxy of node {node.name}: it serves every ambient workload "
            "there, not one workload"
        )
    return node_snapshot(mesh, node)


def _check_unique_binds(listeners: list[listener_pb2.Listener]) -> None:
    seen: dict[tuple[str, int], str] = {}
    for listener in listeners:
        socket = listener.address.socket_address
        key = (socket.address, socket.port_value)
        if key in seen:
            raise GenerationError(
                f"listeners {seen[key]} and {listener.name} would both bind {key[0]}:{key[1]}"
            )
        seen[key] = listener.name
