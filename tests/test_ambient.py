"""The ``ambient`` layout's generated resources: a node proxy's configuration for the
workloads on its node (HBONE outbound and inbound, ztunnel's names), what Envoy says of
it, and the refusals (mesh file, bootstrap, generation). Traffic through real node
proxies is in ``test_ambient_netns.py``; the node proxy's certificate authorization on
SDS/ADS is tested here against a real ``meshca serve``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from envoy.config.cluster.v3 import cluster_pb2
from google.protobuf import json_format

from meshca.backends.local import init_local_ca
from meshca.envoy.ads_bootstrap import LAYOUT_METADATA, build_ads_bootstrap
from meshca.envoy.bootstrap import BootstrapError, BootstrapSpec
from meshca.envoy.generate import generate
from meshca.envoy.mesh import Mesh, MeshError, parse_mesh
from meshca.envoy.xds import GenerationError
from meshca.issuer import Issuer
from meshca.issuer.svid import spiffe_id_of
from meshca.spiffe import SpiffeId, TrustDomain
from meshca.util.netaddr import UnixServer
from meshca.xds.resources import CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, SECRET_TYPE
from tests.envoy_harness import validate_config
from tests.sds_harness import open_sotw, sds_harness, secrets_of, sotw
from tests.test_envoy_generate import inlined, unpack

TD = TrustDomain("cluster.local")
NODE_A = SpiffeId.parse("spiffe://cluster.local/ns/istio-system/sa/ztunnel-node-a")
NODE_B = SpiffeId.parse("spiffe://cluster.local/ns/istio-system/sa/ztunnel-node-b")
PORT = 9080
# pod -> (address, node, service account)
PODS = {
    "productpage": ("10.77.1.2", "node-a", "bookinfo-productpage"),
    "reviews-v1": ("10.77.1.3", "node-a", "bookinfo-reviews"),
    "reviews-v2": ("10.77.2.2", "node-b", "bookinfo-reviews-v2"),
    "ratings": ("10.77.2.3", "node-b", "bookinfo-ratings"),
}
SERVICES = {"reviews-v1": "10.96.0.11", "reviews-v2": "10.96.0.12"}  # ClusterIPs
OUTSIDE = "10.77.2.9"  # on node-b, not in the mesh


def sid(account: str) -> SpiffeId:
    return SpiffeId.from_kubernetes("default", account, TD)


PRODUCTPAGE = sid("bookinfo-productpage")
REVIEWS_V1 = sid("bookinfo-reviews")
REVIEWS_V2 = sid("bookinfo-reviews-v2")
RATINGS = sid("bookinfo-ratings")


def ambient_document() -> dict[str, Any]:
    """Two nodes, two ambient pods on each; productpage (node-a) may call reviews-v1
    (same node) and reviews-v2 (across); ratings (node-b) may call reviews-v1 (across).
    reviews-v2 is ``permissive`` (plaintext accepted too), reviews-v1 ``strict``."""
    workloads = []
    for name, (address, node, account) in PODS.items():
        entry: dict[str, Any] = {
            "name": name, "namespace": "default", "service_account": account,
            "address": address, "node": node, "layout": "ambient", "labels": {"app": name},
        }  # fmt: skip
        if name.startswith("reviews"):
            entry["ports"] = [PORT]
        workloads.append(entry)
    return {
        "egress": "passthrough",
        "nodes": [
            {"name": "node-a", "identity": str(NODE_A)},
            {"name": "node-b", "identity": str(NODE_B)},
        ],
        "workloads": workloads,
        "services": [
            {
                "name": name,
                "namespace": "default",
                "address": address,
                "ports": [PORT],
                "selector": {"app": name},
                "mtls": "permissive" if name == "reviews-v2" else "strict",
            }
            for name, address in SERVICES.items()
        ],
        "access": {
            "policies": [
                {
                    "service": "default/reviews-v1",
                    "from": ["default/bookinfo-productpage", "default/bookinfo-ratings"],
                },
                {"service": "default/reviews-v2", "from": ["default/bookinfo-productpage"]},
            ]
        },
    }


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    return parse_mesh(ambient_document(), TD)


def as_dict(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def chain(source: SpiffeId, service: str) -> str:
    return f"{source}_to_http-{PORT}_{service}.default.svc.cluster.local_outbound_internal"


# --- what a node proxy gets --------------------------------------------------------------------


def test_a_node_proxy_gets_ztunnels_listeners_and_its_pods_secrets(mesh: Mesh) -> None:
    snapshot = generate(mesh, NODE_A)
    assert set(snapshot.get(LISTENER_TYPE)) == {
        "ztunnel_outbound",
        "ztunnel_inbound",
        "ztunnel_inbound_plaintext",
        f"outbound_tunnel_lis_{PRODUCTPAGE}",
    }
    # the certificates of node-a's pods (by SPIFFE ID) and ROOTCA: nothing of node-b's
    assert snapshot.secret_names == ("ROOTCA", str(PRODUCTPAGE), str(REVIEWS_V1))
    outbound = snapshot.get(LISTENER_TYPE)["ztunnel_outbound"]
    assert outbound.address.socket_address.port_value == 15001
    inbound = snapshot.get(LISTENER_TYPE)["ztunnel_inbound"]
    assert inbound.address.socket_address.port_value == 15008
    assert [c.name for c in inbound.filter_chains] == ["inbound_10.77.1.3"]
    node_b = generate(mesh, NODE_B)
    assert node_b.secret_names == ("ROOTCA", str(RATINGS), str(REVIEWS_V2))


def test_outbound_chain_is_picked_by_source_then_destination_ip_then_port(mesh: Mesh) -> None:
    listener = generate(mesh, NODE_A).get(LISTENER_TYPE)["ztunnel_outbound"]
    tree = as_dict(listener.filter_chain_matcher)["matcher_tree"]
    assert tree["input"]["name"] == "source-ip"
    by_destination = tree["exact_match_map"]["map"]["10.77.1.2"]["matcher"]["matcher_tree"]
    assert by_destination["input"]["name"] == "destination-ip"
    assert set(by_destination["exact_match_map"]["map"]) == set(SERVICES.values())
    by_port = by_destination["exact_match_map"]["map"]["10.96.0.12"]["matcher"]["matcher_tree"]
    action = by_port["exact_match_map"]["map"][str(PORT)]["action"]
    assert action["typed_config"]["value"] == chain(PRODUCTPAGE, "reviews-v2")
    # reviews-v1 calls nothing: its address is in no branch, so it takes the fallback
    assert "10.77.1.3" not in tree["exact_match_map"]["map"]
    fallback = as_dict(listener.filter_chain_matcher)["on_no_match"]["action"]
    assert fallback["typed_config"]["value"] == "PassthroughCluster"


def test_endpoints_are_internal_addresses_with_the_tunnel_metadata(mesh: Mesh) -> None:
    snapshot = generate(mesh, NODE_A)
    name = chain(PRODUCTPAGE, "reviews-v2")
    assert snapshot.get(CLUSTER_TYPE)[name].type == cluster_pb2.Cluster.EDS
    (endpoint,) = snapshot.get(ENDPOINT_TYPE)[name].endpoints[0].lb_endpoints
    internal = endpoint.endpoint.address.envoy_internal_address
    assert internal.server_listener_name == f"outbound_tunnel_lis_{PRODUCTPAGE}"
    assert internal.endpoint_id == f"10.77.2.2:{PORT}"
    tunnel = as_dict(endpoint.metadata)["filter_metadata"]["tunnel"]
    assert tunnel == {
        "destination": f"10.77.2.2:{PORT}",
        "address": "10.77.2.2:15008",
        "cluster": f"outbound_tunnel_clus_{PRODUCTPAGE}_to_{REVIEWS_V2}",
    }


def test_the_tunnel_presents_the_source_and_accepts_only_the_destination(mesh: Mesh) -> None:
    snapshot = generate(mesh, NODE_A)
    cluster = snapshot.get(CLUSTER_TYPE)[f"outbound_tunnel_clus_{PRODUCTPAGE}_to_{REVIEWS_V2}"]
    assert cluster.type == cluster_pb2.Cluster.ORIGINAL_DST
    assert [s.key for s in cluster.original_dst_lb_config.metadata_key.path] == ["address"]
    tls = unpack(cluster.transport_socket.typed_config).common_tls_context
    assert [s.name for s in tls.tls_certificate_sds_secret_configs] == [str(PRODUCTPAGE)]
    assert tls.combined_validation_context.validation_context_sds_secret_config.name == "ROOTCA"
    sans = tls.combined_validation_context.default_validation_context
    assert [m.matcher.exact for m in sans.match_typed_subject_alt_names] == [str(REVIEWS_V2)]
    listener = snapshot.get(LISTENER_TYPE)[f"outbound_tunnel_lis_{PRODUCTPAGE}"]
    assert listener.HasField("internal_listener")
    proxy = unpack(listener.filter_chains[0].filters[-1].typed_config)
    assert proxy.tunneling_config.hostname == "%DYNAMIC_METADATA(tunnel:destination)%"
    header = proxy.tunneling_config.headers_to_add[0].header
    assert (header.key, header.value) == (
        "x-envoy-original-dst-host",
        "%DYNAMIC_METADATA(tunnel:destination)%",
    )


def test_inbound_accepts_connect_to_the_pods_own_ports_from_admitted_callers(
    mesh: Mesh,
) -> None:
    inbound = generate(mesh, NODE_A).get(LISTENER_TYPE)["ztunnel_inbound"]
    (pod_chain,) = inbound.filter_chains
    assert pod_chain.filter_chain_match.prefix_ranges[0].address_prefix == "10.77.1.3"
    tls = unpack(pod_chain.transport_socket.typed_config)
    assert tls.require_client_certificate.value
    assert tls.common_tls_context.tls_certificate_sds_secret_configs[0].name == str(REVIEWS_V1)
    manager = unpack(pod_chain.filters[0].typed_config)
    assert [u.upgrade_type for u in manager.upgrade_configs] == ["CONNECT"]
    (route,) = manager.route_config.virtual_hosts[0].routes
    assert route.match.HasField("connect_matcher")
    assert route.match.headers[0].string_match.exact == f"10.77.1.3:{PORT}"
    assert route.route.cluster == "virtual_inbound"
    rules = unpack(route.typed_per_filter_config["envoy.filters.http.rbac"]).rbac.rules
    principals = rules.policies["allowed-callers"].principals
    admitted = {p.authenticated.principal_name.exact for p in principals}
    assert admitted == {str(PRODUCTPAGE), str(RATINGS)}
    base = unpack(manager.http_filters[0].typed_config)
    assert not base.rules.policies  # any other tunnel: denied
    virtual = generate(mesh, NODE_A).get(CLUSTER_TYPE)["virtual_inbound"]
    assert virtual.original_dst_lb_config.use_http_header


def _plaintext_chain(node: SpiffeId, pod: str) -> Any:
    listener = generate(parse_mesh(ambient_document(), TD), node).get(LISTENER_TYPE)[
        "ztunnel_inbound_plaintext"
    ]
    assert listener.address.socket_address.port_value == 15006
    assert [f.name for f in listener.listener_filters] == ["envoy.filters.listener.original_dst"]
    address = PODS[pod][0]
    (found,) = listener.filter_chains  # one pod port on each node
    assert found.name == f"inbound_plaintext_{address}_{PORT}"
    assert found.filter_chain_match.prefix_ranges[0].address_prefix == address
    assert found.filter_chain_match.destination_port.value == PORT
    assert not found.HasField("transport_socket")
    return found


def test_plaintext_inbound_forwards_for_a_permissive_service() -> None:
    found = _plaintext_chain(NODE_B, "reviews-v2")  # reviews-v2: permissive
    (proxy,) = found.filters  # no RBAC: a plaintext caller has no identity
    assert proxy.name == "envoy.filters.network.tcp_proxy"
    assert unpack(proxy.typed_config).cluster == "virtual_inbound"


def test_plaintext_inbound_is_closed_for_a_strict_service() -> None:
    found = _plaintext_chain(NODE_A, "reviews-v1")  # reviews-v1: strict
    (proxy,) = found.filters  # to a cluster without endpoints: closed as it opens
    assert unpack(proxy.typed_config).cluster == "BlackHoleCluster"
    blackhole = generate(parse_mesh(ambient_document(), TD), NODE_A).get(CLUSTER_TYPE)
    assert not blackhole["BlackHoleCluster"].load_assignment.endpoints
    document = ambient_document()
    document["services"][1]["mtls"] = "strict"  # reviews-v2 too: its chain closes now
    strict = generate(parse_mesh(document, TD), NODE_B).get(LISTENER_TYPE)
    (closed,) = strict["ztunnel_inbound_plaintext"].filter_chains
    assert unpack(closed.filters[0].typed_config).cluster == "BlackHoleCluster"


def test_a_mesh_change_on_another_node_leaves_this_node_alone(mesh: Mesh) -> None:
    document = ambient_document()
    document["workloads"][3]["labels"]["tier"] = "back"  # ratings, on node-b
    changed = parse_mesh(document, TD)
    assert generate(changed, NODE_A).versions == generate(mesh, NODE_A).versions


def test_cluster_domain_names_fqdns_and_chains() -> None:
    document = ambient_document()
    document["cluster_domain"] = "corp.example"
    snapshot = generate(parse_mesh(document, TD), NODE_A)
    assert any("reviews-v2.default.svc.corp.example" in name for name in snapshot.get(CLUSTER_TYPE))


# --- Envoy's verdict ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> Issuer:
    return Issuer(init_local_ca(tmp_path_factory.mktemp("ca"), TD).authority())


@pytest.mark.parametrize("node", [NODE_A, NODE_B])
def test_envoy_accepts_the_node_proxys_configuration(
    tmp_path: Path, mesh: Mesh, issuer: Issuer, node: SpiffeId
) -> None:
    """Inlined (routes, endpoints and real secrets static): Envoy cannot hold a static
    original-destination cluster whose secrets come over ADS, which is why the netns
    test is where the served form meets a real Envoy."""
    path = tmp_path / "inlined.json"
    path.write_text(json.dumps(inlined(generate(mesh, node), node, mesh, issuer)))
    result = validate_config(path)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"


# --- a node proxy's certificates, over real gRPC (mTLS as the node's identity) ----------------


async def _fetch(stub: Any, rpc: str, name: str) -> Any:
    """The first answer for secret ``name``, or the gRPC error that ended the call."""
    try:
        if rpc == "fetch":
            return await stub.FetchSecrets(sotw([name]), timeout=10)
        stream = await open_sotw(stub, sotw([name], type_url=SECRET_TYPE))
        return await stream.recv()
    except grpc.aio.AioRpcError as exc:
        return exc


@pytest.mark.parametrize("rpc", ["fetch", "ads"])
async def test_a_node_proxy_obtains_only_its_own_nodes_workload_keys(
    tmp_path: Path, mesh: Mesh, rpc: str
) -> None:
    async with sds_harness(tmp_path, mesh=mesh) as h:
        channel = h.mtls_channel(NODE_A)
        stub = h.ads_stub(channel) if rpc == "ads" else h.stub(channel)
        for own in (PRODUCTPAGE, REVIEWS_V1):
            answer = await _fetch(stub, rpc, str(own))
            assert not isinstance(answer, grpc.aio.AioRpcError), answer
            chain = secrets_of(answer)[str(own)].tls_certificate.certificate_chain.inline_bytes
            assert spiffe_id_of(x509.load_pem_x509_certificate(chain)) == own
        refused = await _fetch(stub, rpc, str(REVIEWS_V2))  # on node-b
        assert isinstance(refused, grpc.aio.AioRpcError)
        assert refused.code() == grpc.StatusCode.PERMISSION_DENIED, refused.details()
        assert f"may not obtain the private key of {REVIEWS_V2}" in (refused.details() or "")
        assert h.store.cached(REVIEWS_V2) is None, "node-b's key must not even be made"
        # a workload's own certificate buys no neighbour's key through the node either
        neighbour = await _fetch(h.stub(h.mtls_channel(PRODUCTPAGE)), "fetch", str(REVIEWS_V1))
        assert isinstance(neighbour, grpc.aio.AioRpcError)
        assert neighbour.code() == grpc.StatusCode.PERMISSION_DENIED
        # the mesh file decides: once reviews-v1 moves to node-b, node-a may not have it
        document = ambient_document()
        document["workloads"][1]["node"] = "node-b"
        h.set_mesh(parse_mesh(document, TD))
        moved = await _fetch(h.stub(h.mtls_channel(NODE_A)), "fetch", str(REVIEWS_V1))
        assert isinstance(moved, grpc.aio.AioRpcError)
        assert moved.code() == grpc.StatusCode.PERMISSION_DENIED


# --- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["workloads"][0].pop("node"), r"workloads\[0\]: layout ambient needs 'node'"),
        (lambda d: d["workloads"][0].update(node="node-c"), "no node node-c in nodes"),
        (lambda d: d["workloads"][0].update(layout="mesh"), "'mesh' is not one of osm"),
        (lambda d: d["workloads"][1].update(ports=[15008]), "15008 is reserved"),
        (lambda d: d["workloads"][1].update(ports=[15001]), "15001 is reserved"),
        (lambda d: d["services"][0].update(ports=[15006]), "15006 is reserved"),
        (
            lambda d: d["nodes"][1].update(identity=str(NODE_A)),
            r"nodes\[1\]: node-b .* is already defined at nodes\[0\]",
        ),
        (
            lambda d: d["nodes"][0].update(identity=str(PRODUCTPAGE)),
            "the identity of node node-a's node proxy",
        ),
        (
            lambda d: d["nodes"][0].update(identity="spiffe://other.td/ztunnel"),
            "outside the trust domain",
        ),
        (lambda d: d.update(cluster_domain="Bad_Domain"), "cluster_domain: 'Bad_Domain' is not"),
    ],
)
def test_bad_ambient_mesh_input_is_one_clear_error(edit: Any, message: str) -> None:
    document = ambient_document()
    edit(document)
    with pytest.raises(MeshError, match=message):
        parse_mesh(document, TD)


def test_generation_refusals(mesh: Mesh) -> None:
    with pytest.raises(GenerationError, match="not the node proxy of any node"):
        generate(mesh, sid("nobody"), layout="ambient")
    with pytest.raises(GenerationError, match="its layout is ambient, not osm"):
        generate(mesh, NODE_A, layout="osm")
    with pytest.raises(GenerationError, match="the node proxy of node node-a carries its traffic"):
        generate(mesh, PRODUCTPAGE)
    with pytest.raises(GenerationError, match="not one workload"):
        generate(mesh, NODE_A, workload="productpage")


def test_bootstrap_for_a_node_proxy(tmp_path: Path) -> None:
    spec = BootstrapSpec(NODE_A, UnixServer(tmp_path / "meshca.sock"))
    bootstrap = build_ads_bootstrap(spec, layout="ambient")
    assert bootstrap["node"]["metadata"][LAYOUT_METADATA] == "ambient"
    assert bootstrap["bootstrap_extensions"][0]["name"] == "envoy.bootstrap.internal_listener"
    with pytest.raises(BootstrapError, match="serves every ambient workload"):
        build_ads_bootstrap(spec, layout="ambient", workload="productpage")
    with pytest.raises(BootstrapError, match="--layout 'ztunnel': expected one of"):
        build_ads_bootstrap(copy.copy(spec), layout="ztunnel")
