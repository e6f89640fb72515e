"""Layouts: choosing one (mesh file, bootstrap, node metadata), the refusals, and the
shape of the ``istio-sidecar`` layout generated from the same mesh and identities as
OSM's. Envoy's own verdict on every layout is in ``test_envoy_generate.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from google.protobuf import descriptor_pool, message_factory

from meshca.envoy.ads_bootstrap import LAYOUT_METADATA, build_ads_bootstrap
from meshca.envoy.bootstrap import BootstrapError, BootstrapSpec
from meshca.envoy.generate import generate
from meshca.envoy.mesh import Mesh, MeshError, load_mesh, parse_mesh
from meshca.envoy.xds import GenerationError
from meshca.spiffe import SpiffeId, TrustDomain
from meshca.util.netaddr import UnixServer
from meshca.xds.resources import CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE
from tests.envoy_harness import BOOKSTORE_MESH, bookstore_document

TD = TrustDomain("cluster.local")
ISTIO = "istio-sidecar"


def sid(namespace: str, account: str) -> SpiffeId:
    return SpiffeId.from_kubernetes(namespace, account, TD)


BUYER = sid("bookbuyer", "bookbuyer")
STORE_V1 = sid("bookstore", "bookstore-v1")
WAREHOUSE = sid("bookwarehouse", "bookwarehouse")
STORE_FQDN = "bookstore.bookstore.svc.cluster.local"


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    return load_mesh(BOOKSTORE_MESH, TD)


def unpack(packed: Any) -> Any:
    name = packed.type_url.rsplit("/", 1)[1]
    cls = message_factory.GetMessageClass(descriptor_pool.Default().FindMessageTypeByName(name))
    message = cls()
    packed.Unpack(message)
    return message


# --- choosing a layout ---------------------------------------------------------------------


def test_osm_is_the_default_and_the_mesh_file_can_choose_per_workload(mesh: Mesh) -> None:
    assert "outbound-listener" in generate(mesh, STORE_V1).get(LISTENER_TYPE)
    document = bookstore_document()
    for workload in document["workloads"]:
        if workload["name"] == "bookstore-v1":
            workload["layout"] = ISTIO
    chosen = parse_mesh(document, TD)
    assert set(generate(chosen, STORE_V1).get(LISTENER_TYPE)) >= {
        "virtualOutbound",
        "virtualInbound",
    }
    assert generate(chosen, STORE_V1, layout=ISTIO).versions == generate(chosen, STORE_V1).versions
    with pytest.raises(GenerationError, match="has layout istio-sidecar in the mesh file"):
        generate(chosen, STORE_V1, layout="osm")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layout": "ztunnel"}, "layout 'ztunnel' is not one of osm, istio-sidecar, ambient"),
        ({"layout": "x" * 1000}, "layout name longer than 64 characters"),
        ({"layout": ISTIO, "capture": "explicit"}, "supports capture intercept, not explicit"),
    ],
)
def test_generation_refuses_bad_layouts(mesh: Mesh, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(GenerationError, match=message):
        generate(mesh, BUYER, **kwargs)


def test_bootstrap_carries_the_layout_and_refuses_bad_ones(tmp_path: Path) -> None:
    spec = BootstrapSpec(BUYER, UnixServer(tmp_path / "meshca.sock"))
    bootstrap = build_ads_bootstrap(spec, layout=ISTIO)
    assert bootstrap["node"]["metadata"][LAYOUT_METADATA] == ISTIO
    assert LAYOUT_METADATA not in build_ads_bootstrap(spec)["node"]["metadata"]
    with pytest.raises(
        BootstrapError, match="--layout 'istio': expected one of osm, istio-sidecar"
    ):
        build_ads_bootstrap(spec, layout="istio")
    with pytest.raises(BootstrapError, match="works with --capture intercept, not explicit"):
        build_ads_bootstrap(spec, layout=ISTIO, capture="explicit")


@pytest.mark.parametrize("port", [15001, 15003, 15006, 15008])
def test_ports_the_proxy_listens_on_are_refused_in_the_mesh_file(port: int) -> None:
    document = bookstore_document()
    document["workloads"][0]["ports"] = [port]
    with pytest.raises(MeshError, match=rf"workloads\[0\]\.ports\[0\]\.port: {port} is reserved"):
        parse_mesh(document, TD)


def test_service_ports_the_proxy_listens_on_are_refused() -> None:
    document = bookstore_document()
    document["services"][0]["ports"] = [{"port": 15006, "target_port": 14001}]
    with pytest.raises(MeshError, match=r"services\[0\]\.ports\[0\]\.port: 15006 is reserved"):
        parse_mesh(document, TD)


def test_an_unknown_layout_in_the_mesh_file_is_refused() -> None:
    document = bookstore_document()
    document["workloads"][2]["layout"] = "linkerd"
    with pytest.raises(MeshError, match=r"workloads\[2\]\.layout: 'linkerd' is not one of"):
        parse_mesh(document, TD)


# --- istio-sidecar: Istio's names, ports and shape ------------------------------------------


def test_istio_outbound_is_virtual_outbound_handing_off_by_port(mesh: Mesh) -> None:
    snapshot = generate(mesh, BUYER, layout=ISTIO)
    listeners = snapshot.get(LISTENER_TYPE)
    assert set(listeners) == {"virtualOutbound", "0.0.0.0_14001"}
    virtual = listeners["virtualOutbound"]
    assert virtual.address.socket_address.port_value == 15001
    assert virtual.use_original_dst.value is True
    (fallback,) = virtual.filter_chains
    assert unpack(fallback.filters[0].typed_config).cluster == "BlackHoleCluster"
    handoff = listeners["0.0.0.0_14001"]
    assert handoff.bind_to_port.value is False
    manager = unpack(handoff.filter_chains[0].filters[0].typed_config)
    assert manager.rds.route_config_name == "14001"
    assert set(snapshot.get(CLUSTER_TYPE)) == {
        "BlackHoleCluster",
        "PassthroughCluster",
        f"outbound|14001|v1|{STORE_FQDN}",
        f"outbound|14001|v2|{STORE_FQDN}",
    }
    assert set(snapshot.get(ENDPOINT_TYPE)) == {
        f"outbound|14001|v1|{STORE_FQDN}",
        f"outbound|14001|v2|{STORE_FQDN}",
    }
    assert snapshot.secret_names == ("ROOTCA", "default")


def test_istio_routes_are_named_by_port_with_fqdn_port_hosts(mesh: Mesh) -> None:
    route = generate(mesh, BUYER, layout=ISTIO).get(ROUTE_TYPE)["14001"]
    hosts = {vh.name: vh for vh in route.virtual_hosts}
    assert list(hosts) == [f"{STORE_FQDN}:14001", "block_all"]
    domains = list(hosts[f"{STORE_FQDN}:14001"].domains)
    forms = ("bookstore.bookstore", "bookstore.bookstore.svc", "bookstore.bookstore.svc.cluster")
    for form in (*forms, STORE_FQDN, "127.0.0.101"):
        assert form in domains and f"{form}:14001" in domains
    weights = hosts[f"{STORE_FQDN}:14001"].routes[0].route.weighted_clusters.clusters
    assert [(w.name, w.weight.value) for w in weights] == [
        (f"outbound|14001|v1|{STORE_FQDN}", 50),
        (f"outbound|14001|v2|{STORE_FQDN}", 50),
    ]
    assert hosts["block_all"].routes[0].direct_response.status == 502


def test_istio_clusters_send_istios_sni_alpn_and_secrets(mesh: Mesh) -> None:
    cluster = generate(mesh, STORE_V1, layout=ISTIO).get(CLUSTER_TYPE)
    upstream = cluster["outbound|14001||bookwarehouse.bookwarehouse.svc.cluster.local"]
    assert upstream.type == cluster_pb2.Cluster.EDS
    tls = unpack(upstream.transport_socket.typed_config)
    assert tls.sni == "outbound_.14001_._.bookwarehouse.bookwarehouse.svc.cluster.local"
    common = tls.common_tls_context
    assert list(common.alpn_protocols) == ["istio-peer-exchange", "istio"]
    assert [s.name for s in common.tls_certificate_sds_secret_configs] == ["default"]
    combined = common.combined_validation_context
    assert combined.validation_context_sds_secret_config.name == "ROOTCA"
    assert [
        m.matcher.exact for m in combined.default_validation_context.match_typed_subject_alt_names
    ] == ["spiffe://cluster.local/ns/bookwarehouse/sa/bookwarehouse"]
    split = generate(mesh, BUYER, layout=ISTIO).get(CLUSTER_TYPE)[f"outbound|14001|v2|{STORE_FQDN}"]
    assert unpack(split.transport_socket.typed_config).sni == f"outbound_.14001_.v2_.{STORE_FQDN}"


def test_istio_inbound_is_virtual_inbound_with_port_chains(mesh: Mesh) -> None:
    snapshot = generate(mesh, WAREHOUSE, layout=ISTIO)
    inbound = snapshot.get(LISTENER_TYPE)["virtualInbound"]
    assert inbound.address.socket_address.port_value == 15006
    assert [f.name for f in inbound.listener_filters] == [
        "envoy.filters.listener.original_dst",
        "envoy.filters.listener.tls_inspector",
    ]
    (chain,) = inbound.filter_chains  # STRICT: TLS only
    assert chain.name == "0.0.0.0_14001"
    assert chain.filter_chain_match.destination_port.value == 14001
    assert chain.filter_chain_match.transport_protocol == "tls"
    tls = unpack(chain.transport_socket.typed_config)
    assert tls.require_client_certificate.value is True
    assert [s.name for s in tls.common_tls_context.tls_certificate_sds_secret_configs] == [
        "default"
    ]
    assert tls.common_tls_context.validation_context_sds_secret_config.name == "ROOTCA"
    manager = unpack(chain.filters[0].typed_config)
    assert manager.route_config.name == "inbound|14001||"
    (vhost,) = manager.route_config.virtual_hosts
    assert vhost.name == "inbound|http|14001"
    assert vhost.routes[0].route.cluster == "inbound|14001||"
    local = snapshot.get(CLUSTER_TYPE)["inbound|14001||"]
    assert local.type == cluster_pb2.Cluster.STATIC


def test_istio_permissive_adds_a_raw_buffer_chain() -> None:
    document = bookstore_document()
    for service in document["services"]:
        if service["name"] == "bookwarehouse":
            service["mtls"] = "permissive"
    inbound = generate(parse_mesh(document, TD), WAREHOUSE, layout=ISTIO).get(LISTENER_TYPE)[
        "virtualInbound"
    ]
    matches = {c.name: c.filter_chain_match.transport_protocol for c in inbound.filter_chains}
    assert matches == {"0.0.0.0_14001": "tls", "0.0.0.0_14001|plaintext": "raw_buffer"}


def test_istio_tcp_service_gets_an_ip_port_listener(mesh: Mesh) -> None:
    listeners = generate(mesh, WAREHOUSE, layout=ISTIO).get(LISTENER_TYPE)
    tcp = listeners["127.0.0.103_3306"]
    assert tcp.bind_to_port.value is False
    assert tcp.address.socket_address.address == "127.0.0.103"
    proxy = unpack(tcp.filter_chains[0].filters[0].typed_config)
    assert proxy.cluster == "outbound|3306||mysql.bookwarehouse.svc.cluster.local"


def test_passthrough_egress_in_istio_is_passthrough_cluster() -> None:
    document = bookstore_document()
    document["egress"] = "passthrough"
    snapshot = generate(parse_mesh(document, TD), BUYER, layout=ISTIO)
    virtual = snapshot.get(LISTENER_TYPE)["virtualOutbound"]
    assert unpack(virtual.filter_chains[0].filters[0].typed_config).cluster == "PassthroughCluster"
    route = snapshot.get(ROUTE_TYPE)["14001"]
    assert route.virtual_hosts[-1].name == "allow_any"
    assert route.virtual_hosts[-1].routes[0].route.cluster == "PassthroughCluster"


def test_layouts_share_the_mesh_model_and_identities(mesh: Mesh) -> None:
    """Same endpoints, same allowed callers, same upstream identities: only names differ."""
    osm = generate(mesh, BUYER)
    istio = generate(mesh, BUYER, layout=ISTIO)
    osm_endpoints = sorted(
        [
            lb.endpoint.address.socket_address.address
            for loc in e.endpoints
            for lb in loc.lb_endpoints
        ]
        for e in osm.get(ENDPOINT_TYPE).values()
    )
    istio_endpoints = sorted(
        [
            lb.endpoint.address.socket_address.address
            for loc in e.endpoints
            for lb in loc.lb_endpoints
        ]
        for e in istio.get(ENDPOINT_TYPE).values()
    )
    assert osm_endpoints == istio_endpoints
    thief_view = generate(mesh, sid("bookthief", "bookthief"), layout=ISTIO)
    assert not any("bookwarehouse" in name for name in thief_view.get(CLUSTER_TYPE))
