"""Outbound listeners: how the application's connections to mesh services enter the proxy.

``intercept``: one listener on 0.0.0.0:15001 that iptables redirects every outbound
connection to; the ``original_dst`` listener filter restores the address the app
dialled, and a filter chain per reachable service port matches it (ClusterIP/32 and
port). What matches nothing takes the fallback chain (``blackhole`` or
``passthrough``). Istio's layout shapes the same upstreams as hand-off listeners
(:func:`handoff_listeners`). ``explicit``: no redirection; one listener bound per
service address and port (the ClusterIP on loopback, or the workload's
``outbound_address``), so the app dials the service address and reaches its proxy.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf import wrappers_pb2

from meshca.envoy.filters import TCP_PROXY, original_dst, outbound_http, tcp_proxy
from meshca.envoy.layouts import Layout
from meshca.envoy.routes import Upstream
from meshca.envoy.xds import GenerationError, host_prefix, pack, socket_address
from meshca.util.netaddr import format_address


def tcp_filters(stat_prefix: str, upstream: Upstream) -> list[listener_components_pb2.Filter]:
    """A TCP proxy to the upstream's cluster, or its weighted clusters under a split."""
    live = upstream.live
    if len(live) == 1:
        return [tcp_proxy(stat_prefix, live[0][0])]
    config = tcp_proxy_pb2.TcpProxy(
        stat_prefix=stat_prefix,
        weighted_clusters=tcp_proxy_pb2.TcpProxy.WeightedCluster(
            clusters=[
                tcp_proxy_pb2.TcpProxy.WeightedCluster.ClusterWeight(name=name, weight=weight)
                for name, weight in live
            ]
        ),
    )
    return [listener_components_pb2.Filter(name=TCP_PROXY, typed_config=pack(config))]


def _filters(layout: Layout, upstream: Upstream) -> list[listener_components_pb2.Filter]:
    stat_prefix = f"outbound|{upstream.name}"
    if upstream.port.protocol != "tcp":
        return [outbound_http(stat_prefix, layout.route_config_name(upstream.port.port))]
    return tcp_filters(stat_prefix, upstream)


def _fallback_chain(name: str) -> listener_components_pb2.FilterChain:
    return listener_components_pb2.FilterChain(name=name, filters=[tcp_proxy(name, name)])


def intercept_listener(
    layout: Layout, upstreams: Iterable[Upstream], fallback: str
) -> listener_pb2.Listener:
    """OSM's ``outbound-listener``: a chain per reachable service port, matched on the
    original destination (ClusterIP/32 and port); anything else takes ``fallback``."""
    chains = []
    for upstream in sorted(upstreams, key=lambda u: u.name):
        assert upstream.service.address is not None  # only addressable services reach here
        chains.append(
            listener_components_pb2.FilterChain(
                name=upstream.name,
                filter_chain_match=listener_components_pb2.FilterChainMatch(
                    prefix_ranges=[host_prefix(upstream.service.address)],
                    destination_port=wrappers_pb2.UInt32Value(value=upstream.port.port),
                ),
                filters=_filters(layout, upstream),
            )
        )
    return listener_pb2.Listener(
        name=layout.outbound_listener,
        address=socket_address("0.0.0.0", layout.outbound_port),
        traffic_direction=base_pb2.OUTBOUND,
        listener_filters=[original_dst()],
        filter_chains=chains,
        default_filter_chain=listener_components_pb2.FilterChain(
            name=fallback, filters=[tcp_proxy(f"outbound|{fallback}", fallback)]
        ),
    )


def handoff_listeners(
    layout: Layout, upstreams: Iterable[Upstream], fallback: str
) -> list[listener_pb2.Listener]:
    """Istio's outbound side: ``virtualOutbound`` on 15001 (``use_original_dst``) hands
    each connection to the listener for its original destination, which binds nothing:
    ``0.0.0.0_<port>`` for HTTP (routes by Host over RDS ``<port>``) or ``<ip>_<port>``
    for a TCP service. A destination no listener claims stays on ``virtualOutbound``
    and takes ``fallback`` (BlackHoleCluster or PassthroughCluster)."""
    listeners = [
        listener_pb2.Listener(
            name=layout.outbound_listener,
            address=socket_address("0.0.0.0", layout.outbound_port),
            traffic_direction=base_pb2.OUTBOUND,
            use_original_dst=wrappers_pb2.BoolValue(value=True),
            filter_chains=[_fallback_chain(fallback)],
        )
    ]
    http_ports = sorted({u.port.port for u in upstreams if u.port.protocol != "tcp"})
    for port in http_ports:
        name = f"0.0.0.0_{port}"
        listeners.append(
            listener_pb2.Listener(
                name=name,
                address=socket_address("0.0.0.0", port),
                traffic_direction=base_pb2.OUTBOUND,
                bind_to_port=wrappers_pb2.BoolValue(value=False),
                filter_chains=[
                    listener_components_pb2.FilterChain(
                        filters=[outbound_http(f"outbound_{name}", layout.route_config_name(port))]
                    )
                ],
            )
        )
    for upstream in sorted(upstreams, key=lambda u: u.name):
        address = upstream.service.address
        if upstream.port.protocol != "tcp" or address is None:
            continue
        name = f"{address}_{upstream.port.port}"
        listeners.append(
            listener_pb2.Listener(
                name=name,
                address=socket_address(address, upstream.port.port),
                traffic_direction=base_pb2.OUTBOUND,
                bind_to_port=wrappers_pb2.BoolValue(value=False),
                filter_chains=[
                    listener_components_pb2.FilterChain(
                        filters=tcp_filters(f"outbound_{name}", upstream)
                    )
                ],
            )
        )
    return listeners


def explicit_listeners(
    layout: Layout, upstreams: Iterable[Upstream], bind_address: str | None
) -> list[listener_pb2.Listener]:
    """One listener per bound address and port; HTTP services that share one (through
    ``outbound_address``) share its chain and are told apart by Host, as in Istio."""
    by_bind: dict[tuple[str, int], list[Upstream]] = defaultdict(list)
    for upstream in upstreams:
        address = bind_address or upstream.service.address
        assert address is not None
        by_bind[(address, upstream.port.port)].append(upstream)
    listeners = []
    for (address, port), sharing in sorted(by_bind.items()):
        sharing.sort(key=lambda u: u.name)
        if len(sharing) > 1 and any(u.port.protocol == "tcp" for u in sharing):
            names = ", ".join(u.name for u in sharing)
            raise GenerationError(
                f"outbound_address {address}: TCP port {port} would serve several services "
                f"({names}); a TCP listener cannot tell them apart"
            )
        listeners.append(
            listener_pb2.Listener(
                name=f"outbound|{format_address(address, port)}",
                address=socket_address(address, port),
                traffic_direction=base_pb2.OUTBOUND,
                filter_chains=[
                    listener_components_pb2.FilterChain(
                        name=sharing[0].name, filters=_filters(layout, sharing[0])
                    )
                ],
            )
        )
    return listeners
