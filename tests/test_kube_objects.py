"""HTTPRoutes and AccessPolicies in a real API server: the CRDs from deploy/ installed, the
schema refusing what it can, meshca's translation of the objects as stored (with the
API server's defaults), and the verdicts written to their status once, and logged once.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshca.envoy.mesh import parse_mesh
from meshca.envoy.model import Mesh
from meshca.kube.policy import CONTROLLER_NAME, translate
from meshca.kube.status import StatusWriter
from meshca.spiffe import SpiffeId, TrustDomain
from tests.envoy_harness import bookstore_document
from tests.kube_harness import KubeCluster, KubeError
from tests.kube_policy_harness import POLICIES, ROUTES, install_crds, patch_status

pytestmark = pytest.mark.kube
DOCS = Path(__file__).resolve().parent.parent / "docs" / "deploy.md"
TD = TrustDomain("cluster.local")
Obj = dict[str, Any]


@pytest.fixture
def cluster(kube: KubeCluster) -> KubeCluster:
    install_crds(kube)
    return kube


def shop_mesh(ns: str) -> Mesh:
    """What the mesh source makes of the namespace: a Service ``shop`` and one per
    version, over two workloads."""
    workloads = [
        {
            "name": f"shop-{v}",
            "namespace": ns,
            "service_account": f"shop-{v}",
            "address": f"127.0.0.{50 + i}",
            "ports": [8080],
            "labels": {"app": "shop", "version": v},
        }
        for i, v in enumerate(("v1", "v2"))
    ]
    services = [
        {
            "name": name,
            "namespace": ns,
            "address": f"127.0.1.{60 + i}",
            "ports": [8080],
            "selector": sel,
        }
        for i, (name, sel) in enumerate(
            [
                ("shop", {"app": "shop"}),
                ("shop-v1", {"app": "shop", "version": "v1"}),
                ("shop-v2", {"app": "shop", "version": "v2"}),
            ]
        )
    ]
    return parse_mesh({"workloads": workloads, "services": services}, TD)


def http_route(name: str, weights: dict[str, int], parent: str = "shop") -> Obj:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": name},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": parent, "port": 8080}],
            "rules": [
                {
                    "backendRefs": [
                        {"name": backend, "port": 8080, "weight": weight}
                        for backend, weight in weights.items()
                    ]
                }
            ],
        },
    }


def access_policy(name: str, target: str, sources: list[Obj], **spec: Any) -> Obj:
    return {
        "apiVersion": "meshca.io/v1alpha1",
        "kind": "AccessPolicy",
        "metadata": {"name": name},
        "spec": {"targetRef": {"name": target}, "from": sources, **spec},
    }


def refused(cluster: KubeCluster, path: str, obj: Obj) -> str:
    with pytest.raises(KubeError) as caught:
        cluster.request("POST", path, obj, params={"fieldValidation": "Strict"})
    assert caught.value.status in (400, 422), caught.value  # 400: strict decoding
    return str(caught.value)


# --- the schemas ----------------------------------------------------------------------------


def test_access_policy_schema_fills_defaults_and_refuses_what_it_can(
    cluster: KubeCluster, kube_namespace: str
) -> None:
    path = POLICIES.format(ns=kube_namespace)
    created = cluster.create(
        path,
        access_policy(
            "ok",
            "shop",
            [
                {"kind": "ServiceAccount", "name": "buyer", "namespace": "buyers"},
                {"kind": "Namespace", "name": "ops"},
                {"kind": "TrustDomain"},
            ],
            ports=[8080],
        ),
    )
    assert created["spec"]["targetRef"] == {"group": "", "kind": "Service", "name": "shop"}
    cases: list[tuple[list[Obj], dict[str, Any], str]] = [
        ([{"kind": "ServiceAccount", "name": "Bad_Account"}], {}, "spec.from[0].name"),
        ([{"kind": "ServiceAccount", "name": "a", "namespace": "ns.with.dots"}], {}, "namespace"),
        ([{"kind": "User", "name": "alice"}], {}, 'Unsupported value: "User"'),
        ([{"kind": "ServiceAccount"}], {}, "a ServiceAccount source needs a name"),
        ([{"kind": "Namespace", "name": "a", "namespace": "b"}], {}, "a Namespace source needs"),
        ([{"kind": "TrustDomain", "name": "x"}], {}, "a TrustDomain source names nothing"),
        ([], {}, "spec.from"),
        ([{"kind": "TrustDomain"}], {"ports": [0]}, "spec.ports[0]"),
        ([{"kind": "TrustDomain"}], {"froms": []}, 'unknown field "spec.froms"'),
    ]
    for number, (sources, spec, words) in enumerate(cases):
        message = refused(cluster, path, access_policy(f"bad-{number}", "shop", sources, **spec))
        assert words in message, (number, message)
    assert refused(cluster, path, access_policy("bad-target", "Shop!", [{"kind": "TrustDomain"}]))


def test_httproute_schema_refuses_a_weight_past_its_limit(
    cluster: KubeCluster, kube_namespace: str
) -> None:
    path = ROUTES.format(ns=kube_namespace)
    created = cluster.create(path, http_route("ok", {"shop-v1": 1_000_000, "shop-v2": 0}))
    rule = created["spec"]["rules"][0]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]  # defaulted
    assert rule["backendRefs"][0]["group"] == "" and rule["backendRefs"][0]["kind"] == "Service"
    assert "less than or equal to 1000000" in refused(
        cluster, path, http_route("over", {"shop-v1": 1_000_001})
    )
    assert "greater than or equal to 0" in refused(
        cluster, path, http_route("negative", {"shop-v1": -1})
    )


# --- translation and status -----------------------------------------------------------------


def _list(cluster: KubeCluster, path: str) -> list[Obj]:
    answer = cluster.get(path)
    kind = answer["kind"].removesuffix("List")
    return [{"apiVersion": answer["apiVersion"], "kind": kind, **item} for item in answer["items"]]


def _conditions(status_parent: Obj) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status_parent["conditions"]}


def test_verdicts_reach_status_and_the_log_once_and_bad_objects_cost_no_one_else(
    cluster: KubeCluster,
    kube_namespaces: Callable[..., str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    ns = kube_namespaces("shop", labels={"meshca.io/mesh": "enabled"})
    routes, policies = ROUTES.format(ns=ns), POLICIES.format(ns=ns)
    cluster.create(routes, http_route("canary", {"shop-v1": 90, "shop-v2": 10}))
    cluster.create(routes, http_route("zero", {"shop-v1": 0, "shop-v2": 0}, parent="shop-v1"))
    cluster.create(routes, http_route("missing", {"shop-v3": 1}, parent="shop-v2"))
    cluster.create(
        policies,
        access_policy(
            "buyers", "shop", [{"kind": "ServiceAccount", "name": "buyer", "namespace": "buyers"}]
        ),
    )
    cluster.create(policies, access_policy("ghost", "nope", [{"kind": "TrustDomain"}]))
    writer = StatusWriter(patch_status(cluster))
    mesh = shop_mesh(ns)

    seen: list[Obj] = []

    def round_trip(objects: list[Obj] | None = None) -> tuple[int, Mesh]:
        if objects is None:
            objects = _list(cluster, routes) + _list(cluster, policies)
        seen[:] = objects
        translated = translate(
            mesh,
            [o for o in objects if o["kind"] == "HTTPRoute"],
            [o for o in objects if o["kind"] == "AccessPolicy"],
        )
        written = asyncio.run(writer.write(objects, translated.verdicts))
        return written, translated.apply(mesh)

    with caplog.at_level(logging.INFO, logger="meshca.kube.status"):
        written, applied = round_trip()
        stale = list(seen)
        # the same copies again, before a watch would bring back what was written: no
        # second write (it would only conflict)
        assert round_trip(stale)[0] == 0
    assert written == 5
    assert not [r for r in caplog.records if "not written" in r.getMessage()]
    # the good objects are applied; the bad ones are not, and change nothing else
    (split,) = applied.traffic_splits
    assert split.service == f"{ns}/shop"
    assert [(b.name, b.weight) for b in split.backends] == [("shop-v1", 90), ("shop-v2", 10)]
    (policy,) = applied.policies
    assert policy.sources == (SpiffeId.from_kubernetes("buyers", "buyer", TD),)

    def status(path: str, name: str) -> Obj:
        answer: Obj = cluster.get(f"{path}/{name}")["status"]
        return answer

    (canary,) = status(routes, "canary")["parents"]
    assert canary["controllerName"] == CONTROLLER_NAME
    assert canary["parentRef"] == {"group": "", "kind": "Service", "name": "shop", "port": 8080}
    assert _conditions(canary) == {
        "Accepted": ("True", "Accepted"),
        "ResolvedRefs": ("True", "ResolvedRefs"),
    }
    (zero,) = status(routes, "zero")["parents"]
    assert _conditions(zero)["Accepted"] == ("False", "UnsupportedValue")
    assert "the weights add up to 0" in zero["conditions"][0]["message"]
    (missing,) = status(routes, "missing")["parents"]
    assert _conditions(missing) == {
        "Accepted": ("False", "BackendNotFound"),
        "ResolvedRefs": ("False", "BackendNotFound"),
    }
    (ghost,) = status(policies, "ghost")["conditions"]
    assert (ghost["status"], ghost["reason"]) == ("False", "TargetNotFound")
    assert ghost["observedGeneration"] == 1
    (buyers,) = status(policies, "buyers")["conditions"]
    assert (buyers["status"], buyers["reason"]) == ("True", "Accepted")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3
    assert (
        f"HTTPRoute {ns}/zero not applied: spec.rules[0].backendRefs: the weights add up to 0"
        in warnings
    )
    assert any(
        f"AccessPolicy {ns}/ghost not applied: spec.targetRef: no Service 'nope'" in w
        for w in warnings
    )

    # Nothing changed: no API call, no log line.
    caplog.clear()
    before = cluster.get(f"{routes}/zero")["metadata"]["resourceVersion"]
    with caplog.at_level(logging.INFO, logger="meshca.kube.status"):
        assert round_trip()[0] == 0
    assert cluster.get(f"{routes}/zero")["metadata"]["resourceVersion"] == before
    assert not caplog.records

    # The zero route is fixed: its status follows, the transition time moves, one info line.
    zero_route = cluster.get(f"{routes}/zero")
    zero_route["spec"]["rules"][0]["backendRefs"][0]["weight"] = 1
    cluster.request("PUT", f"{routes}/zero", zero_route)
    with caplog.at_level(logging.INFO, logger="meshca.kube.status"):
        written, applied = round_trip()
    assert written == 1
    assert len(applied.traffic_splits) == 2
    (fixed,) = status(routes, "zero")["parents"]
    assert _conditions(fixed)["Accepted"] == ("True", "Accepted")
    assert fixed["conditions"][0]["observedGeneration"] == 2
    assert [r.getMessage() for r in caplog.records] == [f"HTTPRoute {ns}/zero applied again"]


def test_other_controllers_route_status_is_kept(cluster: KubeCluster, kube_namespace: str) -> None:
    """A route may also be attached to a Gateway: that controller's status entry stays."""
    ns = kube_namespace
    routes = ROUTES.format(ns=ns)
    route = http_route("shared", {"shop-v3": 1})
    route["spec"]["parentRefs"].append({"name": "edge"})
    cluster.create(routes, route)
    theirs = {
        "parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "edge"},
        "controllerName": "example.net/gateway",
        "conditions": [
            {
                "type": "Accepted",
                "status": "True",
                "reason": "Accepted",
                "message": "",
                "lastTransitionTime": "2026-01-01T00:00:00Z",
                "observedGeneration": 1,
            }
        ],
    }
    cluster.request(
        "PATCH",
        f"{routes}/shared/status",
        {"status": {"parents": [theirs]}},
        content_type="application/merge-patch+json",
    )
    objects = _list(cluster, routes)
    translated = translate(shop_mesh(ns), objects)
    assert asyncio.run(StatusWriter(patch_status(cluster)).write(objects, translated.verdicts)) == 1
    parents = cluster.get(f"{routes}/shared")["status"]["parents"]
    assert [p["controllerName"] for p in parents] == ["example.net/gateway", CONTROLLER_NAME]
    assert parents[0] == theirs
    assert _conditions(parents[1])["ResolvedRefs"] == ("False", "BackendNotFound")
    # The route drops its Service parent: meshca's entry goes, theirs stays.
    route = cluster.get(f"{routes}/shared")
    route["spec"]["parentRefs"] = [{"name": "edge"}]
    cluster.request("PUT", f"{routes}/shared", route)
    objects = _list(cluster, routes)
    translated = translate(shop_mesh(ns), objects)
    assert not translated.verdicts
    assert asyncio.run(StatusWriter(patch_status(cluster)).write(objects, translated.verdicts)) == 1
    assert cluster.get(f"{routes}/shared")["status"]["parents"] == [theirs]


def test_the_examples_in_docs_deploy_md_are_accepted_and_applied(
    cluster: KubeCluster, kube_namespaces: Callable[..., str]
) -> None:
    """Every HTTPRoute and AccessPolicy docs/deploy.md shows is valid as written (in
    namespaces of the test's own), and meshca applies it over the bookstore's services."""
    shown = [
        doc
        for block in re.findall(r"```yaml\n(.*?)```", DOCS.read_text(), re.S)
        for doc in yaml.safe_load_all(block)
        if isinstance(doc, dict) and doc.get("kind") in ("HTTPRoute", "AccessPolicy")
    ]
    assert sorted(d["kind"] for d in shown) == ["AccessPolicy", "HTTPRoute"]
    renamed = {ns: kube_namespaces(ns) for ns in {d["metadata"]["namespace"] for d in shown}}
    stored = []
    for doc in shown:
        ns = renamed[doc["metadata"]["namespace"]]
        path = (ROUTES if doc["kind"] == "HTTPRoute" else POLICIES).format(ns=ns)
        stored.append(
            cluster.request(
                "POST",
                path,
                doc | {"metadata": {**doc["metadata"], "namespace": ns}},
                params={"fieldValidation": "Strict"},
            )
        )
    document = bookstore_document()
    for section in ("workloads", "services"):
        for entry in document[section]:
            entry["namespace"] = renamed.get(entry["namespace"], entry["namespace"])
    document["services"] += [
        {
            "name": f"bookstore-{v}",
            "namespace": renamed["bookstore"],
            "address": f"127.0.1.{70 + i}",
            "ports": [14001],
            "selector": {"app": "bookstore", "version": v},
        }
        for i, v in enumerate(("v1", "v2"))
    ]
    mesh = parse_mesh({k: v for k, v in document.items() if k in ("workloads", "services")}, TD)
    translated = translate(
        mesh,
        [o for o in stored if o["kind"] == "HTTPRoute"],
        [o for o in stored if o["kind"] == "AccessPolicy"],
    )
    assert all(v.accepted for v in translated.verdicts), [v.problems() for v in translated.verdicts]
    assert len(translated.splits) == len(translated.policies) == 1
