"""Endpoints (EDS): every workload address behind a cluster, at the service's target port."""

from __future__ import annotations

from collections.abc import Iterable

from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2

from meshca.envoy.model import Workload
from meshca.envoy.xds import socket_address


def load_assignment(
    cluster_name: str, workloads: Iterable[Workload], port: int
) -> endpoint_pb2.ClusterLoadAssignment:
    """Workload addresses sorted, so the bytes (and the version) depend only on the set."""
    return addresses_assignment(cluster_name, sorted({w.address for w in workloads}), port)


def addresses_assignment(
    cluster_name: str, addresses: Iterable[str], port: int
) -> endpoint_pb2.ClusterLoadAssignment:
    """Every address at ``port``, in the order given."""
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=cluster_name,
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                lb_endpoints=[
                    endpoint_components_pb2.LbEndpoint(
                        endpoint=endpoint_components_pb2.Endpoint(
                            address=socket_address(address, port)
                        )
                    )
                    for address in addresses
                ]
            )
        ],
    )
