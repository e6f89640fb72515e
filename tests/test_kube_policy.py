"""meshca/kube/policy.py: HTTPRoutes (GAMMA) and AccessPolicies to the mesh model's splits
and access policies, with a verdict per object; one bad object never costs anyone else.

Pure functions over objects shaped as the API server returns them; the same translation
against a real API server (its defaults, schema and status) is in tests/test_kube_objects.py.
"""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshca.envoy.generate import generate
from meshca.envoy.mesh import parse_mesh
from meshca.envoy.model import Mesh
from meshca.kube.policy import MAX_MESSAGE, MAX_WEIGHT, TrafficPolicy, Verdict, translate
from meshca.spiffe import SpiffeId, TrustDomain
from meshca.xds.resources import CLUSTER_TYPE
from tests.envoy_harness import bookstore_document

TD = TrustDomain("cluster.local")
Obj = dict[str, Any]


def sid(namespace: str, account: str) -> SpiffeId:
    return SpiffeId.from_kubernetes(namespace, account, TD)


def _mesh() -> Mesh:
    """The bookstore's services and workloads, plus a Service per version (the GAMMA
    backends) and one selecting a workload bookstore does not have; no splits, no policies."""
    document = bookstore_document()
    document.pop("traffic_splits", None)
    document.pop("access", None)
    document["workloads"].append(
        {
            "name": "stray",
            "namespace": "bookstore",
            "service_account": "stray",
            "address": "127.0.0.27",
            "ports": [14001],
            "labels": {"app": "stray"},
        }
    )
    for number, (name, selector) in enumerate(
        [
            ("bookstore-v1", {"app": "bookstore", "version": "v1"}),
            ("bookstore-v2", {"app": "bookstore", "version": "v2"}),
            ("stray", {"app": "stray"}),
        ]
    ):
        document["services"].append(
            {
                "name": name,
                "namespace": "bookstore",
                "address": f"127.0.0.{111 + number}",
                "ports": [14001],
                "selector": selector,
            }
        )
    return parse_mesh(document, TD)


MESH = _mesh()


def route(
    name: str = "split",
    backends: list[tuple[str, int | None]] | None = None,
    *,
    parent: str = "bookstore",
    namespace: str = "bookstore",
    created: str = "2026-01-01T00:00:00Z",
    **rule: Any,
) -> Obj:
    refs = [
        {"group": "", "kind": "Service", "name": n, "port": 14001}
        | ({} if w is None else {"weight": w})
        for n, w in (
            backends if backends is not None else [("bookstore-v1", 90), ("bookstore-v2", 10)]
        )
    ]
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "generation": 3,
            "creationTimestamp": created,
        },
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": parent, "port": 14001}],
            "rules": [{"backendRefs": refs, **rule}],
        },
    }


def access(
    name: str, target: str, sources: list[Obj], namespace: str = "bookwarehouse", **spec: Any
) -> Obj:
    return {
        "apiVersion": "meshca.io/v1alpha1",
        "kind": "AccessPolicy",
        "metadata": {"name": name, "namespace": namespace, "generation": 1},
        "spec": {"targetRef": {"kind": "Service", "name": target}, "from": sources, **spec},
    }


def verdict(policy: TrafficPolicy, name: str) -> Verdict:
    (found,) = [v for v in policy.verdicts if v.ref.name == name]
    return found


def conditions(v: Verdict) -> dict[str, tuple[bool, str]]:
    every = [*v.conditions, *(c for p in v.parents for c in p.conditions)]
    return {c.type: (c.status, c.reason) for c in every}


# --- HTTPRoute ------------------------------------------------------------------------------


def test_a_gamma_route_splits_its_parent_among_the_backends_workloads() -> None:
    policy = translate(MESH, [route()])
    (split,) = policy.splits
    assert split.service == "bookstore/bookstore"
    assert [(b.name, dict(b.labels), b.weight) for b in split.backends] == [
        ("bookstore-v1", {"app": "bookstore", "version": "v1"}, 90),
        ("bookstore-v2", {"app": "bookstore", "version": "v2"}, 10),
    ]
    v = verdict(policy, "split")
    assert v.accepted and v.generation == 3
    assert conditions(v) == {"Accepted": (True, "Accepted"), "ResolvedRefs": (True, "ResolvedRefs")}
    assert v.parents[0].parent_ref == route()["spec"]["parentRefs"][0]
    # With a policy admitting bookbuyer, its proxy gets one cluster per backend.
    admit = access(
        "buyers", "bookstore", [{"kind": "Namespace", "name": "bookbuyer"}], namespace="bookstore"
    )
    mesh = translate(MESH, [route()], [admit]).apply(MESH)
    clusters = set(generate(mesh, sid("bookbuyer", "bookbuyer")).get(CLUSTER_TYPE))
    assert {
        "bookstore/bookstore|14001|bookstore-v1",
        "bookstore/bookstore|14001|bookstore-v2",
    } <= clusters


def test_weights_default_to_one_and_a_zero_weight_keeps_its_backend() -> None:
    (split,) = translate(
        MESH, [route(backends=[("bookstore-v1", None), ("bookstore-v2", 0)])]
    ).splits
    assert [(b.name, b.weight) for b in split.backends] == [
        ("bookstore-v1", 1),
        ("bookstore-v2", 0),
    ]


def test_weights_adding_up_to_zero_or_past_envoys_limit_are_refused_alone() -> None:
    good = route("good", parent="bookstore-v1", backends=[("bookstore-v1", 1)])
    zero = route("zero", backends=[("bookstore-v1", 0), ("bookstore-v2", 0)])
    policy = translate(MESH, [zero, good])
    assert [s.service for s in policy.splits] == ["bookstore/bookstore-v1"]
    assert conditions(verdict(policy, "zero"))["Accepted"] == (False, "UnsupportedValue")
    assert verdict(policy, "zero").problems() == [
        "spec.rules[0].backendRefs: the weights add up to 0"
    ]
    assert verdict(policy, "good").accepted

    over = route("over", backends=[("bookstore-v1", MAX_WEIGHT), ("bookstore-v2", 1)])
    policy = translate(MESH, [over])
    assert not policy.splits
    assert "over Envoy's limit of 4294967295" in verdict(policy, "over").problems()[0]
    one = route("one", backends=[("bookstore-v1", MAX_WEIGHT + 1)])
    assert (
        "backendRefs[0].weight: 4294967296 is over"
        in translate(MESH, [one]).verdicts[0].problems()[0]
    )
    negative = route("negative", backends=[("bookstore-v1", -1)])
    assert "is negative" in translate(MESH, [negative]).verdicts[0].problems()[0]


def test_an_unknown_backend_is_a_resolved_refs_failure() -> None:
    policy = translate(MESH, [route(backends=[("bookstore-v1", 1), ("bookstore-v3", 1)])])
    assert not policy.splits
    v = verdict(policy, "split")
    assert conditions(v) == {
        "Accepted": (False, "BackendNotFound"),
        "ResolvedRefs": (False, "BackendNotFound"),
    }
    assert v.problems() == [
        "spec.rules[0].backendRefs[1]: no Service 'bookstore-v3' in namespace bookstore in the mesh"
    ]


def test_references_meshca_cannot_follow_are_refused_with_gateway_apis_reasons() -> None:
    other_ns = route()
    other_ns["spec"]["rules"][0]["backendRefs"][0]["namespace"] = "bookwarehouse"
    not_service = route()
    not_service["spec"]["rules"][0]["backendRefs"][0].update(group="example.com", kind="Bucket")
    policy = translate(
        MESH,
        [
            other_ns | {"metadata": {"name": "a", "namespace": "bookstore"}},
            not_service | {"metadata": {"name": "b", "namespace": "bookstore"}},
        ],
    )
    assert conditions(verdict(policy, "a"))["ResolvedRefs"] == (False, "RefNotPermitted")
    assert conditions(verdict(policy, "b"))["ResolvedRefs"] == (False, "InvalidKind")
    assert not policy.splits


def test_routes_meshca_cannot_express_are_refused() -> None:
    matches = route(matches=[{"path": {"type": "PathPrefix", "value": "/books"}}])
    filters = route(filters=[{"type": "RequestHeaderModifier"}])
    two_rules = route()
    two_rules["spec"]["rules"].append(copy.deepcopy(two_rules["spec"]["rules"][0]))
    stray = route(backends=[("bookstore-v1", 1), ("stray", 1)])
    for obj, words in [
        (matches, "no per-path or header routing"),
        (filters, "not 'filters'"),
        (two_rules, "exactly one rule"),
        (stray, "selects workloads that bookstore/bookstore does not (bookstore/stray)"),
    ]:
        policy = translate(MESH, [obj])
        assert not policy.splits, words
        assert conditions(policy.verdicts[0])["Accepted"] == (False, "UnsupportedValue")
        assert words in policy.verdicts[0].problems()[0]
    # the default match the API server fills in is the whole Service: applied
    default = route(matches=[{"path": {"type": "PathPrefix", "value": "/"}}])
    assert translate(MESH, [default]).splits


def test_parents_that_are_not_meshcas_get_no_verdict_and_unknown_ones_say_so() -> None:
    gateway = route()
    gateway["spec"]["parentRefs"] = [{"name": "edge"}]  # kind Gateway by default
    assert translate(MESH, [gateway]) == TrafficPolicy()
    missing = route(parent="nope")
    v = translate(MESH, [missing]).verdicts[0]
    assert conditions(v)["Accepted"] == (False, "NoMatchingParent")
    assert conditions(v)["ResolvedRefs"] == (True, "ResolvedRefs")
    # objects outside the mesh's namespaces are not looked at
    assert translate(MESH, [missing], namespaces={"bookbuyer"}) == TrafficPolicy()


def test_the_oldest_route_for_a_service_wins_and_the_other_is_told() -> None:
    old = route("old", created="2026-01-01T00:00:00Z")
    new = route("new", [("bookstore-v2", 1)], created="2026-02-01T00:00:00Z")
    policy = translate(MESH, [new, old])
    (split,) = policy.splits
    assert [b.name for b in split.backends] == ["bookstore-v1", "bookstore-v2"]
    assert verdict(policy, "old").accepted
    assert conditions(verdict(policy, "new"))["Accepted"] == (False, "Conflicted")
    assert verdict(policy, "new").problems() == [
        "spec.parentRefs[0]: Service bookstore/bookstore is already split by HTTPRoute "
        "bookstore/old, which is older (the oldest applies)"
    ]
    twice = route("twice")
    twice["spec"]["parentRefs"].append(dict(twice["spec"]["parentRefs"][0]))
    v = translate(MESH, [twice]).verdicts[0]
    assert [p.accepted for p in v.parents] == [True, False]
    assert v.problems() == ["spec.parentRefs[1]: Service bookstore/bookstore is already a parent"]


# --- AccessPolicy ---------------------------------------------------------------------------


def test_access_policies_admit_accounts_namespaces_and_the_trust_domain() -> None:
    policies = [
        access(
            "warehouse",
            "bookwarehouse",
            [
                {"kind": "ServiceAccount", "namespace": "bookstore", "name": "bookstore-v1"},
                {"kind": "Namespace", "name": "bookbuyer"},
            ],
            ports=[14001],
        ),
        access("mysql", "mysql", [{"kind": "ServiceAccount", "name": "bookwarehouse"}]),
        access("store", "bookstore", [{"kind": "TrustDomain"}], namespace="bookstore"),
    ]
    translated = translate(MESH, [], policies)
    assert all(v.accepted for v in translated.verdicts)
    mesh = translated.apply(MESH)
    warehouse, mysql, store = (
        mesh.service("bookwarehouse", "bookwarehouse"),
        mesh.service("bookwarehouse", "mysql"),
        mesh.service("bookstore", "bookstore"),
    )
    assert warehouse is not None and mysql is not None and store is not None
    assert mesh.may_call(sid("bookstore", "bookstore-v1"), warehouse, 14001)
    assert mesh.may_call(sid("bookbuyer", "anyone-here"), warehouse, 14001)
    assert not mesh.may_call(sid("bookstore", "bookstore-v2"), warehouse, 14001)
    # a ServiceAccount without a namespace is the policy's own namespace's
    assert mesh.may_call(sid("bookwarehouse", "bookwarehouse"), mysql, 3306)
    assert not mesh.may_call(sid("bookstore", "bookwarehouse"), mysql, 3306)
    assert mesh.may_call(sid("bookthief", "bookthief"), store, 14001)
    assert not mesh.may_call(SpiffeId.parse("spiffe://other.example/ns/a/sa/b"), store, 14001)
    assert verdict(translated, "warehouse").conditions[0].message == (
        "admits 2 sources to bookwarehouse/bookwarehouse"
    )


def test_a_bad_access_policy_is_refused_alone_saying_why() -> None:
    good = access("good", "mysql", [{"kind": "ServiceAccount", "name": "bookwarehouse"}])
    cases = {
        "bad-account": (
            [{"kind": "ServiceAccount", "namespace": "bookstore", "name": "Bad_Account"}],
            {},
            "InvalidSource",
            "spec.from[0].name: 'Bad_Account' is not a valid service account name",
        ),
        "bad-namespace": (
            [{"kind": "ServiceAccount", "namespace": "-x", "name": "a"}],
            {},
            "InvalidSource",
            "spec.from[0].namespace: '-x' is not a namespace name",
        ),
        "td-with-name": (
            [{"kind": "TrustDomain", "name": "x"}],
            {},
            "InvalidSource",
            "spec.from[0]: a TrustDomain source names nothing",
        ),
        "no-port": (
            [{"kind": "TrustDomain"}],
            {"ports": [14002]},
            "PortNotFound",
            "spec.ports[0]: Service bookwarehouse/bookwarehouse has no port 14002",
        ),
    }
    objects = [good] + [
        access(name, "bookwarehouse", sources, **spec)
        for name, (sources, spec, _, _) in cases.items()
    ]
    objects.append(access("no-target", "nope", [{"kind": "TrustDomain"}]))
    translated = translate(MESH, [], objects)
    assert [p.service for p in translated.policies] == ["bookwarehouse/mysql"]
    assert verdict(translated, "good").accepted
    for name, (_, _, reason, message) in cases.items():
        v = verdict(translated, name)
        assert (v.conditions[0].status, v.conditions[0].reason) == (False, reason), name
        assert v.problems() == [message]
    assert verdict(translated, "no-target").conditions[0].reason == "TargetNotFound"


# --- hostile input --------------------------------------------------------------------------


def test_messages_stay_bounded_whatever_the_object_says() -> None:
    huge = "x" * 100_000
    policy = translate(
        MESH,
        [route(backends=[(huge, 1)])],
        [access("p", huge, []), access("q", "mysql", [{"kind": "ServiceAccount", "name": huge}])],
    )
    for v in policy.verdicts:
        for message in v.problems():
            assert len(message) <= MAX_MESSAGE + 40
            assert huge not in message


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=json_values, rule=json_values, parent=json_values, source=json_values)
def test_any_shape_of_object_gets_a_verdict_never_an_exception(
    spec: Any, rule: Any, parent: Any, source: Any
) -> None:
    shaped = route()
    shaped["spec"]["rules"] = [rule]
    shaped["spec"]["parentRefs"].append(parent)
    raw = {"metadata": {"name": "raw", "namespace": "bookstore"}, "spec": spec}
    weird = access("weird", "bookwarehouse", [source])
    good = access("good", "mysql", [{"kind": "ServiceAccount", "name": "bookwarehouse"}])
    policy = translate(MESH, [shaped, raw], [raw, weird, good])
    assert verdict(policy, "good").accepted
    assert [p.service for p in policy.policies if p.service == "bookwarehouse/mysql"]


def test_a_namespace_acts_only_on_its_own_services() -> None:
    """Whoever may write policy objects in one namespace cannot split, open or divert
    another namespace's Services: a route's parent and backends, and a policy's target,
    are Services of the object's own namespace."""
    foreign_parent = route(namespace="bookthief")
    foreign_parent["spec"]["parentRefs"][0]["namespace"] = "bookstore"
    diverted = route("divert", backends=[("bookstore-v1", 1), ("bookwarehouse", 1)])
    diverted["spec"]["rules"][0]["backendRefs"][1]["namespace"] = "bookwarehouse"
    opened = access("open", "bookstore", [{"kind": "TrustDomain"}], namespace="bookthief")
    policy = translate(MESH, [foreign_parent, diverted], [opened])
    assert policy.splits == () and policy.policies == ()
    assert not verdict(policy, "split").accepted
    consumer = route("consumer")
    consumer["spec"]["parentRefs"][0]["namespace"] = "bookwarehouse"
    assert "no consumer routes" in translate(MESH, [consumer]).verdicts[0].problems()[0]
    assert conditions(verdict(policy, "divert"))["ResolvedRefs"] == (False, "RefNotPermitted")
    assert verdict(policy, "open").problems() == [
        "spec.targetRef: no Service 'bookstore' in namespace bookthief in the mesh"
    ]
    store = MESH.service("bookstore", "bookstore")
    assert store is not None
    assert not policy.apply(MESH).may_call(sid("bookthief", "bookthief"), store, 14001)


def test_the_mesh_with_its_policy_answers_as_one_built_whole() -> None:
    """TrafficPolicy.apply reuses what the mesh already derived from its workloads; every
    answer, and every proxy's generated configuration, is that of the mesh built anew."""
    admit = [
        access(
            "buyers",
            "bookstore",
            [{"kind": "Namespace", "name": "bookbuyer"}],
            namespace="bookstore",
        ),
        access("all", "mysql", [{"kind": "TrustDomain"}]),
    ]
    policy = translate(MESH, [route()], admit)
    reused = policy.apply(MESH)
    fresh = Mesh(MESH.trust_domain, MESH.services, MESH.workloads, policy.splits, policy.policies)
    assert reused == fresh
    store = MESH.service("bookstore", "bookstore")
    assert store is not None and reused.split_for(store) == fresh.split_for(store) is not None
    for caller in (sid("bookbuyer", "bookbuyer"), sid("bookthief", "bookthief")):
        assert reused.reachable(caller) == fresh.reachable(caller)
        assert reused.may_reach(caller, "bookstore", "bookstore") == fresh.may_reach(
            caller, "bookstore", "bookstore"
        )
        assert generate(reused, caller).versions == generate(fresh, caller).versions
    assert reused.reachable(sid("bookbuyer", "bookbuyer")) != MESH.reachable(
        sid("bookbuyer", "bookbuyer")
    )


def test_an_access_policy_outside_the_mesh_is_told_so_and_a_route_there_is_not_meshcas() -> None:
    outside = access("p", "mysql", [{"kind": "TrustDomain"}])
    policy = translate(MESH, [route()], [outside], namespaces={"bookbuyer"})
    assert policy.policies == () and policy.splits == ()
    (v,) = policy.verdicts
    assert (v.ref.kind, v.conditions[0].reason) == ("AccessPolicy", "NamespaceNotInMesh")
    assert v.problems() == [
        "namespace bookwarehouse is not in the mesh (label it meshca.io/mesh=enabled)"
    ]
