"""Routes (RDS) for outbound HTTP: one route configuration per port, one virtual host
per reachable service, weighted clusters when a traffic split applies.

One configuration per port (OSM's ``rds-outbound.<port>``, Istio's ``<port>``) because
a virtual host's domains must be unique within a configuration, and ``bookstore``
means a different destination on port 80 than on 8080.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from envoy.config.route.v3 import route_components_pb2, route_pb2
from google.protobuf import duration_pb2, wrappers_pb2

from meshca.envoy.model import Service, ServicePort


@dataclass(frozen=True)
class Upstream:
    """A reachable service port and the clusters (with weights) that carry its traffic."""

    service: Service
    port: ServicePort
    clusters: tuple[tuple[str, int], ...]

    @property
    def name(self) -> str:
        return f"{self.service.namespace}/{self.service.name}|{self.port.port}"

    @property
    def live(self) -> list[tuple[str, int]]:
        """The clusters that take traffic (a split backend may weigh 0)."""
        return [(name, weight) for name, weight in self.clusters if weight > 0]


def domains(service: Service, port: int, *, same_namespace: bool) -> list[str]:
    """Every name a client may put in Host: the DNS forms and the ClusterIP, each also
    with ``:port``. The bare ``svc`` form resolves only inside the service's namespace
    (the resolver's search path), so it is offered only to proxies there."""
    names = list(service.hostnames())
    if not same_namespace:
        names.remove(service.name)
    if service.address is not None:
        names.append(f"[{service.address}]" if ":" in service.address else service.address)
    return [form for name in names for form in (name, f"{name}:{port}")]


def _action(upstream: Upstream) -> route_components_pb2.RouteAction:
    live = upstream.live
    if len(live) == 1:
        action = route_components_pb2.RouteAction(cluster=live[0][0])
    else:
        action = route_components_pb2.RouteAction(
            weighted_clusters=route_components_pb2.WeightedCluster(
                clusters=[
                    route_components_pb2.WeightedCluster.ClusterWeight(
                        name=name, weight=wrappers_pb2.UInt32Value(value=weight)
                    )
                    for name, weight in live
                ]
            )
        )
    # always set: Envoy's default cuts every request at 15 s; 0 is none, as OSM and Istio
    action.timeout.CopyFrom(duration_pb2.Duration(seconds=upstream.port.timeout))
    return action


def virtual_host(
    name: str, upstream: Upstream, *, same_namespace: bool
) -> route_components_pb2.VirtualHost:
    return route_components_pb2.VirtualHost(
        name=name,
        domains=domains(upstream.service, upstream.port.port, same_namespace=same_namespace),
        routes=[
            route_components_pb2.Route(
                name="default",
                match=route_components_pb2.RouteMatch(prefix="/"),
                route=_action(upstream),
            )
        ],
    )


def fallback_virtual_host(passthrough: str | None) -> route_components_pb2.VirtualHost:
    """Istio's catch-all for a Host no service claims: ``allow_any`` to the passthrough
    cluster, or ``block_all`` answering 502."""
    route = route_components_pb2.Route(match=route_components_pb2.RouteMatch(prefix="/"))
    if passthrough is not None:
        route.route.CopyFrom(
            route_components_pb2.RouteAction(cluster=passthrough, timeout=duration_pb2.Duration())
        )
    else:
        route.direct_response.status = 502
    return route_components_pb2.VirtualHost(
        name="allow_any" if passthrough is not None else "block_all",
        domains=["*"],
        routes=[route],
    )


def outbound_route_config(
    name: str,
    hosts: Iterable[tuple[str, Upstream]],
    proxy_namespace: str,
    fallback: route_components_pb2.VirtualHost | None = None,
) -> route_pb2.RouteConfiguration:
    """``hosts``: (virtual host name, upstream) pairs, ordered by name."""
    virtual_hosts = [
        virtual_host(vhost, u, same_namespace=u.service.namespace == proxy_namespace)
        for vhost, u in sorted(hosts, key=lambda h: h[0])
    ]
    if fallback is not None:
        virtual_hosts.append(fallback)
    return route_pb2.RouteConfiguration(name=name, virtual_hosts=virtual_hosts)
