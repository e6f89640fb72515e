"""Per-identity Envoy resources: shape, visibility, determinism, and Envoy's own verdict.

Every generated configuration is checked by the real ``envoy --mode validate`` twice:
as served (static listeners and clusters next to the ADS bootstrap) and with routes,
endpoints and secrets inlined (real SVIDs from a local CA), so the routes' cluster
references and every secret name the resources use are checked as well.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from google.protobuf import any_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.message import Message

from meshca.backends.local import init_local_ca
from meshca.envoy.ads_bootstrap import (
    CAPTURE_METADATA,
    INTERNAL_LISTENER,
    WORKLOAD_METADATA,
    build_ads_bootstrap,
)
from meshca.envoy.bootstrap import BootstrapError, BootstrapSpec, Inbound
from meshca.envoy.generate import generate
from meshca.envoy.mesh import Mesh, load_mesh, parse_mesh
from meshca.envoy.snapshot import Snapshot
from meshca.envoy.xds import GenerationError
from meshca.issuer import Issuer
from meshca.spiffe import SpiffeId, TrustDomain
from meshca.util.files import PRIVATE, atomic_write
from meshca.util.netaddr import UnixServer
from meshca.xds.resources import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    GENERATED_TYPES,
    LISTENER_TYPE,
    ROUTE_TYPE,
)
from tests.envoy_harness import BOOKSTORE_MESH, bookstore_document, validate_config

pytestmark = pytest.mark.envoy

TD = TrustDomain("cluster.local")
MODES = ("intercept", "explicit")


def sid(namespace: str, account: str) -> SpiffeId:
    return SpiffeId.from_kubernetes(namespace, account, TD)


BUYER = sid("bookbuyer", "bookbuyer")
THIEF = sid("bookthief", "bookthief")
STORE_V1 = sid("bookstore", "bookstore-v1")
STORE_V2 = sid("bookstore", "bookstore-v2")
WAREHOUSE = sid("bookwarehouse", "bookwarehouse")
MYSQL = sid("bookwarehouse", "mysql")
EVERYONE = (BUYER, THIEF, STORE_V1, STORE_V2, WAREHOUSE, MYSQL)


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    return load_mesh(BOOKSTORE_MESH, TD)


def unpack(packed: any_pb2.Any) -> Any:
    name = packed.type_url.rsplit("/", 1)[1]
    cls = message_factory.GetMessageClass(descriptor_pool.Default().FindMessageTypeByName(name))
    message = cls()
    packed.Unpack(message)
    return message


def names(snapshot: Snapshot, type_url: str) -> set[str]:
    return set(snapshot.get(type_url))


def chains(listener: Any) -> dict[str, Any]:
    return {chain.name: chain for chain in listener.filter_chains}


def san_exacts(validation: common_pb2.CertificateValidationContext) -> list[str]:
    return [m.matcher.exact for m in validation.match_typed_subject_alt_names]


def principals(rules: rbac_pb2.RBAC) -> list[str]:
    return [
        principal.authenticated.principal_name.exact
        or "prefix:" + principal.authenticated.principal_name.prefix
        for policy in rules.policies.values()
        for principal in policy.principals
    ]


# --- what each bookstore proxy gets ----------------------------------------------------


EXPECTED_CLUSTERS = {
    BUYER: {"bookstore/bookstore|14001|v1", "bookstore/bookstore|14001|v2"},
    THIEF: {"bookstore/bookstore|14001|v1", "bookstore/bookstore|14001|v2"},
    STORE_V1: {"bookwarehouse/bookwarehouse|14001", "local-app|14001"},
    STORE_V2: {"bookwarehouse/bookwarehouse|14001", "local-app|14001"},
    WAREHOUSE: {"bookwarehouse/mysql|3306", "local-app|14001"},
    MYSQL: {"local-app|3306"},
}
EXPECTED_EXPLICIT_LISTENERS = {
    BUYER: {"outbound|127.0.0.41:14001"},
    THIEF: {"outbound|127.0.0.42:14001"},
    STORE_V1: {"outbound|127.0.0.43:14001", "inbound|14001"},
    STORE_V2: {"outbound|127.0.0.44:14001", "inbound|14001"},
    WAREHOUSE: {"outbound|127.0.0.45:3306", "inbound|14001"},
    MYSQL: {"inbound|3306"},
}


@pytest.mark.parametrize("proxy", EVERYONE, ids=str)
def test_each_identity_gets_exactly_its_resources(mesh: Mesh, proxy: SpiffeId) -> None:
    intercept = generate(mesh, proxy, capture="intercept")
    explicit = generate(mesh, proxy, capture="explicit")
    assert names(intercept, CLUSTER_TYPE) == EXPECTED_CLUSTERS[proxy] | {"blackhole"}
    assert names(explicit, CLUSTER_TYPE) == EXPECTED_CLUSTERS[proxy]
    upstream = {n for n in EXPECTED_CLUSTERS[proxy] if not n.startswith("local-app")}
    assert names(intercept, ENDPOINT_TYPE) == upstream == names(explicit, ENDPOINT_TYPE)
    has_inbound = any(n.startswith("local-app") for n in EXPECTED_CLUSTERS[proxy])
    assert names(intercept, LISTENER_TYPE) == {"outbound-listener"} | (
        {"inbound-listener"} if has_inbound else set()
    )
    assert names(explicit, LISTENER_TYPE) == EXPECTED_EXPLICIT_LISTENERS[proxy]
    http_upstream = any(n.endswith("|14001") or "|14001|" in n for n in upstream)
    assert names(intercept, ROUTE_TYPE) == ({"rds-outbound.14001"} if http_upstream else set())


def test_bookbuyer_cluster_presents_its_own_cert_and_pins_bookstore(mesh: Mesh) -> None:
    snapshot = generate(mesh, BUYER)
    cluster = snapshot.get(CLUSTER_TYPE)["bookstore/bookstore|14001|v1"]
    assert cluster.type == cluster_pb2.Cluster.EDS
    assert cluster.eds_cluster_config.eds_config.HasField("ads")
    context = unpack(cluster.transport_socket.typed_config)
    assert isinstance(context, tls_pb2.UpstreamTlsContext)
    assert context.sni == "bookstore.bookstore.svc.cluster.local"
    common = context.common_tls_context
    assert [s.name for s in common.tls_certificate_sds_secret_configs] == [
        "service-cert:bookbuyer/bookbuyer"
    ]
    assert common.tls_certificate_sds_secret_configs[0].sds_config.HasField("ads")
    combined = common.combined_validation_context
    assert combined.validation_context_sds_secret_config.name == (
        "root-cert-for-mtls-outbound:bookstore/bookstore"
    )
    assert san_exacts(combined.default_validation_context) == [str(STORE_V1), str(STORE_V2)]
    assert snapshot.secret_names == (
        "root-cert-for-mtls-outbound:bookstore/bookstore",
        "service-cert:bookbuyer/bookbuyer",
    )


def test_endpoints_follow_the_split_backends(mesh: Mesh) -> None:
    snapshot = generate(mesh, BUYER)

    def addresses(name: str) -> list[tuple[str, int]]:
        assignment = snapshot.get(ENDPOINT_TYPE)[name]
        return [
            (
                e.endpoint.address.socket_address.address,
                e.endpoint.address.socket_address.port_value,
            )
            for group in assignment.endpoints
            for e in group.lb_endpoints
        ]

    assert addresses("bookstore/bookstore|14001|v1") == [("127.0.0.23", 14001)]
    assert addresses("bookstore/bookstore|14001|v2") == [("127.0.0.24", 14001)]


def test_routes_split_50_50_and_answer_every_name(mesh: Mesh) -> None:
    routes = generate(mesh, BUYER).get(ROUTE_TYPE)["rds-outbound.14001"]
    [host] = routes.virtual_hosts
    assert host.name == "bookstore/bookstore|14001"
    base = [
        "bookstore.bookstore",
        "bookstore.bookstore.svc",
        "bookstore.bookstore.svc.cluster",
        "bookstore.bookstore.svc.cluster.local",
        "127.0.0.101",
    ]
    assert sorted(host.domains) == sorted(base + [f"{d}:14001" for d in base])
    assert "bookstore" not in host.domains  # the short name resolves only in its namespace
    [route] = host.routes
    weights = [(c.name, c.weight.value) for c in route.route.weighted_clusters.clusters]
    assert weights == [("bookstore/bookstore|14001|v1", 50), ("bookstore/bookstore|14001|v2", 50)]


def test_short_name_is_offered_inside_the_namespace() -> None:
    document = bookstore_document()
    document["access"]["policies"][0]["from"].append("bookstore/bookstore-v1")
    mesh = parse_mesh(document, TD)
    routes = generate(mesh, STORE_V1).get(ROUTE_TYPE)["rds-outbound.14001"]
    hosts = {h.name: list(h.domains) for h in routes.virtual_hosts}
    assert {"bookstore", "bookstore:14001"} <= set(hosts["bookstore/bookstore|14001"])
    assert "bookwarehouse" not in hosts["bookwarehouse/bookwarehouse|14001"]


def test_intercept_outbound_listener_matches_cluster_ips(mesh: Mesh) -> None:
    listener = generate(mesh, BUYER).get(LISTENER_TYPE)["outbound-listener"]
    assert listener.address.socket_address.address == "0.0.0.0"
    assert listener.address.socket_address.port_value == 15001
    assert [f.name for f in listener.listener_filters] == ["envoy.filters.listener.original_dst"]
    chain = chains(listener)["bookstore/bookstore|14001"]
    match = chain.filter_chain_match
    assert [(r.address_prefix, r.prefix_len.value) for r in match.prefix_ranges] == [
        ("127.0.0.101", 32)
    ]
    assert match.destination_port.value == 14001
    manager = unpack(chain.filters[0].typed_config)
    assert isinstance(manager, hcm_pb2.HttpConnectionManager)
    assert manager.rds.route_config_name == "rds-outbound.14001"
    assert manager.rds.config_source.HasField("ads")
    fallback = unpack(listener.default_filter_chain.filters[0].typed_config)
    assert fallback.cluster == "blackhole"


def test_passthrough_egress_is_an_original_destination_cluster() -> None:
    document = bookstore_document()
    document["egress"] = "passthrough"
    snapshot = generate(parse_mesh(document, TD), BUYER)
    listener = snapshot.get(LISTENER_TYPE)["outbound-listener"]
    assert unpack(listener.default_filter_chain.filters[0].typed_config).cluster == (
        "passthrough-outbound"
    )
    cluster = snapshot.get(CLUSTER_TYPE)["passthrough-outbound"]
    assert cluster.type == cluster_pb2.Cluster.ORIGINAL_DST
    assert "blackhole" not in snapshot.get(CLUSTER_TYPE)


def test_tcp_upstream_uses_tcp_proxy(mesh: Mesh) -> None:
    listener = generate(mesh, WAREHOUSE).get(LISTENER_TYPE)["outbound-listener"]
    proxy = unpack(chains(listener)["bookwarehouse/mysql|3306"].filters[0].typed_config)
    assert isinstance(proxy, tcp_proxy_pb2.TcpProxy)
    assert proxy.cluster == "bookwarehouse/mysql|3306"


def _inbound_http(listener: Any) -> tuple[Any, Any]:
    chain = listener.filter_chains[0]
    manager = unpack(chain.filters[0].typed_config)
    rbac = unpack(manager.http_filters[0].typed_config)
    return chain, (manager, rbac)


@pytest.mark.parametrize("capture", MODES)
def test_bookwarehouse_inbound_requires_mtls_and_admits_only_bookstore(
    mesh: Mesh, capture: str
) -> None:
    snapshot = generate(mesh, WAREHOUSE, capture=capture)
    if capture == "intercept":
        listener = snapshot.get(LISTENER_TYPE)["inbound-listener"]
        assert listener.address.socket_address.port_value == 15003
        assert listener.filter_chains[0].filter_chain_match.destination_port.value == 14001
    else:
        listener = snapshot.get(LISTENER_TYPE)["inbound|14001"]
        assert listener.address.socket_address.address == "127.0.0.25"
        assert listener.address.socket_address.port_value == 14001
    assert listener.traffic_direction == base_pb2.INBOUND
    chain, (manager, rbac) = _inbound_http(listener)
    tls = unpack(chain.transport_socket.typed_config)
    assert isinstance(tls, tls_pb2.DownstreamTlsContext)
    assert tls.require_client_certificate.value is True
    assert [s.name for s in tls.common_tls_context.tls_certificate_sds_secret_configs] == [
        "service-cert:bookwarehouse/bookwarehouse"
    ]
    assert tls.common_tls_context.validation_context_sds_secret_config.name == (
        "root-cert-for-mtls-inbound:bookwarehouse/bookwarehouse"
    )
    assert isinstance(rbac, http_rbac_pb2.RBAC)
    assert rbac.rules.action == rbac_pb2.RBAC.ALLOW
    assert principals(rbac.rules) == [str(STORE_V1), str(STORE_V2)]
    assert str(THIEF) not in principals(rbac.rules)
    assert manager.forward_client_cert_details == hcm_pb2.HttpConnectionManager.SANITIZE_SET
    assert manager.set_current_client_cert_details.uri is True
    assert [f.name for f in manager.http_filters] == [
        "envoy.filters.http.rbac",
        "envoy.filters.http.router",
    ]
    local = snapshot.get(CLUSTER_TYPE)["local-app|14001"]
    address = local.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (address.address, address.port_value) == ("127.0.0.35", 14001)


def test_tcp_inbound_uses_network_rbac(mesh: Mesh) -> None:
    listener = generate(mesh, MYSQL, capture="explicit").get(LISTENER_TYPE)["inbound|3306"]
    rbac, proxy = (unpack(f.typed_config) for f in listener.filter_chains[0].filters)
    assert isinstance(rbac, network_rbac_pb2.RBAC)
    assert principals(rbac.rules) == [str(WAREHOUSE)]
    assert isinstance(proxy, tcp_proxy_pb2.TcpProxy) and proxy.cluster == "local-app|3306"


def test_port_nobody_may_call_denies_everyone() -> None:
    document = bookstore_document()
    document["access"]["policies"] = document["access"]["policies"][:2]  # mysql: no one
    snapshot = generate(parse_mesh(document, TD), MYSQL)
    listener = snapshot.get(LISTENER_TYPE)["inbound-listener"]
    rbac = unpack(listener.filter_chains[0].filters[0].typed_config)
    assert rbac.rules.action == rbac_pb2.RBAC.ALLOW and not rbac.rules.policies


def test_permissive_mesh_admits_the_trust_domain_only() -> None:
    document = bookstore_document()
    document["access"] = {"mode": "permissive"}
    mesh = parse_mesh(document, TD)
    snapshot = generate(mesh, WAREHOUSE, capture="explicit")
    _, (_, rbac) = _inbound_http(snapshot.get(LISTENER_TYPE)["inbound|14001"])
    assert principals(rbac.rules) == ["prefix:spiffe://cluster.local/"]
    everything = generate(mesh, THIEF)
    assert "bookwarehouse/bookwarehouse|14001" in everything.get(CLUSTER_TYPE)


def _osm_gaps_document() -> dict[str, Any]:
    """bookwarehouse PERMISSIVE and callable by all of namespace bookstore, mysql by
    anyone of the mesh, bookstore's route with a 1 s timeout."""
    document = bookstore_document()
    for service in document["services"]:
        if service["name"] == "bookwarehouse":
            service["mtls"] = "permissive"
        if service["name"] == "bookstore":
            service["ports"] = [{"port": 14001, "timeout": "1s"}]
    for policy in document["access"]["policies"]:
        if policy["service"] == "bookwarehouse/bookwarehouse":
            policy["from"] = ["bookstore/*"]
        if policy["service"] == "bookwarehouse/mysql":
            policy["from"] = ["*"]
    return document


@pytest.mark.parametrize("capture", MODES)
def test_permissive_port_tells_plaintext_from_mtls(capture: str) -> None:
    """Transport detection: the TLS inspector, an mTLS chain on ``tls`` with RBAC, and a
    plaintext chain on ``raw_buffer`` with no TLS and no RBAC (its callers have no ID)."""
    snapshot = generate(parse_mesh(_osm_gaps_document(), TD), WAREHOUSE, capture=capture)
    name = "inbound-listener" if capture == "intercept" else "inbound|14001"
    listener = snapshot.get(LISTENER_TYPE)[name]
    assert "envoy.filters.listener.tls_inspector" in [f.name for f in listener.listener_filters]
    by_name = chains(listener)
    assert set(by_name) == {"inbound|14001", "inbound|14001|plaintext"}
    secure, plain = by_name["inbound|14001"], by_name["inbound|14001|plaintext"]
    assert secure.filter_chain_match.transport_protocol == "tls"
    assert plain.filter_chain_match.transport_protocol == "raw_buffer"
    if capture == "intercept":
        assert secure.filter_chain_match.destination_port.value == 14001
        assert plain.filter_chain_match.destination_port.value == 14001
    assert secure.HasField("transport_socket") and not plain.HasField("transport_socket")
    manager = unpack(plain.filters[0].typed_config)
    assert [f.name for f in manager.http_filters] == ["envoy.filters.http.router"]
    assert manager.forward_client_cert_details == hcm_pb2.HttpConnectionManager.SANITIZE_SET


def test_strict_ports_have_one_tls_chain_and_no_inspector(mesh: Mesh) -> None:
    listener = generate(mesh, WAREHOUSE).get(LISTENER_TYPE)["inbound-listener"]
    assert [f.name for f in listener.listener_filters] == ["envoy.filters.listener.original_dst"]
    assert [c.name for c in listener.filter_chains] == ["inbound|14001"]
    assert listener.filter_chains[0].filter_chain_match.transport_protocol == ""


def test_routes_have_no_timeout_unless_configured(mesh: Mesh) -> None:
    """Envoy's default cuts requests at 15 s: every route sets its timeout, 0 (none)
    unless the service port configures one; inbound routes never add their own."""
    route = generate(mesh, BUYER).get(ROUTE_TYPE)["rds-outbound.14001"]
    action = route.virtual_hosts[0].routes[0].route
    assert action.HasField("timeout") and action.timeout.ToSeconds() == 0
    listener = generate(mesh, WAREHOUSE).get(LISTENER_TYPE)["inbound-listener"]
    _, (manager, _) = _inbound_http(listener)
    inbound_action = manager.route_config.virtual_hosts[0].routes[0].route
    assert inbound_action.HasField("timeout") and inbound_action.timeout.ToSeconds() == 0
    configured = generate(parse_mesh(_osm_gaps_document(), TD), BUYER)
    route = configured.get(ROUTE_TYPE)["rds-outbound.14001"]
    assert route.virtual_hosts[0].routes[0].route.timeout.ToSeconds() == 1


def test_namespace_and_mesh_wildcards_in_rbac_and_visibility() -> None:
    mesh = parse_mesh(_osm_gaps_document(), TD)
    listener = generate(mesh, WAREHOUSE).get(LISTENER_TYPE)["inbound-listener"]
    _, (_, rbac) = _inbound_http(listener)
    (policy,) = rbac.rules.policies.values()
    (principal,) = policy.principals
    regex = principal.authenticated.principal_name.safe_regex.regex
    assert regex == r"spiffe://cluster\.local/ns/bookstore/sa/[^/]+"
    mysql_listener = generate(mesh, MYSQL).get(LISTENER_TYPE)["inbound-listener"]
    network = unpack(mysql_listener.filter_chains[0].filters[0].typed_config)
    assert principals(network.rules) == ["prefix:spiffe://cluster.local/"]
    assert "bookwarehouse/mysql|3306" in names(generate(mesh, THIEF), CLUSTER_TYPE)
    assert "bookwarehouse/bookwarehouse|14001" not in names(generate(mesh, THIEF), CLUSTER_TYPE)
    admin = generate(mesh, sid("bookstore", "bookstore-admin"))
    assert "bookwarehouse/bookwarehouse|14001" in names(admin, CLUSTER_TYPE)


# --- visibility: a proxy sees only what its identity may reach -------------------------


@pytest.mark.parametrize("capture", MODES)
def test_bookthief_sees_nothing_of_bookwarehouse(mesh: Mesh, capture: str) -> None:
    snapshot = generate(mesh, THIEF, capture=capture)
    for type_url, by_name in snapshot.encoded.items():
        for name, raw in by_name.items():
            assert b"bookwarehouse" not in raw, (type_url, name)
            assert "bookwarehouse" not in name
    assert not any("bookwarehouse" in s for s in snapshot.secret_names)
    assert not any(b"127.0.0.102" in raw for v in snapshot.encoded.values() for raw in v.values())


def test_unknown_identity_gets_nothing_but_the_fallback(mesh: Mesh) -> None:
    stranger = sid("default", "stranger")
    snapshot = generate(mesh, stranger)
    assert names(snapshot, CLUSTER_TYPE) == {"blackhole"}
    assert not snapshot.get(ENDPOINT_TYPE) and not snapshot.get(ROUTE_TYPE)
    assert not chains(snapshot.get(LISTENER_TYPE)["outbound-listener"])


@pytest.mark.parametrize(
    ("proxy", "kwargs", "message"),
    [
        (
            SpiffeId.parse("spiffe://evil.example/ns/bookbuyer/sa/bookbuyer"),
            {},
            "outside the mesh's trust domain",
        ),
        (SpiffeId.parse("spiffe://cluster.local/host/vm-1"), {}, "are identified as"),
        (THIEF, {"workload": "bookwarehouse/bookwarehouse"}, "runs as"),
        (THIEF, {"workload": "bookstore-v1"}, "bookthief/bookstore-v1 is not in the mesh"),
        (BUYER, {"capture": "iptables"}, "capture mode 'iptables'"),
    ],
)
def test_generation_refusals(
    mesh: Mesh, proxy: SpiffeId, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(GenerationError, match=message):
        generate(mesh, proxy, **kwargs)


def test_replicas_of_one_identity() -> None:
    document = bookstore_document()
    replica = copy.deepcopy(document["workloads"][4])  # bookwarehouse
    replica.update(name="bookwarehouse-2", address="127.0.0.27")  # same app port and address
    replica["outbound_address"] = "127.0.0.47"
    document["workloads"].append(replica)
    mesh = parse_mesh(document, TD)
    with pytest.raises(GenerationError, match="runs several workloads"):
        generate(mesh, WAREHOUSE, capture="explicit")
    second = generate(mesh, WAREHOUSE, capture="explicit", workload="bookwarehouse-2")
    inbound = second.get(LISTENER_TYPE)["inbound|14001"]
    assert inbound.address.socket_address.address == "127.0.0.27"
    # Intercept mode listens on 0.0.0.0, so identical replicas need no name...
    assert (
        generate(mesh, WAREHOUSE).versions
        == generate(mesh, WAREHOUSE, workload="bookwarehouse/bookwarehouse").versions
    )
    # ...and both stores now reach two bookwarehouse endpoints.
    assignment = generate(mesh, STORE_V1).get(ENDPOINT_TYPE)["bookwarehouse/bookwarehouse|14001"]
    assert len(assignment.endpoints[0].lb_endpoints) == 2


def test_shared_outbound_address_tcp_conflict_is_refused() -> None:
    document = bookstore_document()
    document["workloads"].append(
        {
            "name": "auditor",
            "namespace": "audit",
            "service_account": "auditor",
            "address": "127.0.0.28",
            "outbound_address": "127.0.0.48",
        }
    )
    document["services"].append(
        {
            "name": "mysql-replica",
            "namespace": "bookwarehouse",
            "address": "127.0.0.104",
            "ports": [{"port": 3306, "protocol": "tcp"}],
            "selector": {"app": "mysql"},
        }
    )
    for service in ("bookwarehouse/mysql", "bookwarehouse/mysql-replica"):
        document["access"]["policies"].append({"service": service, "from": ["audit/auditor"]})
    mesh = parse_mesh(document, TD)
    with pytest.raises(GenerationError, match="TCP port 3306 would serve several services"):
        generate(mesh, sid("audit", "auditor"), capture="explicit")
    assert len(generate(mesh, sid("audit", "auditor")).get(ENDPOINT_TYPE)) == 2


# --- determinism: versions change only with content -------------------------------------


def test_generation_is_deterministic(mesh: Mesh) -> None:
    document = bookstore_document()
    for key in ("workloads", "services"):
        document[key].reverse()
    reparsed = parse_mesh(document, TD)
    for proxy in EVERYONE:
        for capture in MODES:
            first = generate(mesh, proxy, capture=capture)
            second = generate(reparsed, proxy, capture=capture)
            assert first.versions == second.versions
            assert first.encoded == second.encoded


def test_a_snapshot_on_its_identitys_shared_part_equals_one_built_whole(mesh: Mesh) -> None:
    """Each proxy's snapshot extends the outbound resources its identity shares (encoded
    once); the result is what encoding every resource anew would give."""
    for proxy in EVERYONE:
        for capture in MODES:
            snapshot = generate(mesh, proxy, capture=capture)
            whole = Snapshot.of(dict(snapshot.resources), snapshot.secret_names)
            assert whole.versions == snapshot.versions
            assert whole.encoded == snapshot.encoded
            assert whole.resource_versions == snapshot.resource_versions
    snapshot = generate(mesh, BUYER)
    name = "bookstore/bookstore|14001|v1"
    raw = snapshot.encoded[ENDPOINT_TYPE][name]
    assert snapshot.resource_version(ENDPOINT_TYPE, name) == hashlib.sha256(raw).hexdigest()[:16]
    assert snapshot.resource_version(ENDPOINT_TYPE, "nope") is None
    # a name given on top of a base replaces the base's resource, and only its type moves
    replaced = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.STATIC)
    extended = Snapshot.of({CLUSTER_TYPE: {name: replaced}}, ("extra",), base=snapshot)
    assert extended.get(CLUSTER_TYPE)[name] is replaced
    assert set(extended.get(CLUSTER_TYPE)) == set(snapshot.get(CLUSTER_TYPE))
    assert {t for t in GENERATED_TYPES if extended.versions[t] != snapshot.versions[t]} == {
        CLUSTER_TYPE
    }
    assert extended.secret_names == tuple(sorted((*snapshot.secret_names, "extra")))


def _versions(mesh: Mesh) -> dict[SpiffeId, dict[str, str]]:
    return {p: dict(generate(mesh, p).versions) for p in EVERYONE}


def _changed(
    before: dict[SpiffeId, dict[str, str]], after: dict[SpiffeId, dict[str, str]]
) -> dict[SpiffeId, set[str]]:
    return {
        proxy: {t.rsplit(".", 1)[1] for t in before[proxy] if before[proxy][t] != after[proxy][t]}
        for proxy in before
        if before[proxy] != after[proxy]
    }


def test_changing_the_split_changes_only_the_callers_routes(mesh: Mesh) -> None:
    document = bookstore_document()
    document["traffic_splits"][0]["backends"][0]["weight"] = 90
    document["traffic_splits"][0]["backends"][1]["weight"] = 10
    changed = _changed(_versions(mesh), _versions(parse_mesh(document, TD)))
    assert changed == {BUYER: {"RouteConfiguration"}, THIEF: {"RouteConfiguration"}}


def test_changing_a_policy_changes_only_the_proxies_involved(mesh: Mesh) -> None:
    document = bookstore_document()
    document["access"]["policies"][0]["from"] = ["bookbuyer/bookbuyer"]  # thief loses bookstore
    changed = _changed(_versions(mesh), _versions(parse_mesh(document, TD)))
    assert changed == {
        THIEF: {"Cluster", "ClusterLoadAssignment", "Listener", "RouteConfiguration"},
        STORE_V1: {"Listener"},  # the inbound RBAC principals
        STORE_V2: {"Listener"},
    }


def test_moving_a_workload_changes_only_endpoints_for_its_callers(mesh: Mesh) -> None:
    document = bookstore_document()
    document["workloads"][5]["address"] = "127.0.0.29"  # mysql moves
    changed = _changed(_versions(mesh), _versions(parse_mesh(document, TD)))
    assert changed == {WAREHOUSE: {"ClusterLoadAssignment"}}


# --- Envoy's own verdict --------------------------------------------------------------


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> Issuer:
    ca = init_local_ca(tmp_path_factory.mktemp("ca"), TD)
    return Issuer(ca.authority())


def _to_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _write(directory: Path, name: str, document: dict[str, Any]) -> Path:
    path = directory / name
    atomic_write(path, json.dumps(document, indent=1).encode(), PRIVATE)
    return path


def _check(path: Path) -> None:
    result = validate_config(path)
    assert result.returncode == 0, f"{path.name}:\n{result.stdout}\n{result.stderr}"


def as_served(snapshot: Snapshot, proxy: SpiffeId, capture: str, tmp: Path) -> dict[str, Any]:
    """The ADS bootstrap plus the snapshot's listeners and clusters as static resources."""
    spec = BootstrapSpec(proxy, UnixServer(tmp / "meshca.sock"))
    bootstrap = build_ads_bootstrap(spec, capture=capture)
    static = bootstrap["static_resources"]
    static["clusters"] += [_to_dict(c) for c in snapshot.get(CLUSTER_TYPE).values()]
    static["listeners"] = [_to_dict(li) for li in snapshot.get(LISTENER_TYPE).values()]
    return bootstrap


def _rewrite(message: Message, snapshot: Snapshot) -> None:
    """Inline what would come over ADS: routes into their HCMs, secrets as static names."""
    if isinstance(message, secret_pb2.SdsSecretConfig):
        message.ClearField("sds_config")
        return
    if isinstance(message, hcm_pb2.HttpConnectionManager) and message.HasField("rds"):
        message.route_config.CopyFrom(snapshot.get(ROUTE_TYPE)[message.rds.route_config_name])
        message.ClearField("rds")
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        items = value if field.is_repeated else [value]
        if field.message_type.GetOptions().map_entry:
            has_messages = field.message_type.fields_by_name["value"].message_type is not None
            items = [value[k] for k in value] if has_messages else []
        for item in items:
            if isinstance(item, any_pb2.Any):
                inner = unpack(item)
                _rewrite(inner, snapshot)
                item.Pack(inner, deterministic=True)
            else:
                _rewrite(item, snapshot)


def _secrets(snapshot: Snapshot, proxy: SpiffeId, mesh: Mesh, issuer: Issuer) -> list[Any]:
    svid = issuer.issue(proxy)
    bundle = issuer.bundle().pem()
    secrets = []
    for name in snapshot.secret_names:
        secret = secret_pb2.Secret(name=name)
        named = SpiffeId.parse(name) if name.startswith("spiffe://") else None
        if named is not None:  # the ambient layout: each workload's own certificate
            own = issuer.issue(named)
            secret.tls_certificate.certificate_chain.inline_bytes = own.chain_pem()
            secret.tls_certificate.private_key.inline_bytes = own.private_key_pem()
        elif name.startswith("service-cert:") or name == "default":
            secret.tls_certificate.certificate_chain.inline_bytes = svid.chain_pem()
            secret.tls_certificate.private_key.inline_bytes = svid.private_key_pem()
        else:
            secret.validation_context.trusted_ca.inline_bytes = bundle
            if name.startswith("root-cert-for-mtls-outbound:"):
                namespace, service = name.split(":", 1)[1].split("/")
                for identity in mesh.service_identities(namespace, service) or ():
                    secret.validation_context.match_typed_subject_alt_names.add(
                        san_type=common_pb2.SubjectAltNameMatcher.URI
                    ).matcher.exact = str(identity)
        secrets.append(secret)
    return secrets


def inlined(snapshot: Snapshot, proxy: SpiffeId, mesh: Mesh, issuer: Issuer) -> dict[str, Any]:
    """A self-contained bootstrap: routes, endpoints and (real) secrets inlined."""
    listeners = [copy.deepcopy(li) for li in snapshot.get(LISTENER_TYPE).values()]
    clusters = []
    for cluster in snapshot.get(CLUSTER_TYPE).values():
        cluster = copy.deepcopy(cluster)
        if cluster.type == cluster_pb2.Cluster.EDS:
            cluster.type = cluster_pb2.Cluster.STATIC
            cluster.ClearField("eds_cluster_config")
            cluster.load_assignment.CopyFrom(snapshot.get(ENDPOINT_TYPE)[cluster.name])
        clusters.append(cluster)
    for message in (*listeners, *clusters):
        _rewrite(message, snapshot)
    bootstrap = bootstrap_pb2.Bootstrap(
        static_resources=bootstrap_pb2.Bootstrap.StaticResources(
            listeners=listeners, clusters=clusters, secrets=_secrets(snapshot, proxy, mesh, issuer)
        )
    )
    bootstrap.node.id = str(proxy)
    bootstrap.node.cluster = "validate"
    document = _to_dict(bootstrap)
    if any(li.HasField("internal_listener") for li in listeners):
        document["bootstrap_extensions"] = [INTERNAL_LISTENER]
    return document


def _kitchen_sink() -> Mesh:
    """More shapes than the bookstore: gRPC, several ports, a TCP split, permissive, egress."""
    document = bookstore_document()
    document["egress"] = "passthrough"
    document["access"] = {"mode": "permissive"}
    document["workloads"] += [
        {
            "name": f"ledger-{v}",
            "namespace": "bookstore",
            "service_account": "ledger",
            "address": f"127.0.0.{50 + i}",
            "app_address": f"127.0.0.{60 + i}",
            "ports": [
                {"port": 9000, "protocol": "grpc"},
                {"port": 9100, "protocol": "http"},
                {"port": 5432, "protocol": "tcp"},
            ],
            "labels": {"app": "ledger", "version": v},
        }
        for i, v in enumerate(("a", "b"))
    ]
    document["services"].append(
        {
            "name": "ledger",
            "namespace": "bookstore",
            "address": "127.0.0.105",
            "ports": [
                {"port": 9000, "protocol": "grpc"},
                {"port": 80, "target_port": 9100, "protocol": "http"},
                {"port": 5432, "protocol": "tcp"},
            ],
            "selector": {"app": "ledger"},
        }
    )
    document["traffic_splits"].append(
        {
            "service": "bookstore/ledger",
            "backends": [
                {"name": "a", "labels": {"version": "a"}, "weight": 3},
                {"name": "b", "labels": {"version": "b"}, "weight": 1},
            ],
        }
    )
    return parse_mesh(document, TD)


def _cases() -> Iterator[tuple[str, Callable[[], Mesh], SpiffeId, str | None]]:
    for proxy in EVERYONE:
        yield "bookstore", lambda: load_mesh(BOOKSTORE_MESH, TD), proxy, None
    ledger = sid("bookstore", "ledger")
    for proxy in (BUYER, WAREHOUSE, MYSQL):
        yield "osm-gaps", lambda: parse_mesh(_osm_gaps_document(), TD), proxy, None
    yield "kitchen-sink", _kitchen_sink, ledger, "ledger-a"
    yield "kitchen-sink", _kitchen_sink, STORE_V1, None
    yield "kitchen-sink", _kitchen_sink, sid("default", "gateway"), None


@pytest.mark.parametrize("capture", MODES)
@pytest.mark.parametrize(
    ("mesh_name", "make_mesh", "proxy", "workload"),
    list(_cases()),
    ids=[f"{c[0]}-{c[2].path}" for c in _cases()],
)
def test_envoy_accepts_the_generated_configuration(
    tmp_path: Path,
    issuer: Issuer,
    capture: str,
    mesh_name: str,
    make_mesh: Callable[[], Mesh],
    proxy: SpiffeId,
    workload: str | None,
) -> None:
    mesh = make_mesh()
    snapshot = generate(mesh, proxy, capture=capture, workload=workload)
    _check(_write(tmp_path, "served.json", as_served(snapshot, proxy, capture, tmp_path)))
    _check(_write(tmp_path, "inlined.json", inlined(snapshot, proxy, mesh, issuer)))


@pytest.mark.parametrize(
    ("mesh_name", "make_mesh", "proxy", "workload"),
    list(_cases()),
    ids=[f"{c[0]}-{c[2].path}" for c in _cases()],
)
def test_envoy_accepts_the_istio_sidecar_layout(
    tmp_path: Path,
    issuer: Issuer,
    mesh_name: str,
    make_mesh: Callable[[], Mesh],
    proxy: SpiffeId,
    workload: str | None,
) -> None:
    mesh = make_mesh()
    snapshot = generate(mesh, proxy, workload=workload, layout="istio-sidecar")
    _check(_write(tmp_path, "served.json", as_served(snapshot, proxy, "intercept", tmp_path)))
    _check(_write(tmp_path, "inlined.json", inlined(snapshot, proxy, mesh, issuer)))


def test_envoy_validation_catches_a_broken_route(
    tmp_path: Path, mesh: Mesh, issuer: Issuer
) -> None:
    """The check above can fail: a route to a cluster the proxy does not have is refused."""
    snapshot = generate(mesh, BUYER)
    routes = copy.deepcopy(dict(snapshot.get(ROUTE_TYPE)))
    broken = routes["rds-outbound.14001"]
    broken.virtual_hosts[0].routes[0].route.weighted_clusters.clusters[0].name = "nope|14001"
    tampered = Snapshot.of(
        {
            CLUSTER_TYPE: snapshot.get(CLUSTER_TYPE),
            ENDPOINT_TYPE: snapshot.get(ENDPOINT_TYPE),
            LISTENER_TYPE: snapshot.get(LISTENER_TYPE),
            ROUTE_TYPE: routes,
        },
        snapshot.secret_names,
    )
    path = _write(tmp_path, "broken.json", inlined(tampered, BUYER, mesh, issuer))
    result = validate_config(path)
    assert result.returncode != 0
    assert "nope|14001" in result.stdout + result.stderr
    missing_secret = Snapshot.of(dict(snapshot.resources), snapshot.secret_names[1:])
    path = _write(tmp_path, "no-secret.json", inlined(missing_secret, BUYER, mesh, issuer))
    assert validate_config(path).returncode != 0


# --- the ADS bootstrap --------------------------------------------------------------------


def test_ads_bootstrap_is_static_only_for_meshca(tmp_path: Path) -> None:
    spec = BootstrapSpec(STORE_V1, UnixServer(tmp_path / "meshca.sock"))
    bootstrap = build_ads_bootstrap(spec, capture="explicit", workload="bookstore-v1")
    assert [c["name"] for c in bootstrap["static_resources"]["clusters"]] == ["meshca_sds"]
    assert "listeners" not in bootstrap["static_resources"]
    dynamic = bootstrap["dynamic_resources"]
    ads = dynamic["ads_config"]
    assert (ads["api_type"], ads["transport_api_version"]) == ("GRPC", "V3")
    assert ads["set_node_on_first_message_only"] is True
    assert ads["grpc_services"] == [{"envoy_grpc": {"cluster_name": "meshca_sds"}}]
    assert (
        dynamic["cds_config"] == dynamic["lds_config"] == {"ads": {}, "resource_api_version": "V3"}
    )
    assert bootstrap["node"]["id"] == str(STORE_V1)
    assert bootstrap["node"]["metadata"] == {
        CAPTURE_METADATA: "explicit",
        WORKLOAD_METADATA: "bookstore-v1",
    }
    _check(_write(tmp_path, "ads.json", bootstrap))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"capture": "tproxy"}, "--capture 'tproxy'"),
        ({"workload": "a/b/c"}, "--workload 'a/b/c'"),
        ({"workload": "bad name"}, "--workload 'bad name'"),
    ],
)
def test_ads_bootstrap_refusals(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    spec = BootstrapSpec(STORE_V1, UnixServer(tmp_path / "meshca.sock"))
    with pytest.raises(BootstrapError, match=message):
        build_ads_bootstrap(spec, **kwargs)
    with_listener = BootstrapSpec(
        STORE_V1, UnixServer(tmp_path / "meshca.sock"), inbound=Inbound(15003, 14001)
    )
    with pytest.raises(BootstrapError, match="drop --inbound"):
        build_ads_bootstrap(with_listener)
