"""The mesh file and model: what parses, what is refused (and where), what it derives."""

from __future__ import annotations

import copy
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from meshca.envoy.generate import CAPTURE_MODES, generate
from meshca.envoy.mesh import Mesh, MeshError, Service, ServicePort, load_mesh, parse_mesh
from meshca.envoy.model import Callers, Workload, labels_of, matches
from meshca.envoy.xds import GenerationError
from meshca.spiffe import SpiffeId, TrustDomain
from tests.envoy_harness import BOOKSTORE_MESH, bookstore_document

TD = TrustDomain("cluster.local")


def sid(namespace: str, account: str) -> SpiffeId:
    return SpiffeId.from_kubernetes(namespace, account, TD)


def parse(text: str) -> Mesh:
    return parse_mesh(yaml.safe_load(textwrap.dedent(text)), TD)


@pytest.fixture(scope="module")
def bookstore() -> Mesh:
    return load_mesh(BOOKSTORE_MESH, TD)


# --- the example ---------------------------------------------------------------------


def test_bookstore_services_are_backed_by_their_workloads(bookstore: Mesh) -> None:
    store = bookstore.service("bookstore", "bookstore")
    assert store is not None
    assert [w.name for w in bookstore.endpoints(store)] == ["bookstore-v1", "bookstore-v2"]
    assert bookstore.service_identities("bookstore", "bookstore") == (
        sid("bookstore", "bookstore-v1"),
        sid("bookstore", "bookstore-v2"),
    )
    assert bookstore.service_identities("bookwarehouse", "mysql") == (
        sid("bookwarehouse", "mysql"),
    )
    assert bookstore.service_identities("bookstore", "nope") is None


def test_bookstore_split_and_policies(bookstore: Mesh) -> None:
    store = bookstore.service("bookstore", "bookstore")
    warehouse = bookstore.service("bookwarehouse", "bookwarehouse")
    assert store is not None and warehouse is not None
    split = bookstore.split_for(store)
    assert split is not None
    assert [(b.name, dict(b.labels), b.weight) for b in split.backends] == [
        ("v1", {"version": "v1"}, 50),
        ("v2", {"version": "v2"}, 50),
    ]
    assert bookstore.allowed_callers(warehouse, 14001) == Callers(
        frozenset({sid("bookstore", "bookstore-v1"), sid("bookstore", "bookstore-v2")})
    )
    thief = sid("bookthief", "bookthief")
    assert bookstore.may_call(thief, store, 14001)
    assert not bookstore.may_call(thief, warehouse, 14001)
    assert [(s.key, p.port) for s, p in bookstore.reachable(thief)] == [
        ("bookstore/bookstore", 14001)
    ]
    assert [
        (s.key, p.port) for s, p in bookstore.reachable(sid("bookwarehouse", "bookwarehouse"))
    ] == [("bookwarehouse/mysql", 3306)]


def test_file_order_does_not_matter() -> None:
    document = bookstore_document()
    shuffled = copy.deepcopy(document)
    for key in ("workloads", "services"):
        shuffled[key].reverse()
    shuffled["access"]["policies"].reverse()
    assert parse_mesh(document, TD) == parse_mesh(shuffled, TD)


# --- the older form, still used by SDS -------------------------------------------------


def test_service_accounts_form_still_defines_identities() -> None:
    mesh = parse(
        """
        services:
          - name: bookstore
            namespace: bookstore
            ports: [{port: 14001, protocol: http}]
            service_accounts: [bookstore-v2, bookstore-v1]
        """
    )
    assert mesh.services == (
        Service(
            "bookstore",
            "bookstore",
            (ServicePort(14001, "http"),),
            ("bookstore-v2", "bookstore-v1"),
        ),
    )
    assert mesh.service_identities("bookstore", "bookstore") == (
        sid("bookstore", "bookstore-v1"),
        sid("bookstore", "bookstore-v2"),
    )
    assert mesh.reachable(sid("a", "b")) == ()  # no address, nothing to route to
    assert Mesh.empty(TD).service_identities("bookstore", "bookstore") is None
    assert parse_mesh(None, TD) == Mesh.empty(TD)


def test_explicit_backends_and_target_ports() -> None:
    mesh = parse(
        """
        workloads:
          - {name: db-0, namespace: data, service_account: db, address: 10.0.0.5, ports: [5432]}
          - {name: db-1, namespace: data, service_account: db-replica, address: 10.0.0.6,
             ports: [5432]}
        services:
          - name: db
            namespace: data
            address: 10.96.0.9
            ports: [{port: 5000, target_port: 5432, protocol: http}]
            backends: [db-1, data/db-0]
        """
    )
    db = mesh.service("data", "db")
    assert db is not None
    assert [w.name for w in mesh.endpoints(db)] == ["db-0", "db-1"]
    assert db.ports[0].target == 5432
    assert mesh.service_identities("data", "db") == (sid("data", "db"), sid("data", "db-replica"))


def test_permissive_mode_lets_the_trust_domain_in() -> None:
    document = bookstore_document()
    document["access"] = {"mode": "permissive"}
    mesh = parse_mesh(document, TD)
    warehouse = mesh.service("bookwarehouse", "bookwarehouse")
    assert warehouse is not None
    assert mesh.allowed_callers(warehouse, 14001).anyone
    assert mesh.may_call(sid("bookthief", "bookthief"), warehouse, 14001)
    assert not mesh.may_call(SpiffeId.parse("spiffe://evil.example/ns/a/sa/b"), warehouse, 14001)
    assert len(mesh.reachable(sid("bookthief", "bookthief"))) == 3
    assert mesh.reachable(SpiffeId.parse("spiffe://evil.example/ns/a/sa/b")) == ()


def test_source_wildcards_admit_a_namespace_or_the_whole_mesh() -> None:
    """``ns/*`` is every identity of a namespace, ``*`` every identity of the mesh: both
    for visibility (what a caller's proxy is given) and for who is admitted."""
    document = bookstore_document()
    policies = document["access"]["policies"]
    warehouse_policy = next(p for p in policies if p["service"] == "bookwarehouse/bookwarehouse")
    warehouse_policy["from"] = ["bookstore/*"]
    mysql_policy = next(p for p in policies if p["service"] == "bookwarehouse/mysql")
    mysql_policy["from"] = ["*"]
    mesh = parse_mesh(document, TD)
    warehouse = mesh.service("bookwarehouse", "bookwarehouse")
    mysql = mesh.service("bookwarehouse", "mysql")
    assert warehouse is not None and mysql is not None
    assert mesh.allowed_callers(warehouse, 14001) == Callers(namespaces=frozenset({"bookstore"}))
    newcomer = sid("bookstore", "bookstore-admin")  # in no workload: a wildcard still names it
    assert mesh.may_call(newcomer, warehouse, 14001)
    assert not mesh.may_call(sid("bookthief", "bookthief"), warehouse, 14001)
    assert not mesh.may_call(SpiffeId.parse("spiffe://cluster.local/bookstore"), warehouse, 14001)
    assert [(s.key, p.port) for s, p in mesh.reachable(newcomer)] == [
        ("bookwarehouse/bookwarehouse", 14001),
        ("bookwarehouse/mysql", 3306),
    ]
    thief = sid("bookthief", "bookthief")
    assert [(s.key, p.port) for s, p in mesh.reachable(thief)] == [
        ("bookstore/bookstore", 14001),
        ("bookwarehouse/mysql", 3306),
    ]
    outsider = SpiffeId.parse("spiffe://evil.example/ns/bookstore/sa/x")
    assert not mesh.may_call(outsider, mysql, 3306)
    assert mesh.reachable(outsider) == ()
    # who may learn the identities behind a service (its outbound validation secret)
    assert mesh.may_reach(newcomer, "bookwarehouse", "bookwarehouse")
    assert mesh.may_reach(thief, "bookwarehouse", "mysql")
    assert not mesh.may_reach(thief, "bookwarehouse", "bookwarehouse")
    assert not mesh.may_reach(outsider, "bookwarehouse", "mysql")


def test_timeouts_and_mtls_modes_are_read_per_port_and_service() -> None:
    document = bookstore_document()
    store = next(s for s in document["services"] if s["name"] == "bookstore")
    store["mtls"] = "permissive"
    store["ports"] = [{"port": 14001, "timeout": "2m"}]
    mesh = parse_mesh(document, TD)
    parsed = mesh.service("bookstore", "bookstore")
    assert parsed is not None and parsed.mtls == "permissive"
    assert parsed.ports[0].timeout == 120
    warehouse = mesh.service("bookwarehouse", "bookwarehouse")
    assert warehouse is not None and warehouse.mtls == "strict"
    assert warehouse.ports[0].timeout == 0  # none unless configured
    store["ports"] = [{"port": 14001, "timeout": "0s"}]
    assert parse_mesh(document, TD).services[0].ports[0].timeout == 0


# --- refusals: one clear error naming the entry ----------------------------------------

WORKLOAD = "{name: w, namespace: ns, service_account: sa, address: 10.0.0.1, ports: [8080]}"

REFUSALS = [
    (
        "workloads: [{name: w, namespace: ns, address: 10.0.0.1}]",
        "workloads[0]: missing required field 'service_account'",
    ),
    (
        f"workloads: [{WORKLOAD}, {{name: x, namespace: ns, service_account: sa, "
        "address: 10.0.0.2, ports: [{port: 70000}]}]",
        "workloads[1].ports[0].port: 70000 is not a port number",
    ),
    (
        "workloads: [{name: w, namespace: ns, service_account: sa, address: localhost}]",
        "workloads[0].address: 'localhost' is not an IP address",
    ),
    (
        "workloads: [{name: w, namespace: ns, service_account: sa, address: 0.0.0.0}]",
        "workloads[0].address: 0.0.0.0 cannot be",
    ),
    (
        "workloads: [{name: w, namespace: ns, service_account: sa, address: 10.0.0.1, "
        "ports: [80, {port: 80}]}]",
        "workloads[0].ports[1].port: 80 is already listed at workloads[0].ports[0]",
    ),
    (
        "workloads: [{name: w, namespace: ns, service_account: sa, address: 10.0.0.1, "
        "ports: [{port: 80, protocol: udp}]}]",
        "workloads[0].ports[0].protocol: 'udp' is not one of http, tcp, grpc",
    ),
    (
        f"workloads: [{WORKLOAD}, {WORKLOAD}]",
        "workloads[1]: ns/w is already defined at workloads[0]",
    ),
    (
        f"workloads: [{WORKLOAD}, {{name: x, namespace: ns, service_account: sa, "
        "address: 10.0.0.1}]",
        "workloads[1].address: 10.0.0.1 is already used by workloads[0].address",
    ),
    (
        "workloads: [{name: w, namespace: ns, service_account: sa, address: 10.0.0.1, "
        "labels: {version: 2}}]",
        "workloads[0].labels.version: 2 is not a valid label value (quote numbers)",
    ),
    (
        "workloads: [{name: w, namespace: ns, service_account: 'a/b', address: 10.0.0.1}]",
        "workloads[0].service_account: 'a/b' is not a valid name",
    ),
    (
        "workloads: [{name: '..', namespace: ns, service_account: sa, address: 10.0.0.1}]",
        "workloads[0].name: '..' is not a valid name",
    ),
    (
        "workloads: [{name: w, namespace: 'a b', service_account: sa, address: 10.0.0.1}]",
        "workloads[0].namespace: 'a b' is not a valid name (A-Z a-z 0-9 . - _)",
    ),
    (
        "workloads: [{name: '', namespace: ns, service_account: sa, address: 10.0.0.1}]",
        "workloads[0].name: '' is not a valid name",
    ),
    (
        "workloads: [{name: w, namespace: ns, service_account: sa, address: 10.0.0.1, "
        "outbound_address: 10.0.0.1}]",
        "workloads[0].outbound_address: must differ from address",
    ),
    (
        "workloads: [{name: w, namespace: ns, service_acount: sa, address: 10.0.0.1}]",
        "workloads[0]: unknown keys ['service_acount']",
    ),
    (
        f"workloads: [{WORKLOAD}]\nservices: [{{name: s, namespace: ns, address: 10.9.0.1, "
        "ports: [8080], selecter: {app: w}}]",
        "services[0]: unknown keys ['selecter']",
    ),
    (
        "services: [{name: s, namespace: ns, address: 10.9.0.1, ports: [80]}]",
        "services[0]: give exactly one of selector, backends or service_accounts",
    ),
    (
        "services: [{name: s, namespace: ns, ports: [80], selector: {app: s}}]",
        "services[0]: missing required field 'address'",
    ),
    (
        "services: [{name: s, namespace: ns, address: 10.9.0.1, ports: [80], selector: {}}]",
        "services[0].selector: must list at least one label",
    ),
    (
        "services: [{name: s, namespace: ns, address: 10.9.0.1, ports: [80], backends: [nope]}]",
        "services[0].backends[0]: no workload ns/nope in workloads",
    ),
    (
        f"workloads: [{WORKLOAD}]\nservices: [{{name: s, namespace: ns, address: 10.9.0.1, "
        "ports: [8080, 9090], backends: [w]}]",
        "services[0].ports[1]: workload ns/w does not list port 9090",
    ),
    (
        f"workloads: [{WORKLOAD}]\nservices: [{{name: s, namespace: ns, address: 10.9.0.1, "
        "ports: [{port: 8080, protocol: tcp}], backends: [w]}]",
        "services[0].ports[0]: protocol tcp but workload ns/w serves port 8080 as http",
    ),
    (
        f"workloads: [{WORKLOAD}]\nservices: [{{name: s, namespace: ns, address: 10.0.0.1, "
        "ports: [8080], backends: [w]}]",
        "services[0].address: 10.0.0.1 is already used by workloads[0].address",
    ),
    (
        "traffic_splits: [{service: ns/s, backends: [{name: a, labels: {v: a}, weight: 1}]}]",
        "traffic_splits[0].service: no service ns/s in services",
    ),
    (
        "services: [{name: s, namespace: ns, service_accounts: [sa]}]\n"
        "access: {policies: [{service: ns/s, ports: [80], from: [a/b]}]}",
        "access.policies[0].ports[0]: ns/s has no port 80",
    ),
    (
        "services: [{name: s, namespace: ns, ports: [80], service_accounts: [sa]}]\n"
        "access: {policies: [{service: ns/s, from: ['spiffe://other.org/ns/a/sa/b']}]}",
        "access.policies[0].from[0]: spiffe://other.org/ns/a/sa/b is outside the trust domain",
    ),
    (
        "services: [{name: s, namespace: ns, ports: [80], service_accounts: [sa]}]\n"
        "access: {policies: [{service: ns/s, from: ['a/b/c']}]}",
        "access.policies[0].from[0]: 'a/b/c' is not of the form 'namespace/name'",
    ),
    (
        "services: [{name: s, namespace: ns, ports: [80], service_accounts: [sa]}]\n"
        "access: {policies: [{service: ns/s, from: []}]}",
        "access.policies[0].from: must list at least one identity",
    ),
    (
        "services: [{name: s, namespace: ns, ports: [80], service_accounts: [sa]}]\n"
        "access: {policies: [{service: ns/s, from: ['a b/*']}]}",
        "access.policies[0].from[0]: 'a b' is not a valid name",
    ),
    (
        "services: [{name: s, namespace: ns, ports: [80], service_accounts: [sa]}]\n"
        "access: {policies: [{service: ns/s, from: ['*/sa']}]}",
        "access.policies[0].from[0]: '*' is not a valid name",
    ),
    (
        "services: [{name: s, namespace: ns, ports: [{port: 80, timeout: 10}], "
        "service_accounts: [sa]}]",
        "services[0].ports[0].timeout: expected a duration such as 30s",
    ),
    (
        "services: [{name: s, namespace: ns, ports: [{port: 80, timeout: 1.5s}], "
        "service_accounts: [sa]}]",
        "services[0].ports[0].timeout: invalid duration '1.5s'",
    ),
    (
        "services: [{name: s, namespace: ns, ports: [80], service_accounts: [sa], mtls: disable}]",
        "services[0].mtls: 'disable' is not one of strict, permissive",
    ),
    (
        f"workloads: [{WORKLOAD}]\nservices: [{{name: s, namespace: ns, address: 10.9.0.1, "
        "ports: [8080], backends: [w]}, {name: t, namespace: ns, address: 10.9.0.2, "
        "ports: [{port: 80, target_port: 8080}], backends: [w], mtls: permissive}]",
        "services[1].mtls: permissive but services[0] (ns/s, strict) also targets port 8080 "
        "of workload ns/w",
    ),
    ("access: {mode: open}", "access.mode: 'open' is not one of strict, permissive"),
    ("egress: allow", "egress: 'allow' is not one of blackhole, passthrough"),
    ("trust_domain: example.org", "the mesh file is for example.org, this CA serves cluster.local"),
    ("servics: []", "mesh file: unknown keys ['servics']"),
    ("- a\n- b", "mesh file: expected a mapping"),
]


@pytest.mark.parametrize(("text", "expected"), REFUSALS)
def test_refusals_point_at_the_entry(text: str, expected: str) -> None:
    with pytest.raises(MeshError) as caught:
        parse(text)
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda d: d["traffic_splits"][0]["backends"][1]["labels"].update(version="v3"),
            "traffic_splits[0].backends[1].labels: no workload of bookstore/bookstore carries",
        ),
        (
            lambda d: [b.update(weight=0) for b in d["traffic_splits"][0]["backends"]],
            "traffic_splits[0].backends: the weights add up to 0",
        ),
        (
            lambda d: d["traffic_splits"][0]["backends"][1].update(name="v1"),
            "traffic_splits[0].backends[1].name: 'v1' is already used in this split",
        ),
        (
            lambda d: d["traffic_splits"].append(d["traffic_splits"][0]),
            "traffic_splits[1]: bookstore/bookstore is already defined at traffic_splits[0]",
        ),
        (
            lambda d: d["traffic_splits"][0]["backends"][0].update(weight=-5),
            "traffic_splits[0].backends[0].weight: -5 is negative",
        ),
        (
            lambda d: d["traffic_splits"][0]["backends"][0].update(weight=2**32),
            "traffic_splits[0].backends[0].weight: 4294967296 is over Envoy's limit of 4294967295",
        ),
        (
            lambda d: [
                b.update(weight=2**31) for b in d["traffic_splits"][0]["backends"]
            ],  # each fits, the sum does not
            "traffic_splits[0].backends: the weights add up to 4294967296, over Envoy's limit",
        ),
    ],
)
def test_split_refusals(change: Any, expected: str) -> None:
    document = bookstore_document()
    change(document)
    with pytest.raises(MeshError, match=None) as caught:
        parse_mesh(document, TD)
    assert expected in str(caught.value)


def test_a_zero_weight_backend_may_be_empty() -> None:
    document = bookstore_document()
    document["traffic_splits"][0]["backends"].append(
        {"name": "v3", "labels": {"version": "v3"}, "weight": 0}
    )
    mesh = parse_mesh(document, TD)
    store = mesh.service("bookstore", "bookstore")
    assert store is not None
    split = mesh.split_for(store)
    assert split is not None and [b.name for b in split.backends] == ["v1", "v2", "v3"]


def test_load_mesh_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(MeshError, match="cannot read mesh file"):
        load_mesh(tmp_path / "missing.yaml", TD)
    broken = tmp_path / "broken.yaml"
    broken.write_text("services: [\n")
    with pytest.raises(MeshError, match="is not valid YAML"):
        load_mesh(broken, TD)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("workloads: [{name: w}]\n")
    with pytest.raises(MeshError, match=rf"^{wrong}: workloads\[0\]: missing required field"):
        load_mesh(wrong, TD)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(MeshError, match="not UTF-8"):
        load_mesh(binary, TD)


def test_invalid_yaml_is_refused_without_echoing_the_file(tmp_path: Path) -> None:
    """SECURITY.md: errors never echo file content (a token pasted in by mistake)."""
    broken = tmp_path / "mesh.yaml"
    broken.write_text('services: []\nvault_token: "hvs.CAESIsecretTOKENvalue\n')
    with pytest.raises(MeshError) as caught:
        load_mesh(broken, TD)
    message = str(caught.value)
    assert message == (
        f"mesh file {broken} is not valid YAML (found unexpected end of stream, line 3)"
    )
    assert "secretTOKEN" not in message
    assert "vault_token" not in message


# --- any damage to a valid file is a MeshError, never a crash ---------------------------

_JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.text(max_size=12),
    st.lists(st.integers(min_value=0, max_value=70000), max_size=3),
    st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=2),
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            out += _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            out += _paths(child, (*prefix, i))
    return out


_DOCUMENT = bookstore_document()
_ALL_PATHS = _paths(_DOCUMENT)[1:]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(_ALL_PATHS), _JUNK)
def test_damaged_files_fail_cleanly(path: tuple[Any, ...], junk: Any) -> None:
    document = copy.deepcopy(_DOCUMENT)
    target = document
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = junk
    try:
        mesh = parse_mesh(document, TD)
    except MeshError as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        generate_for_everyone(mesh)


def generate_for_everyone(mesh: Mesh) -> None:
    """A mesh that passed validation generates a configuration for every proxy: each
    identity of the file and an outsider, each of its workloads, both capture modes.
    A proxy may be refused with a GenerationError that says why (two listeners on one
    address); any other exception would end that proxy's ADS stream with INTERNAL."""
    identities = {mesh.identity_of(w) for w in mesh.workloads}
    identities |= {source for policy in mesh.policies for source in policy.sources}
    identities.add(sid("outside", "nobody"))
    for identity in sorted(identities):
        for capture in CAPTURE_MODES:
            for workload in [w.key for w in mesh.workloads_of(identity)] or [None]:
                try:
                    generate(mesh, identity, capture=capture, workload=workload)
                except GenerationError as exc:
                    assert str(exc) and "\n" not in str(exc)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=2**33), min_size=2, max_size=2))
@example([2**32, 0])  # one weight over uint32
@example([2**32 - 1, 1])  # each fits, the sum does not
def test_split_weights_either_generate_or_are_refused_naming_the_entry(
    weights: list[int],
) -> None:
    """Envoy's weights are uint32, and so is their sum: the model refuses what generation
    or Envoy would not take, so an accepted file never fails a proxy's ADS stream."""
    document = bookstore_document()
    for backend, weight in zip(document["traffic_splits"][0]["backends"], weights, strict=True):
        backend["weight"] = weight
    try:
        mesh = parse_mesh(document, TD)
    except MeshError as exc:
        assert str(exc).startswith("traffic_splits[0].backends")
        assert sum(weights) == 0 or sum(weights) > 2**32 - 1
        return
    assert 0 < sum(weights) <= 2**32 - 1
    generate_for_everyone(mesh)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b"]),
            st.dictionaries(st.sampled_from(["app", "tier"]), st.sampled_from(["x", "y"])),
        ),
        max_size=8,
    ),
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b"]),
            st.dictionaries(st.sampled_from(["app", "tier"]), st.sampled_from(["x", "y"])),
        ),
        max_size=4,
    ),
)
def test_a_selector_selects_exactly_the_matching_workloads_of_its_namespace(
    pods: list[tuple[str, dict[str, str]]], selectors: list[tuple[str, dict[str, str]]]
) -> None:
    """The index finds a selector's workloads from its labels; the same as checking every
    workload of the namespace against it (an empty selector takes them all)."""
    workloads = tuple(
        sorted(
            Workload(ns, f"w{i}", "sa", f"10.0.0.{i + 1}", labels=labels_of(labels))
            for i, (ns, labels) in enumerate(pods)
        )
    )
    services = tuple(
        Service(f"s{i}", ns, (ServicePort(80),), address=f"10.96.0.{i + 1}",
                selector=labels_of(selector))
        for i, (ns, selector) in enumerate(selectors)
    )  # fmt: skip
    mesh = Mesh(TD, services, workloads)
    for service in services:
        assert mesh.endpoints(service) == tuple(
            w
            for w in workloads
            if w.namespace == service.namespace and matches(service.selector or (), w.labels)
        )
        for workload in mesh.endpoints(service):
            assert service in mesh.services_of(workload)
