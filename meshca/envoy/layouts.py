"""The names and ports of each layout: how one mesh system's config dump reads.

A layout is a generation profile, not a second generator: the same builders make the
same listeners, clusters, routes and TLS contexts from the same mesh model and keyed on
the same identities; a layout only says what they are called, which ports the proxy
listens on, which SDS secrets it names, the SNI and ALPN its clusters send, and (in
:mod:`meshca.envoy.generate`) how the outbound side is shaped. ``osm`` follows Open
Service Mesh (meshca's original layout), ``istio-sidecar`` Istio's sidecar. ``ambient``
(Istio's ztunnel, HBONE) is a node proxy's layout: its resources are built by
:mod:`meshca.envoy.ambient`, with the names this class gives.
"""

from __future__ import annotations

from typing import ClassVar

from meshca.envoy.model import DEFAULT_LAYOUT, LAYOUTS, Service
from meshca.envoy.xds import GenerationError, inbound_validation_secret, service_cert_secret
from meshca.spiffe import SpiffeId
from meshca.xds.resources import ISTIO_DEFAULT, ISTIO_ROOTCA, outbound_validation_name

__all__ = [
    "DEFAULT_LAYOUT",
    "LAYOUTS",
    "Ambient",
    "IstioSidecar",
    "Layout",
    "Osm",
    "layout_named",
]


class Layout:
    """OSM's names; subclasses override what differs."""

    name: ClassVar[str] = "osm"
    outbound_port: ClassVar[int] = 15001
    inbound_port: ClassVar[int] = 15003
    outbound_listener: ClassVar[str] = "outbound-listener"
    inbound_listener: ClassVar[str] = "inbound-listener"
    blackhole: ClassVar[str] = "blackhole"
    passthrough: ClassVar[str] = "passthrough-outbound"
    upstream_alpn: ClassVar[tuple[str, ...]] = ()
    captures: ClassVar[tuple[str, ...]] = ("intercept", "explicit")
    # the inbound listener always has the TLS inspector and its mTLS chains match
    # ``transport_protocol: tls`` (Istio); else only where a port also takes plaintext
    inspect_tls: ClassVar[bool] = False

    def cert_secret(self, proxy: SpiffeId) -> str:
        return service_cert_secret(proxy)

    def inbound_validation_secret(self, proxy: SpiffeId) -> str:
        return inbound_validation_secret(proxy)

    def outbound_validation_secret(self, service: Service) -> str:
        return outbound_validation_name(service.namespace, service.name)

    def cluster_name(self, service: Service, port: int, backend: str | None = None) -> str:
        name = f"{service.namespace}/{service.name}|{port}"
        return name if backend is None else f"{name}|{backend}"

    def sni(self, service: Service, port: int, backend: str | None = None) -> str:
        return service.sni

    def local_cluster_name(self, port: int) -> str:
        return f"local-app|{port}"

    def inbound_chain_name(self, port: int) -> str:
        return f"inbound|{port}"

    def inbound_route_name(self, port: int) -> str:
        return f"inbound|{port}"

    def inbound_virtual_host_name(self, port: int) -> str:
        return f"inbound|{port}"

    def route_config_name(self, port: int) -> str:
        return f"rds-outbound.{port}"

    def virtual_host_name(self, service: Service, port: int) -> str:
        return f"{service.namespace}/{service.name}|{port}"


class Osm(Layout):
    pass


class IstioSidecar(Layout):
    """Istio's sidecar: ``virtualOutbound`` on 15001 hands connections to per-port
    listeners, ``virtualInbound`` on 15006, ``outbound|<port>|<subset>|<fqdn>`` clusters
    with Istio's SNI and ALPN, secrets ``default`` and ``ROOTCA``."""

    name = "istio-sidecar"
    inbound_port = 15006
    outbound_listener = "virtualOutbound"
    inbound_listener = "virtualInbound"
    blackhole = "BlackHoleCluster"
    passthrough = "PassthroughCluster"
    upstream_alpn = ("istio-peer-exchange", "istio")
    captures = ("intercept",)
    inspect_tls = True

    def cert_secret(self, proxy: SpiffeId) -> str:
        return ISTIO_DEFAULT

    def inbound_validation_secret(self, proxy: SpiffeId) -> str:
        return ISTIO_ROOTCA

    def outbound_validation_secret(self, service: Service) -> str:
        return ISTIO_ROOTCA

    def cluster_name(self, service: Service, port: int, backend: str | None = None) -> str:
        return f"outbound|{port}|{backend or ''}|{service.sni}"

    def sni(self, service: Service, port: int, backend: str | None = None) -> str:
        return f"outbound_.{port}_.{backend or ''}_.{service.sni}"

    def local_cluster_name(self, port: int) -> str:
        return f"inbound|{port}||"

    def inbound_chain_name(self, port: int) -> str:
        return f"0.0.0.0_{port}"

    def inbound_route_name(self, port: int) -> str:
        return f"inbound|{port}||"

    def inbound_virtual_host_name(self, port: int) -> str:
        return f"inbound|http|{port}"

    def route_config_name(self, port: int) -> str:
        return str(port)

    def virtual_host_name(self, service: Service, port: int) -> str:
        return f"{service.sni}:{port}"


class Ambient(Layout):
    """Istio ambient's ztunnel: ``ztunnel_outbound`` on 15001, HBONE (HTTP CONNECT over
    mTLS) to ``ztunnel_inbound`` on 15008, plaintext to ``ztunnel_inbound_plaintext`` on
    15006, secrets named by each workload's SPIFFE ID (one node proxy holds several) and
    ``ROOTCA``."""

    name = "ambient"
    inbound_port = 15008
    outbound_listener = "ztunnel_outbound"
    inbound_listener = "ztunnel_inbound"
    plaintext_port = 15006
    plaintext_listener = "ztunnel_inbound_plaintext"
    blackhole = "BlackHoleCluster"
    passthrough = "PassthroughCluster"
    upstream_alpn = ("h2",)
    captures = ("intercept",)

    def cert_secret(self, proxy: SpiffeId) -> str:
        return str(proxy)

    def inbound_validation_secret(self, proxy: SpiffeId) -> str:
        return ISTIO_ROOTCA

    def outbound_validation_secret(self, service: Service) -> str:
        return ISTIO_ROOTCA

    @staticmethod
    def outbound_chain_name(source: SpiffeId, service: Service, port: int, protocol: str) -> str:
        """The seed's ``<source>_to_<port name>_<fqdn>_outbound_internal``; the port name
        is Istio's convention ``<protocol>-<port>`` (mesh-file ports have no names)."""
        return f"{source}_to_{protocol}-{port}_{service.sni}_outbound_internal"

    @staticmethod
    def tunnel_listener(source: SpiffeId) -> str:
        return f"outbound_tunnel_lis_{source}"

    @staticmethod
    def tunnel_cluster(source: SpiffeId, destination: SpiffeId) -> str:
        return f"outbound_tunnel_clus_{source}_to_{destination}"

    @staticmethod
    def pod_chain_name(address: str) -> str:
        return f"inbound_{address}"

    @staticmethod
    def plaintext_chain_name(address: str, port: int) -> str:
        """``inbound_plaintext_<pod ip>_<port>``: one pod port reached without HBONE."""
        return f"inbound_plaintext_{address}_{port}"


_BY_NAME: dict[str, Layout] = {layout.name: layout for layout in (Osm(), IstioSidecar(), Ambient())}
assert tuple(_BY_NAME) == LAYOUTS


def layout_named(name: str) -> Layout:
    found = _BY_NAME.get(name)
    if found is None:
        raise GenerationError(f"layout {name!r} is not one of {', '.join(LAYOUTS)}")
    return found
