"""Inbound listeners: mTLS termination, authorization by SPIFFE ID, the local app.

``intercept``: one listener on 0.0.0.0:15003 (OSM's inbound port; iptables redirects
connections to the pod's ports there) with one filter chain per local port, matched on
the original destination port. ``explicit``: one listener per port bound on the
workload's own address, which is what its endpoints advertise.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from google.protobuf import wrappers_pb2

from meshca.envoy.clusters import local_cluster_name
from meshca.envoy.filters import inbound_http, network_rbac, original_dst, rbac_rules, tcp_proxy
from meshca.envoy.tls import downstream_tls
from meshca.envoy.xds import socket_address
from meshca.spiffe import SpiffeId

INBOUND_PORT = 15003
INBOUND_LISTENER = "inbound-listener"


@dataclass(frozen=True)
class InboundPort:
    """A local port and who may call it (None: any identity of the trust domain)."""

    port: int
    protocol: str
    allowed: frozenset[SpiffeId] | None


def _chain(proxy: SpiffeId, inbound: InboundPort) -> listener_components_pb2.FilterChain:
    name = f"inbound|{inbound.port}"
    rules = rbac_rules(inbound.allowed, proxy.trust_domain)
    cluster = local_cluster_name(inbound.port)
    if inbound.protocol == "tcp":
        filters = [network_rbac(name, rules), tcp_proxy(name, cluster)]
    else:
        filters = [inbound_http(name, cluster, rules, inbound.protocol)]
    return listener_components_pb2.FilterChain(
        name=name, filters=filters, transport_socket=downstream_tls(proxy)
    )


def intercept_listener(proxy: SpiffeId, ports: Iterable[InboundPort]) -> listener_pb2.Listener:
    chains = []
    for inbound in sorted(ports, key=lambda p: p.port):
        chain = _chain(proxy, inbound)
        chain.filter_chain_match.CopyFrom(
            listener_components_pb2.FilterChainMatch(
                destination_port=wrappers_pb2.UInt32Value(value=inbound.port)
            )
        )
        chains.append(chain)
    return listener_pb2.Listener(
        name=INBOUND_LISTENER,
        address=socket_address("0.0.0.0", INBOUND_PORT),
        traffic_direction=base_pb2.INBOUND,
        listener_filters=[original_dst()],
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
            filter_chains=[_chain(proxy, inbound)],
        )
        for inbound in sorted(ports, key=lambda p: p.port)
    ]
