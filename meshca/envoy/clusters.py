"""Clusters (CDS): one EDS cluster per upstream service port (and split backend), the
local app behind the inbound listener, and the outbound fallbacks. Their names come
from the layout (:mod:`meshca.envoy.layouts`)."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, protocol_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

from meshca.envoy.endpoints import addresses_assignment
from meshca.envoy.xds import CONNECT_TIMEOUT, ads_source, pack

_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def http2(cluster: cluster_pb2.Cluster) -> None:
    """Speak HTTP/2 upstream (gRPC; HBONE's CONNECT streams)."""
    options = http_protocol_options_pb2.HttpProtocolOptions(
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
        )
    )
    cluster.typed_extension_protocol_options[_HTTP_OPTIONS].CopyFrom(pack(options))


def upstream_cluster(
    name: str, protocol: str, transport_socket: base_pb2.TransportSocket
) -> cluster_pb2.Cluster:
    """Endpoints over ADS; mTLS as ``transport_socket`` says."""
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ads_source()),
        connect_timeout=CONNECT_TIMEOUT,
        transport_socket=transport_socket,
    )
    if protocol == "grpc":
        http2(cluster)
    return cluster


def local_cluster(name: str, port: int, address: str, protocol: str) -> cluster_pb2.Cluster:
    """The application behind this proxy, plain text on its own address."""
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=CONNECT_TIMEOUT,
        load_assignment=addresses_assignment(name, [address], port),
    )
    if protocol == "grpc":
        http2(cluster)
    return cluster


def blackhole_cluster(name: str) -> cluster_pb2.Cluster:
    """No endpoints: a connection routed here is closed at once."""
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=CONNECT_TIMEOUT,
        load_assignment=endpoint_pb2.ClusterLoadAssignment(cluster_name=name),
    )


def passthrough_cluster(name: str) -> cluster_pb2.Cluster:
    """To the connection's original destination, unencrypted (egress outside the mesh)."""
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.ORIGINAL_DST,
        lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED,
        connect_timeout=CONNECT_TIMEOUT,
    )
