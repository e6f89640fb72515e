"""Inbound listeners: mTLS termination, authorization by SPIFFE ID, the local app.

``intercept``: one listener on 0.0.0.0:15003 (OSM's inbound port; iptables redirects
connections to the pod's ports there) with one filter chain per local port, matched on
the original destination port. ``explicit``: one listener per port bound on the
workload's own address, which is what its endpoints advertise.

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

from meshca.envoy.clusters import local_cluster_name
from meshca.envoy.filters import (
    inbound_http,
    network_rbac,
    original_dst,
    rbac_rules,
    tcp_proxy,
    tls_inspector,
)
from meshca.envoy.model import Callers
from meshca.envoy.tls import downstream_tls
from meshca.envoy.xds import socket_address
from meshca.spiffe import SpiffeId

INBOUND_PORT = 15003
INBOUND_LISTENER = "inbound-listener"


@dataclass(frozen=True)
class InboundPort:
    """A local port, who may call it over mTLS, and whether plaintext is accepted too."""

    port: int
    protocol: str
    allowed: Callers
    plaintext: bool = False


def _filters(
    name: str, inbound: InboundPort, rules: rbac_pb2.RBAC | None
) -> list[listener_components_pb2.Filter]:
    cluster = local_cluster_name(inbound.port)
    if inbound.protocol != "tcp":
        return [inbound_http(name, cluster, rules)]
    rbac = [network_rbac(name, rules)] if rules is not None else []
    return [*rbac, tcp_proxy(name, cluster)]


def port_chains(
    proxy: SpiffeId,
    inbound: InboundPort,
    name: str,
    match: listener_components_pb2.FilterChainMatch,
) -> list[listener_components_pb2.FilterChain]:
    """The mTLS chain named ``name`` (RBAC on the caller's SPIFFE ID), and for a
    permissive port the plaintext chain ``<name>|plaintext``, both under ``match``
    (narrowed by transport protocol when there are two)."""
    secure = listener_components_pb2.FilterChain(
        name=name,
        filter_chain_match=match,
        filters=_filters(name, inbound, rbac_rules(inbound.allowed, proxy.trust_domain)),
        transport_socket=downstream_tls(proxy),
    )
    if not inbound.plaintext:
        return [secure]
    secure.filter_chain_match.transport_protocol = "tls"
    plain_name = f"{name}|plaintext"
    plain = listener_components_pb2.FilterChain(
        name=plain_name,
        filter_chain_match=match,
        filters=_filters(plain_name, inbound, None),
    )
    plain.filter_chain_match.transport_protocol = "raw_buffer"
    return [secure, plain]


def listener_filters(
    ports: Iterable[InboundPort], *, original: bool
) -> list[listener_components_pb2.ListenerFilter]:
    """``original_dst`` for redirected connections, the TLS inspector when any port
    tells plaintext from TLS."""
    found = [original_dst()] if original else []
    if any(p.plaintext for p in ports):
        found.append(tls_inspector())
    return found


def intercept_listener(proxy: SpiffeId, ports: Iterable[InboundPort]) -> listener_pb2.Listener:
    ordered = sorted(ports, key=lambda p: p.port)
    chains = []
    for inbound in ordered:
        match = listener_components_pb2.FilterChainMatch(
            destination_port=wrappers_pb2.UInt32Value(value=inbound.port)
        )
        chains.extend(port_chains(proxy, inbound, f"inbound|{inbound.port}", match))
    return listener_pb2.Listener(
        name=INBOUND_LISTENER,
        address=socket_address("0.0.0.0", INBOUND_PORT),
        traffic_direction=base_pb2.INBOUND,
        listener_filters=listener_filters(ordered, original=True),
        filter_chains=chains,
    )


def explicit_listeners(
    proxy: SpiffeId, address: str, ports: Iterable[InboundPort]
) -> list[listener_pb2.Listener]:
    return [
        listener_pb2.Listener(
            name=f"inbound|{inbound.port}",
            address=socket_address(address, inbound.port),
            traffic_direction=base_pb2.INBOUND,
            listener_filters=listener_filters([inbound], original=False),
            filter_chains=port_chains(
                proxy,
                inbound,
                f"inbound|{inbound.port}",
                listener_components_pb2.FilterChainMatch(),
            ),
        )
        for inbound in sorted(ports, key=lambda p: p.port)
    ]
