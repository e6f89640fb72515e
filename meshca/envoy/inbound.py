"""Inbound listeners: mTLS termination, authorization by SPIFFE ID, the local app.

``intercept``: one listener on 0.0.0.0:15003 (OSM's inbound port; Istio's layout:
``virtualInbound`` on 15006; iptables redirects connections to the pod's ports there)
with one filter chain per local port, matched on the original destination port.
``explicit``: one listener per port bound on the workload's own address, which is what
its endpoints advertise.

A port of a ``permissive`` service also accepts plaintext: the TLS inspector tells the
two apart, and the plaintext chain (``transport_protocol: raw_buffer``) forwards to the
app without RBAC, since its callers have no identity to check.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.rbac.v3 import rbac_pb2
from google.protobuf import wrappers_pb2

from meshca.envoy.filters import (
    inbound_http,
    network_rbac,
    original_dst,
    rbac_rules,
    tcp_proxy,
    tls_inspector,
)
from meshca.envoy.layouts import Layout
from meshca.envoy.model import NOBODY, Callers, Mesh, Workload
from meshca.envoy.tls import downstream_tls
from meshca.envoy.xds import socket_address
from meshca.spiffe import SpiffeId


@dataclass(frozen=True)
class InboundPort:
    """A local port, who may call it over mTLS, and whether plaintext is accepted too."""

    port: int
    protocol: str
    allowed: Callers
    plaintext: bool = False


def inbound_ports(mesh: Mesh, workload: Workload) -> list[InboundPort]:
    """Each local port with the union of who may call it through any service using it,
    and plaintext accepted when those services are permissive (they agree: validated)."""
    ports = []
    for local in workload.ports:
        allowed = NOBODY
        plaintext = False
        for service in mesh.services_of(workload):
            for service_port in service.ports:
                if service_port.target != local.port:
                    continue
                allowed = allowed | mesh.allowed_callers(service, service_port.port)
                plaintext = plaintext or service.mtls == "permissive"
        ports.append(InboundPort(local.port, local.protocol, allowed, plaintext))
    return ports


def _filters(
    layout: Layout, name: str, inbound: InboundPort, rules: rbac_pb2.RBAC | None
) -> list[listener_components_pb2.Filter]:
    cluster = layout.local_cluster_name(inbound.port)
    if inbound.protocol != "tcp":
        route = layout.inbound_route_name(inbound.port)
        vhost = layout.inbound_virtual_host_name(inbound.port)
        return [inbound_http(name, cluster, rules, route, vhost)]
    rbac = [network_rbac(name, rules)] if rules is not None else []
    return [*rbac, tcp_proxy(name, cluster)]


def port_chains(
    layout: Layout,
    proxy: SpiffeId,
    inbound: InboundPort,
    match: listener_components_pb2.FilterChainMatch,
) -> list[listener_components_pb2.FilterChain]:
    """The mTLS chain (RBAC on the caller's SPIFFE ID), and for a permissive port the
    plaintext chain ``<name>|plaintext``, both under ``match`` (narrowed by transport
    protocol when there are two)."""
    name = layout.inbound_chain_name(inbound.port)
    secure = listener_components_pb2.FilterChain(
        name=name,
        filter_chain_match=match,
        filters=_filters(layout, name, inbound, rbac_rules(inbound.allowed, proxy.trust_domain)),
        transport_socket=downstream_tls(
            layout.cert_secret(proxy), layout.inbound_validation_secret(proxy)
        ),
    )
    if layout.inspect_tls or inbound.plaintext:
        secure.filter_chain_match.transport_protocol = "tls"
    if not inbound.plaintext:
        return [secure]
    plain_name = f"{name}|plaintext"
    plain = listener_components_pb2.FilterChain(
        name=plain_name,
        filter_chain_match=match,
        filters=_filters(layout, plain_name, inbound, None),
    )
    plain.filter_chain_match.transport_protocol = "raw_buffer"
    return [secure, plain]


def listener_filters(
    ports: Iterable[InboundPort], *, original: bool, inspect: bool = False
) -> list[listener_components_pb2.ListenerFilter]:
    """``original_dst`` for redirected connections, the TLS inspector when any port
    tells plaintext from TLS (or ``inspect``, as Istio always has it)."""
    found = [original_dst()] if original else []
    if inspect or any(p.plaintext for p in ports):
        found.append(tls_inspector())
    return found


def intercept_listener(
    layout: Layout, proxy: SpiffeId, ports: Iterable[InboundPort]
) -> listener_pb2.Listener:
    """OSM's ``inbound-listener`` on 15003 or Istio's ``virtualInbound`` on 15006: one
    chain per local port, matched on the original destination port."""
    ordered = sorted(ports, key=lambda p: p.port)
    chains = []
    for inbound in ordered:
        match = listener_components_pb2.FilterChainMatch(
            destination_port=wrappers_pb2.UInt32Value(value=inbound.port)
        )
        chains.extend(port_chains(layout, proxy, inbound, match))
    return listener_pb2.Listener(
        name=layout.inbound_listener,
        address=socket_address("0.0.0.0", layout.inbound_port),
        traffic_direction=base_pb2.INBOUND,
        listener_filters=listener_filters(ordered, original=True, inspect=layout.inspect_tls),
        filter_chains=chains,
    )


def explicit_listeners(
    layout: Layout, proxy: SpiffeId, address: str, ports: Iterable[InboundPort]
) -> list[listener_pb2.Listener]:
    return [
        listener_pb2.Listener(
            name=f"inbound|{inbound.port}",
            address=socket_address(address, inbound.port),
            traffic_direction=base_pb2.INBOUND,
            listener_filters=listener_filters([inbound], original=False),
            filter_chains=port_chains(
                layout, proxy, inbound, listener_components_pb2.FilterChainMatch()
            ),
        )
        for inbound in sorted(ports, key=lambda p: p.port)
    ]
