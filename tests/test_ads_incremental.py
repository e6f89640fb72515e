"""A mesh change regenerates only the proxies whose inputs changed.

An endpoints-only change (a pod added, removed or relabelled) gives the proxies that
may reach the changed service, and those running as the changed workload's identity, a
new snapshot; every other proxy keeps the very snapshot it had (nothing regenerated,
nothing pushed). Any other change (policies, services) regenerates everyone. Whatever
the path, each proxy's snapshot is the one generating from scratch gives.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from meshca.envoy.generate import generate
from meshca.envoy.mesh import Mesh, parse_mesh
from meshca.serve.ads import ProxyKey, ProxySnapshots
from meshca.spiffe import SpiffeId, TrustDomain
from meshca.xds.resources import ENDPOINT_TYPE

TD = TrustDomain("cluster.local")


def kube_id(namespace: str, account: str) -> SpiffeId:
    return SpiffeId.from_kubernetes(namespace, account, TD)


BUYER, OTHER, WEB = kube_id("shop", "buyer"), kube_id("shop", "other"), kube_id("shop", "web")
WEB_CLUSTER = "shop/web|8080"


def workload(name: str, account: str, address: str, app: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": name, "namespace": "shop", "service_account": account, "address": address,
    }  # fmt: skip
    if app is not None:
        entry.update(ports=[8080], labels={"app": app})
    return entry


DOCUMENT: dict[str, Any] = {
    "workloads": [
        workload("buyer", "buyer", "10.0.0.1"),
        workload("other", "other", "10.0.0.2"),
        workload("web-0", "web", "10.0.1.1", "web"),
        workload("api-0", "api", "10.0.2.1", "api"),
    ],
    "services": [
        {
            "name": "web",
            "namespace": "shop",
            "address": "10.96.0.1",
            "ports": [8080],
            "selector": {"app": "web"},
        },
        {
            "name": "api",
            "namespace": "shop",
            "address": "10.96.0.2",
            "ports": [8080],
            "selector": {"app": "api"},
        },
    ],
    "access": {
        "policies": [
            {"service": "shop/web", "from": ["shop/buyer"]},
            {"service": "shop/api", "from": ["shop/other", "shop/web"]},
        ]
    },
}
PROXIES: list[ProxyKey] = [
    (BUYER, "intercept", None, None),
    (OTHER, "intercept", None, None),
    (WEB, "intercept", None, None),
    (BUYER, "intercept", None, "istio-sidecar"),
]


class Serving:
    """ProxySnapshots over a mesh that changes, as MeshAds drives it."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.mesh = parse_mesh(document, TD)
        self.snapshots = ProxySnapshots(lambda: self.mesh)
        self.all()

    def all(self) -> dict[ProxyKey, Any]:
        return {key: self.snapshots._current(key).snapshot for key in PROXIES}

    def change(self, document: dict[str, Any]) -> Any:
        self.mesh = parse_mesh(document, TD)
        return self.snapshots.forget_stale()


def addresses(snapshot: Any, cluster: str) -> set[str]:
    assignment = snapshot.get(ENDPOINT_TYPE)[cluster]
    return {
        e.endpoint.address.socket_address.address
        for group in assignment.endpoints
        for e in group.lb_endpoints
    }


def fresh(mesh: Mesh, key: ProxyKey) -> Any:
    identity, capture, name, layout = key
    return generate(mesh, identity, capture=capture, workload=name, layout=layout)


def test_an_added_endpoint_regenerates_only_the_proxies_that_reach_it_or_run_as_it() -> None:
    serving = Serving(DOCUMENT)
    before = serving.all()
    changed = copy.deepcopy(DOCUMENT)
    changed["workloads"].append(workload("web-1", "web", "10.0.1.2", "web"))
    affected = serving.change(changed)
    assert affected is not None
    after = serving.all()
    # the buyer reaches web (both its proxies); web's own proxies gained a workload
    for key in (PROXIES[0], PROXIES[3], PROXIES[2]):
        assert affected(key)
        assert after[key] is not before[key]
    assert addresses(after[PROXIES[0]], WEB_CLUSTER) == {"10.0.1.1", "10.0.1.2"}
    assert addresses(before[PROXIES[0]], WEB_CLUSTER) == {"10.0.1.1"}
    # the other proxy reaches api only: the same snapshot, the same versions
    assert not affected(PROXIES[1])
    assert after[PROXIES[1]] is before[PROXIES[1]]
    for key in PROXIES:
        assert after[key].resource_versions == fresh(serving.mesh, key).resource_versions


def _relabelled(document: dict[str, Any]) -> dict[str, Any]:
    """web-0 leaves web for api: both services' endpoints change."""
    changed = copy.deepcopy(document)
    changed["workloads"][2]["labels"] = {"app": "api"}
    return changed


def _api_gains_an_endpoint(document: dict[str, Any]) -> dict[str, Any]:
    changed = copy.deepcopy(document)
    changed["workloads"].append(workload("api-1", "api", "10.0.2.2", "api"))
    return changed


def _policy_changed(document: dict[str, Any]) -> dict[str, Any]:
    changed = copy.deepcopy(document)
    changed["access"]["policies"][0]["from"].append("shop/other")
    return changed


def _service_port_changed(document: dict[str, Any]) -> dict[str, Any]:
    changed = copy.deepcopy(document)
    changed["services"][1]["ports"] = [{"port": 8080, "protocol": "tcp"}]
    changed["workloads"][3]["ports"] = [{"port": 8080, "protocol": "tcp"}]
    return changed


@pytest.mark.parametrize(
    ("change", "incremental"),
    [
        (_relabelled, True),
        (_api_gains_an_endpoint, True),
        (_policy_changed, False),
        (_service_port_changed, False),
    ],
)
def test_every_proxy_gets_what_generating_from_scratch_gives(
    change: Any, incremental: bool
) -> None:
    serving = Serving(DOCUMENT)
    before = serving.all()
    affected = serving.change(change(DOCUMENT))
    assert (affected is not None) == incremental
    after = serving.all()
    for key in PROXIES:
        expected = fresh(serving.mesh, key)
        assert after[key].resource_versions == expected.resource_versions
        if affected is not None and not affected(key):
            assert after[key] is before[key]
        if after[key].versions != before[key].versions:
            assert affected is None or affected(key)  # a changed proxy is always woken


def test_a_change_back_and_forth_ends_where_it_started() -> None:
    serving = Serving(DOCUMENT)
    before = serving.all()
    serving.change(_relabelled(DOCUMENT))
    serving.all()
    serving.change(DOCUMENT)
    after = serving.all()
    for key in PROXIES:
        assert after[key].versions == before[key].versions


def test_a_proxy_never_generated_counts_as_affected() -> None:
    serving = Serving(DOCUMENT)
    affected = serving.change(_api_gains_an_endpoint(DOCUMENT))
    assert affected is not None
    assert affected((kube_id("shop", "newcomer"), "intercept", None, None))
