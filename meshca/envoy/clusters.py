"""Clusters (CDS): one EDS cluster per upstream service port (and split backend), the
local app behind the inbound listener, and the outbound fallback.

Names are stable and readable in Envoy's stats: ``<ns>/<svc>|<port>`` and
``<ns>/<svc>|<port>|<backend>`` for a traffic split's backend.
"""

from __future__ import annotations

from collections.abc import Iterable

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import protocol_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

from meshca.envoy.endpoints import addresses_assignment
from meshca.envoy.model import Service
from meshca.envoy.tls import upstream_tls
from meshca.envoy.xds import CONNECT_TIMEOUT, ads_source, pack
from meshca.spiffe import SpiffeId

BLACKHOLE = "blackhole"
PASSTHROUGH = "passthrough-outbound"
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def cluster_name(service: Service, port: int, backend: str | None = None) -> str:
    name = f"{service.namespace}/{service.name}|{port}"
    return name if backend is None else f"{name}|{backend}"


def local_cluster_name(port: int) -> str:
    return f"local-app|{port}"


def _http2(cluster: cluster_pb2.Cluster) -> None:
    options = http_protocol_options_pb2.HttpProtocolOptions(
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
        )
    )
    cluster.typed_extension_protocol_options[_HTTP_OPTIONS].CopyFrom(pack(options))


def upstream_cluster(
    name: str,
    proxy: SpiffeId,
    service: Service,
    protocol: str,
    upstream_ids: Iterable[SpiffeId],
) -> cluster_pb2.Cluster:
    """Endpoints over ADS; mTLS as ``proxy`` to exactly ``upstream_ids``."""
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ads_source()),
        connect_timeout=CONNECT_TIMEOUT,
        transport_socket=upstream_tls(
            proxy, service.namespace, service.name, service.sni, upstream_ids
        ),
    )
    if protocol == "grpc":
        _http2(cluster)
    return cluster


def local_cluster(port: int, address: str, protocol: str) -> cluster_pb2.Cluster:
    """The application behind this proxy, plain text on its own address."""
    name = local_cluster_name(port)
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=CONNECT_TIMEOUT,
        load_assignment=addresses_assignment(name, [address], port),
    )
    if protocol == "grpc":
        _http2(cluster)
    return cluster


def blackhole_cluster() -> cluster_pb2.Cluster:
    """No endpoints: a connection routed here is closed at once."""
    return cluster_pb2.Cluster(
        name=BLACKHOLE,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=CONNECT_TIMEOUT,
        load_assignment=endpoint_pb2.ClusterLoadAssignment(cluster_name=BLACKHOLE),
    )


def passthrough_cluster() -> cluster_pb2.Cluster:
    """To the connection's original destination, unencrypted (egress outside the mesh)."""
    return cluster_pb2.Cluster(
        name=PASSTHROUGH,
        type=cluster_pb2.Cluster.ORIGINAL_DST,
        lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED,
        connect_timeout=CONNECT_TIMEOUT,
    )
