"""The ``ambient`` layout: one node proxy per host, carrying the traffic of every
``ambient`` workload on it over HBONE (HTTP CONNECT over mutual TLS, port 15008), with
Istio ztunnel's names.

Outbound: iptables sends a workload's connection to ``ztunnel_outbound`` (15001); its
``filter_chain_matcher`` picks the chain by source IP (which workload calls), then
destination IP and port (which service): ``<source>_to_<port>_<fqdn>_outbound_internal``,
a TCP proxy to the cluster of the same name. That cluster's endpoints are the service's
pods as *internal* addresses of the listener ``outbound_tunnel_lis_<source>``, each
carrying ``tunnel`` metadata (the pod's ``address`` on 15008, the app's ``destination``,
and the tunnel ``cluster``), which the internal-upstream transport passes to that
listener. There a TCP proxy opens the CONNECT tunnel (``:authority`` and
``x-envoy-original-dst-host`` = the destination) through ``outbound_tunnel_clus_
<source>_to_<destination identity>``: an original-destination cluster that dials the
metadata's ``address``, presenting the *source workload's* certificate and accepting
only the destination workload's SPIFFE ID. (Upstream Envoy has no ``set_dst_address``
listener filter, an Istio extension; the cluster's ``metadata_key`` reads the same
``tunnel.address``.)

Inbound: ``ztunnel_inbound`` (15008) has a chain per local pod address
(``inbound_<ip>``) that terminates mTLS with that workload's certificate, accepts
CONNECT, lets through only a tunnel whose ``x-envoy-original-dst-host`` is one of the
pod's ports and whose caller's SPIFFE ID the access policy admits on that port, and
forwards the payload to ``virtual_inbound`` (original destination from that header).
Each tunnel is logged with both identities (ztunnel's ``src.identity``/``dst.identity``).

Plaintext: the capture rules send TCP arriving for a pod on any other port to
``ztunnel_inbound_plaintext`` (15006, ``original_dst``), with one chain per pod port
(``inbound_plaintext_<ip>_<port>``). A port of a ``permissive`` service forwards the
bytes to the app through ``virtual_inbound`` (no header: the original destination
itself), with no RBAC, since such callers have no identity to check; any other port
(``strict``) goes to ``BlackHoleCluster``, which has no endpoints: the connection is
closed as it opens, before a byte reaches anything (logged with ``flags=UH``).

The proxy's own connections carry the socket mark 0x539 (ztunnel's), so that the
capture rules can leave them alone. Destinations outside the mesh take the mesh's
``egress`` (``PassthroughCluster`` or ``BlackHoleCluster``), as in the other layouts.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    protocol_pb2,
    socket_option_pb2,
    substitution_format_string_pb2,
)
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.access_loggers.stream.v3 import stream_pb2
from envoy.extensions.filters.common.set_filter_state.v3 import value_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.set_filter_state.v3 import set_filter_state_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.matching.common_inputs.network.v3 import network_inputs_pb2
from envoy.extensions.transport_sockets.internal_upstream.v3 import internal_upstream_pb2
from envoy.extensions.transport_sockets.raw_buffer.v3 import raw_buffer_pb2
from envoy.type.matcher.v3 import string_pb2
from envoy.type.metadata.v3 import metadata_pb2
from google.protobuf import duration_pb2, struct_pb2, wrappers_pb2
from google.protobuf.message import Message
from xds.core.v3 import extension_pb2
from xds.type.matcher.v3 import matcher_pb2

from meshca.envoy import clusters
from meshca.envoy.filters import (
    HCM,
    HTTP_RBAC,
    ROUTER,
    TCP_PROXY,
    original_dst,
    rbac_rules,
    tcp_proxy,
)
from meshca.envoy.inbound import InboundPort, inbound_ports
from meshca.envoy.layouts import Ambient
from meshca.envoy.model import NOBODY, Mesh, Node, Workload
from meshca.envoy.snapshot import Snapshot
from meshca.envoy.tls import downstream_tls, upstream_tls
from meshca.envoy.xds import (
    CONNECT_TIMEOUT,
    GenerationError,
    ads_source,
    host_prefix,
    pack,
    socket_address,
)
from meshca.spiffe import SpiffeId
from meshca.util.netaddr import format_address
from meshca.xds.resources import CLUSTER_TYPE, ENDPOINT_TYPE, ISTIO_ROOTCA, LISTENER_TYPE

HBONE_PORT = 15008
PROXY_MARK = 0x539  # ztunnel's socket mark: capture rules skip the proxy's own connections
TUNNEL = "tunnel"  # the endpoint metadata namespace the seed shows
ORIGINAL_DST_HEADER = "x-envoy-original-dst-host"
VIRTUAL_INBOUND = "virtual_inbound"
INBOUND_HCM = "inbound_hcm"
SET_FILTER_STATE = "envoy.filters.network.set_filter_state"
TCP_PROXY_CLUSTER_STATE = "envoy.tcp_proxy.cluster"
LAYOUT = Ambient()

_SO_MARK = (1, 36)  # SOL_SOCKET, SO_MARK (Linux)
_INBOUND_LOG = (
    "[ztunnel] direction=inbound src.addr=%DOWNSTREAM_REMOTE_ADDRESS% "
    'src.identity="%DOWNSTREAM_PEER_URI_SAN%" dst.addr=%DOWNSTREAM_LOCAL_ADDRESS% '
    'dst.hbone_addr=%REQ(X-ENVOY-ORIGINAL-DST-HOST)% dst.identity="%DOWNSTREAM_LOCAL_URI_SAN%" '
    "response=%RESPONSE_CODE% flags=%RESPONSE_FLAGS% bytes_sent=%BYTES_SENT%\n"
)
_PLAINTEXT_LOG = (
    "[ztunnel] direction=inbound_plaintext src.addr=%DOWNSTREAM_REMOTE_ADDRESS% "
    "dst.addr=%DOWNSTREAM_LOCAL_ADDRESS% flags=%RESPONSE_FLAGS% bytes_sent=%BYTES_SENT%\n"
)
_OUTBOUND_LOG = (
    "[ztunnel] direction=outbound dst.addr=%UPSTREAM_HOST% "
    "dst.hbone_addr=%DYNAMIC_METADATA(tunnel:destination)% "
    "cluster=%UPSTREAM_CLUSTER% flags=%RESPONSE_FLAGS% bytes_sent=%BYTES_SENT%\n"
)


def _typed(name: str, message: Message) -> extension_pb2.TypedExtensionConfig:
    return extension_pb2.TypedExtensionConfig(name=name, typed_config=pack(message))


def _stdout_log(text: str) -> accesslog_pb2.AccessLog:
    log_format = substitution_format_string_pb2.SubstitutionFormatString(
        text_format_source=base_pb2.DataSource(inline_string=text)
    )
    return accesslog_pb2.AccessLog(
        name="envoy.access_loggers.stdout",
        typed_config=pack(stream_pb2.StdoutAccessLog(log_format=log_format)),
    )


def _marked(cluster: cluster_pb2.Cluster) -> cluster_pb2.Cluster:
    level, name = _SO_MARK
    cluster.upstream_bind_config.CopyFrom(
        address_pb2.BindConfig(
            socket_options=[
                socket_option_pb2.SocketOption(
                    description="ztunnel mark",
                    level=level,
                    name=name,
                    int_value=PROXY_MARK,
                    state=socket_option_pb2.SocketOption.STATE_PREBIND,
                )
            ]
        )
    )
    return cluster


def _original_dst_cluster(name: str) -> cluster_pb2.Cluster:
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.ORIGINAL_DST,
        lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED,
        connect_timeout=CONNECT_TIMEOUT,
    )


# --- outbound ---------------------------------------------------------------------------------


def _internal_upstream() -> base_pb2.TransportSocket:
    """Hands the chosen endpoint's ``tunnel`` metadata to the internal listener."""
    socket = internal_upstream_pb2.InternalUpstreamTransport(
        passthrough_metadata=[
            internal_upstream_pb2.InternalUpstreamTransport.MetadataValueSource(
                kind=metadata_pb2.MetadataKind(host=metadata_pb2.MetadataKind.Host()),
                name=TUNNEL,
            )
        ],
        transport_socket=base_pb2.TransportSocket(
            name="envoy.transport_sockets.raw_buffer", typed_config=pack(raw_buffer_pb2.RawBuffer())
        ),
    )
    return base_pb2.TransportSocket(
        name="envoy.transport_sockets.internal_upstream", typed_config=pack(socket)
    )


def _outbound_internal_cluster(name: str) -> cluster_pb2.Cluster:
    socket = _internal_upstream()
    match = struct_pb2.Struct()
    match.update({TUNNEL: "h2"})
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ads_source()),
        connect_timeout=CONNECT_TIMEOUT,
        transport_socket=socket,
        transport_socket_matches=[
            cluster_pb2.Cluster.TransportSocketMatch(
                name="internal_upstream", match=match, transport_socket=socket
            )
        ],
    )


def _tunnel_endpoints(
    name: str, source: SpiffeId, pods: Iterable[Workload], target: int, mesh: Mesh
) -> endpoint_pb2.ClusterLoadAssignment:
    endpoints = []
    for pod in sorted(pods, key=lambda w: w.address):
        destination = format_address(pod.address, target)
        tunnel = struct_pb2.Struct()
        tunnel.update(
            {
                "destination": destination,
                "address": format_address(pod.address, HBONE_PORT),
                "cluster": LAYOUT.tunnel_cluster(source, mesh.identity_of(pod)),
            }
        )
        socket_match = struct_pb2.Struct()
        socket_match.update({TUNNEL: "h2"})
        metadata = base_pb2.Metadata()
        metadata.filter_metadata[TUNNEL].CopyFrom(tunnel)
        metadata.filter_metadata["envoy.transport_socket_match"].CopyFrom(socket_match)
        endpoints.append(
            endpoint_components_pb2.LbEndpoint(
                endpoint=endpoint_components_pb2.Endpoint(
                    address=address_pb2.Address(
                        envoy_internal_address=address_pb2.EnvoyInternalAddress(
                            server_listener_name=LAYOUT.tunnel_listener(source),
                            endpoint_id=destination,
                        )
                    )
                ),
                metadata=metadata,
            )
        )
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=endpoints)],
    )


def _tunnel_listener(source: SpiffeId) -> listener_pb2.Listener:
    """``outbound_tunnel_lis_<source>``: CONNECT to the endpoint's ``destination``
    through the tunnel cluster its metadata names (of the destination's identity)."""
    fmt = substitution_format_string_pb2.SubstitutionFormatString(
        text_format_source=base_pb2.DataSource(inline_string="%DYNAMIC_METADATA(tunnel:cluster)%")
    )
    choose = set_filter_state_pb2.Config(
        on_new_connection=[
            value_pb2.FilterStateValue(object_key=TCP_PROXY_CLUSTER_STATE, format_string=fmt)
        ]
    )
    destination = "%DYNAMIC_METADATA(tunnel:destination)%"
    proxy = tcp_proxy_pb2.TcpProxy(
        stat_prefix=LAYOUT.tunnel_listener(source),
        cluster=LAYOUT.blackhole,  # no tunnel metadata: nowhere to go
        tunneling_config=tcp_proxy_pb2.TcpProxy.TunnelingConfig(
            hostname=destination,
            headers_to_add=[
                base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key=ORIGINAL_DST_HEADER, value=destination)
                )
            ],
        ),
        access_log=[_stdout_log(_OUTBOUND_LOG)],
    )
    return listener_pb2.Listener(
        name=LAYOUT.tunnel_listener(source),
        internal_listener=listener_pb2.Listener.InternalListenerConfig(),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name=SET_FILTER_STATE, typed_config=pack(choose)
                    ),
                    listener_components_pb2.Filter(name=TCP_PROXY, typed_config=pack(proxy)),
                ]
            )
        ],
    )


def _tunnel_cluster(source: SpiffeId, destination: SpiffeId) -> cluster_pb2.Cluster:
    """Dials the endpoint's ``tunnel.address`` (pod:15008) as ``source``, accepting only
    ``destination``; HTTP/2, where the CONNECT streams travel."""
    cluster = _original_dst_cluster(LAYOUT.tunnel_cluster(source, destination))
    cluster.original_dst_lb_config.CopyFrom(
        cluster_pb2.Cluster.OriginalDstLbConfig(
            metadata_key=metadata_pb2.MetadataKey(
                key=TUNNEL, path=[metadata_pb2.MetadataKey.PathSegment(key="address")]
            )
        )
    )
    cluster.transport_socket.CopyFrom(
        upstream_tls(
            LAYOUT.cert_secret(source),
            ISTIO_ROOTCA,
            "",
            [destination],
            LAYOUT.upstream_alpn,
            tls13=True,
        )
    )
    clusters.http2(cluster)
    return _marked(cluster)


def _action(chain: str) -> matcher_pb2.Matcher.OnMatch:
    return matcher_pb2.Matcher.OnMatch(action=_typed(chain, wrappers_pb2.StringValue(value=chain)))


def _tree(
    input_name: str,
    input_config: Message,
    branches: dict[str, matcher_pb2.Matcher.OnMatch],
    fallback: str,
) -> matcher_pb2.Matcher:
    """Exact match on one input; anything else takes the ``fallback`` chain."""
    return matcher_pb2.Matcher(
        matcher_tree=matcher_pb2.Matcher.MatcherTree(
            input=_typed(input_name, input_config),
            exact_match_map=matcher_pb2.Matcher.MatcherTree.MatchMap(map=branches),
        ),
        on_no_match=_action(fallback),
    )


def _outbound_listener(
    by_source: dict[str, dict[str, dict[int, str]]], fallback: str
) -> listener_pb2.Listener:
    """``ztunnel_outbound``: source IP -> destination IP -> destination port -> chain."""
    chains = sorted(
        {c for dests in by_source.values() for ports in dests.values() for c in ports.values()}
    )
    sources = {
        source_ip: matcher_pb2.Matcher.OnMatch(
            matcher=_tree(
                "destination-ip",
                network_inputs_pb2.DestinationIPInput(),
                {
                    dest_ip: matcher_pb2.Matcher.OnMatch(
                        matcher=_tree(
                            "destination-port",
                            network_inputs_pb2.DestinationPortInput(),
                            {str(port): _action(chain) for port, chain in sorted(ports.items())},
                            fallback,
                        )
                    )
                    for dest_ip, ports in sorted(dests.items())
                },
                fallback,
            )
        )
        for source_ip, dests in sorted(by_source.items())
        if dests  # a source that may call nothing takes the fallback
    }
    if sources:
        matcher = _tree("source-ip", network_inputs_pb2.SourceIPInput(), sources, fallback)
    else:
        matcher = matcher_pb2.Matcher(on_no_match=_action(fallback))
    filter_chains = [
        listener_components_pb2.FilterChain(
            name=chain,
            filters=[tcp_proxy(chain, chain)],
        )
        for chain in chains
    ]
    fallback_chain = listener_components_pb2.FilterChain(
        name=fallback, filters=[tcp_proxy(fallback, fallback)]
    )
    filter_chains.append(fallback_chain)
    return listener_pb2.Listener(
        name=LAYOUT.outbound_listener,
        address=socket_address("0.0.0.0", LAYOUT.outbound_port),
        traffic_direction=base_pb2.OUTBOUND,
        listener_filters=[original_dst()],
        filter_chains=filter_chains,
        filter_chain_matcher=matcher,
        default_filter_chain=fallback_chain,
    )


# --- inbound ----------------------------------------------------------------------------------


def _pod_chain(mesh: Mesh, pod: Workload) -> listener_components_pb2.FilterChain:
    """``inbound_<ip>``: the pod's certificate, CONNECT to one of its own ports only,
    and only for callers the access policy admits on that port."""
    identity = mesh.identity_of(pod)
    routes = []
    for port in sorted(inbound_ports(mesh, pod), key=lambda p: p.port):
        target = format_address(pod.address, port.port)
        rules = rbac_rules(port.allowed, mesh.trust_domain)
        route = route_components_pb2.Route(
            name=f"inbound|{target}",
            match=route_components_pb2.RouteMatch(
                connect_matcher=route_components_pb2.RouteMatch.ConnectMatcher(),
                headers=[
                    route_components_pb2.HeaderMatcher(
                        name=ORIGINAL_DST_HEADER,
                        string_match=string_pb2.StringMatcher(exact=target),
                    )
                ],
            ),
            route=route_components_pb2.RouteAction(
                cluster=VIRTUAL_INBOUND,
                timeout=duration_pb2.Duration(),
                upgrade_configs=[
                    route_components_pb2.RouteAction.UpgradeConfig(
                        upgrade_type="CONNECT",
                        connect_config=route_components_pb2.RouteAction.UpgradeConfig.ConnectConfig(),
                    )
                ],
            ),
        )
        route.typed_per_filter_config[HTTP_RBAC].CopyFrom(
            pack(http_rbac_pb2.RBACPerRoute(rbac=http_rbac_pb2.RBAC(rules=rules)))
        )
        routes.append(route)
    deny_all = http_rbac_pb2.RBAC(rules=rbac_rules(NOBODY, mesh.trust_domain))
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=INBOUND_HCM,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        route_config=route_pb2.RouteConfiguration(
            name=LAYOUT.pod_chain_name(pod.address),
            virtual_hosts=[
                route_components_pb2.VirtualHost(
                    name=LAYOUT.pod_chain_name(pod.address), domains=["*"], routes=routes
                )
            ],
        ),
        http_filters=[
            hcm_pb2.HttpFilter(name=HTTP_RBAC, typed_config=pack(deny_all)),
            hcm_pb2.HttpFilter(name=ROUTER, typed_config=pack(router_pb2.Router())),
        ],
        http2_protocol_options=protocol_pb2.Http2ProtocolOptions(allow_connect=True),
        upgrade_configs=[hcm_pb2.HttpConnectionManager.UpgradeConfig(upgrade_type="CONNECT")],
        access_log=[_stdout_log(_INBOUND_LOG)],
    )
    socket = downstream_tls(
        LAYOUT.cert_secret(identity),
        LAYOUT.inbound_validation_secret(identity),
        alpn=("h2",),
        tls13=True,
    )
    return listener_components_pb2.FilterChain(
        name=LAYOUT.pod_chain_name(pod.address),
        filter_chain_match=listener_components_pb2.FilterChainMatch(
            prefix_ranges=[host_prefix(pod.address)]
        ),
        filters=[listener_components_pb2.Filter(name=HCM, typed_config=pack(manager))],
        transport_socket=socket,
    )


def _inbound_listener(mesh: Mesh, pods: Iterable[Workload]) -> listener_pb2.Listener:
    return listener_pb2.Listener(
        name=LAYOUT.inbound_listener,
        address=socket_address("0.0.0.0", HBONE_PORT),
        traffic_direction=base_pb2.INBOUND,
        filter_chains=[_pod_chain(mesh, pod) for pod in sorted(pods, key=lambda w: w.address)],
    )


def _plaintext_chain(pod: Workload, inbound: InboundPort) -> listener_components_pb2.FilterChain:
    """``inbound_plaintext_<ip>_<port>``: a ``permissive`` port's bytes to the app, or
    (``strict``) to ``BlackHoleCluster``, which closes the connection as it opens."""
    name = LAYOUT.plaintext_chain_name(pod.address, inbound.port)
    proxy = tcp_proxy_pb2.TcpProxy(
        stat_prefix=name,
        cluster=VIRTUAL_INBOUND if inbound.plaintext else LAYOUT.blackhole,
        access_log=[_stdout_log(_PLAINTEXT_LOG)],
    )
    return listener_components_pb2.FilterChain(
        name=name,
        filter_chain_match=listener_components_pb2.FilterChainMatch(
            prefix_ranges=[host_prefix(pod.address)],
            destination_port=wrappers_pb2.UInt32Value(value=inbound.port),
        ),
        filters=[listener_components_pb2.Filter(name=TCP_PROXY, typed_config=pack(proxy))],
    )


def _plaintext_listener(mesh: Mesh, pods: Iterable[Workload]) -> listener_pb2.Listener:
    """``ztunnel_inbound_plaintext`` (15006): a chain per local pod port, chosen by the
    original destination; a connection matching none is closed."""
    chains = [
        _plaintext_chain(pod, inbound)
        for pod in sorted(pods, key=lambda w: w.address)
        for inbound in sorted(inbound_ports(mesh, pod), key=lambda p: p.port)
    ]
    return listener_pb2.Listener(
        name=LAYOUT.plaintext_listener,
        address=socket_address("0.0.0.0", LAYOUT.plaintext_port),
        traffic_direction=base_pb2.INBOUND,
        listener_filters=[original_dst()],
        filter_chains=chains,
    )


def _virtual_inbound() -> cluster_pb2.Cluster:
    """The app behind a tunnel: the address ``x-envoy-original-dst-host`` names (the
    inbound routes let through only the pod's own ports); for plaintext, which has no
    such header, the connection's original destination (a chain's pod port)."""
    cluster = _original_dst_cluster(VIRTUAL_INBOUND)
    cluster.original_dst_lb_config.CopyFrom(
        cluster_pb2.Cluster.OriginalDstLbConfig(use_http_header=True)
    )
    return _marked(cluster)


# --- the node proxy's snapshot ----------------------------------------------------------------


def node_snapshot(mesh: Mesh, node: Node) -> Snapshot:
    """Everything ``node``'s proxy needs for the ambient workloads on it."""
    key = ("ambient", node.name)
    cached = mesh.derived.get(key)
    if isinstance(cached, Snapshot):
        return cached
    pods = mesh.ambient_workloads(node)
    by_type: dict[str, dict[str, Message]] = defaultdict(dict)
    listeners: dict[str, Message] = {}
    by_source: dict[str, dict[str, dict[int, str]]] = {}
    secrets = {ISTIO_ROOTCA}
    for pod in pods:
        source = mesh.identity_of(pod)
        secrets.add(LAYOUT.cert_secret(source))
        dests = by_source.setdefault(pod.address, {})
        for service, port in mesh.reachable(source):
            assert service.address is not None  # reachable() lists addressable services
            chain = LAYOUT.outbound_chain_name(source, service, port.port, port.protocol)
            dests.setdefault(service.address, {})[port.port] = chain
            if chain in by_type[CLUSTER_TYPE]:
                continue  # a replica of the same identity on this node
            backends = [w for w in mesh.endpoints(service) if w.ambient]
            by_type[CLUSTER_TYPE][chain] = _outbound_internal_cluster(chain)
            by_type[ENDPOINT_TYPE][chain] = _tunnel_endpoints(
                chain, source, backends, port.target, mesh
            )
            for destination in {mesh.identity_of(w) for w in backends}:
                tunnel = _tunnel_cluster(source, destination)
                by_type[CLUSTER_TYPE][tunnel.name] = tunnel
            listener = _tunnel_listener(source)
            listeners[listener.name] = listener
    fallback = LAYOUT.passthrough if mesh.egress == "passthrough" else LAYOUT.blackhole
    outbound = _outbound_listener(by_source, fallback)
    listeners[outbound.name] = outbound
    if any(pod.ports for pod in pods):
        serving = [pod for pod in pods if pod.ports]
        inbound = _inbound_listener(mesh, serving)
        listeners[inbound.name] = inbound
        plaintext = _plaintext_listener(mesh, serving)
        listeners[plaintext.name] = plaintext
        by_type[CLUSTER_TYPE][VIRTUAL_INBOUND] = _virtual_inbound()
    passthrough = _marked(_original_dst_cluster(LAYOUT.passthrough))
    by_type[CLUSTER_TYPE][passthrough.name] = passthrough
    blackhole = clusters.blackhole_cluster(LAYOUT.blackhole)
    by_type[CLUSTER_TYPE][blackhole.name] = blackhole
    by_type[LISTENER_TYPE] = listeners
    snapshot = Snapshot.of(by_type, tuple(sorted(secrets)))
    mesh.derived[key] = snapshot
    return snapshot


def node_of(mesh: Mesh, proxy: SpiffeId) -> Node:
    """The node ``proxy`` is the node proxy of; GenerationError when it is none's."""
    node = mesh.node_proxied_by(proxy)
    if node is None:
        raise GenerationError(
            f"{proxy} is not the node proxy of any node in the mesh file "
            "(the ambient layout serves nodes[].identity)"
        )
    return node
