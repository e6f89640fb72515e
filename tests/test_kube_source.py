"""The mesh from a real Kubernetes API server (meshca/kube/source.py): what a Service, its
EndpointSlices and Pods become in the mesh model, that the first mesh waits for every
kind's list, that changes arrive, and that an API server restart with a watch gone
stale (410) loses no update and never yields half a mesh."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from meshca.envoy.model import Mesh, WorkloadPort
from meshca.kube.client import KubeApi, load_config
from meshca.kube.source import KubeMeshSource
from meshca.spiffe import SpiffeId, TrustDomain
from meshca.util.retry import Backoff
from tests.kube_harness import KubeCluster, KubeError, Relay

pytestmark = [pytest.mark.kube, pytest.mark.timeout(120)]

TD = TrustDomain("cluster.local")
FAST = {"retry": Backoff(0.1, 1.0)}


class Watched:
    """A running source and every mesh it handed on, in order."""

    def __init__(self, kubeconfig: Path) -> None:
        config, _ = load_config(kubeconfig)
        self.meshes: list[Mesh] = []
        self.changed = asyncio.Event()
        self.source = KubeMeshSource(
            KubeApi(config), TD, self._changed, debounce=0.05, reflector_options=FAST
        )

    def _changed(self, mesh: Mesh) -> None:
        self.meshes.append(mesh)
        self.changed.set()

    async def until(self, check: Callable[[Mesh], bool], what: str, timeout: float = 30) -> Mesh:
        """The first mesh handed on (already, or from now) for which ``check`` holds."""

        async def wait() -> Mesh:
            seen = 0
            while True:
                for mesh in self.meshes[seen:]:
                    if check(mesh):
                        return mesh
                seen = len(self.meshes)
                self.changed.clear()
                await self.changed.wait()

        try:
            return await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"not within {timeout:.0f}s: {what}") from None


@contextlib.asynccontextmanager
async def watching(kubeconfig: Path) -> AsyncIterator[Watched]:
    watched = Watched(kubeconfig)
    watched.source.start()
    try:
        yield watched
    finally:
        await watched.source.stop()


def service_names(mesh: Mesh, namespace: str) -> set[str]:
    return {s.name for s in mesh.services if s.namespace == namespace}


def endpoint_addresses(mesh: Mesh, namespace: str, name: str) -> set[str]:
    service = mesh.service(namespace, name)
    return {w.address for w in mesh.endpoints(service)} if service else set()


def web(kube: KubeCluster, ns: str, name: str = "web", pods: int = 1, subnet: int = 1) -> None:
    """Service ``name`` (http 8080 -> 18080) with ``pods`` ready pods in its slice."""
    kube.service_account(ns, name)
    kube.service(ns, name, {"http": 8080})
    endpoints: list[tuple[str, str | None]] = []
    for i in range(pods):
        ip = f"10.244.{subnet}.{i + 2}"
        kube.pod(ns, f"{name}-{i}", service_account=name, labels={"app": name}, ip=ip)
        endpoints.append((ip, f"{name}-{i}"))
    kube.endpoint_slice(ns, name, endpoints, {"http": 18080})


async def test_services_slices_and_pods_become_the_mesh_model(
    kube: KubeCluster, kube_namespace: str, kube_namespaces: Callable[..., str]
) -> None:
    ns = kube_namespace
    outside = kube_namespaces("outside")  # not labelled meshca.io/mesh=enabled
    web(kube, ns, pods=2)
    kube.pod(ns, "web-x", service_account="web", labels={"app": "web"}, ip="10.244.1.9")
    kube.service(ns, "db", {"tcp-db": 5432})  # a tcp port, no endpoints yet
    kube.create(
        f"/api/v1/namespaces/{ns}/services",
        {"metadata": {"name": "headless"}, "spec": {"clusterIP": "None", "ports": [{"port": 80}]}},
    )
    web(kube, outside, name="hidden", subnet=2)

    async with watching(kube.kubeconfig) as watched:
        mesh = await watched.until(lambda m: len(endpoint_addresses(m, ns, "web")) == 2, "web")

    assert service_names(mesh, ns) == {"web", "db"}  # not headless; nothing of ``outside``
    assert not service_names(mesh, outside)
    service = mesh.service(ns, "web")
    assert service is not None
    assert service.address == kube.get(f"/api/v1/namespaces/{ns}/services/web")["spec"]["clusterIP"]
    [port] = service.ports
    assert (port.port, port.protocol, port.target) == (8080, "http", 18080)
    db = mesh.service(ns, "db")
    assert db is not None and db.ports[0].protocol == "tcp"
    workloads = mesh.endpoints(service)
    assert [w.name for w in workloads] == ["web-0", "web-1"]  # web-x: in no slice
    assert {w.address for w in workloads} == {"10.244.1.2", "10.244.1.3"}
    assert all(w.ports == (WorkloadPort(18080, "http"),) for w in workloads)
    assert mesh.identity_of(workloads[0]) == SpiffeId.parse(
        f"spiffe://cluster.local/ns/{ns}/sa/web"
    )


async def test_no_mesh_until_every_kind_is_listed(
    kube: KubeCluster, kube_namespace: str, tmp_path: Path
) -> None:
    """A client allowed to list everything but Pods never hands on a mesh (it would name
    no workload); once RBAC lets it list Pods, the first mesh is whole."""
    ns = kube_namespace
    web(kube, ns)
    kube.service_account(ns, "meshca")
    rules = [
        {"apiGroups": [""], "resources": ["namespaces", "services"], "verbs": ["list", "watch"]},
        {
            "apiGroups": ["discovery.k8s.io"],
            "resources": ["endpointslices"],
            "verbs": ["list", "watch"],
        },
        {
            "apiGroups": ["gateway.networking.k8s.io", "meshca.io"],
            "resources": ["httproutes", "accesspolicies"],
            "verbs": ["list", "watch"],
        },
    ]
    role = f"meshca-test-{ns}"
    kube.create(
        "/apis/rbac.authorization.k8s.io/v1/clusterroles",
        {"metadata": {"name": role}, "rules": rules},
    )
    kube.create(
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
        {
            "metadata": {"name": role},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": role,
            },
            "subjects": [{"kind": "ServiceAccount", "name": "meshca", "namespace": ns}],
        },
    )
    try:
        token = kube.token(ns, "meshca", audience="https://kubernetes.default.svc.cluster.local")
        kubeconfig = kube.kubeconfig_for_token(tmp_path / "meshca.kubeconfig", token)
        async with watching(kubeconfig) as watched:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(watched.source.complete(), 3)
            assert watched.meshes == []
            assert watched.source.reflectors["Service"].synced.is_set()
            assert not watched.source.reflectors["Pod"].synced.is_set()

            kube.patch(
                f"/apis/rbac.authorization.k8s.io/v1/clusterroles/{role}",
                {
                    "rules": [
                        *rules,
                        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
                    ]
                },
            )
            await asyncio.wait_for(watched.source.complete(), 30)
            assert endpoint_addresses(watched.meshes[0], ns, "web") == {"10.244.1.2"}
    finally:
        for kind in ("clusterrolebindings", "clusterroles"):
            with contextlib.suppress(KubeError):
                kube.request("DELETE", f"/apis/rbac.authorization.k8s.io/v1/{kind}/{role}")


async def test_endpoints_and_services_follow_the_api(
    kube: KubeCluster, kube_namespace: str
) -> None:
    ns = kube_namespace
    web(kube, ns)
    web(kube, ns, name="api", subnet=3)
    async with watching(kube.kubeconfig) as watched:
        await watched.until(lambda m: service_names(m, ns) == {"web", "api"}, "both services")

        kube.pod(ns, "web-1", service_account="web", labels={"app": "web"}, ip="10.244.1.3")
        kube.patch(
            f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices/web-slice",
            {"endpoints": [
                {"addresses": ["10.244.1.2"], "targetRef": {"kind": "Pod", "name": "web-0"}},
                {"addresses": ["10.244.1.3"], "targetRef": {"kind": "Pod", "name": "web-1"}},
            ]},
        )  # fmt: skip
        await watched.until(
            lambda m: endpoint_addresses(m, ns, "web") == {"10.244.1.2", "10.244.1.3"},
            "the added endpoint",
        )
        kube.patch(
            f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices/web-slice",
            {"endpoints": [
                {"addresses": ["10.244.1.2"], "conditions": {"ready": False},
                 "targetRef": {"kind": "Pod", "name": "web-0"}},
                {"addresses": ["10.244.1.3"], "targetRef": {"kind": "Pod", "name": "web-1"}},
            ]},
        )  # fmt: skip
        await watched.until(
            lambda m: endpoint_addresses(m, ns, "web") == {"10.244.1.3"}, "the unready one gone"
        )
        kube.delete(f"/api/v1/namespaces/{ns}/services/api")
        mesh = await watched.until(lambda m: service_names(m, ns) == {"web"}, "api deleted")
        assert mesh.workload(ns, "api-0") is None  # its pod backs nothing any more

        kube.patch(f"/api/v1/namespaces/{ns}", {"metadata": {"labels": {"meshca.io/mesh": None}}})
        await watched.until(lambda m: not service_names(m, ns), "the namespace left the mesh")
    # Rebuilds are debounced and equal meshes are not handed on.
    assert len(watched.meshes) <= 6


async def test_a_restart_with_an_expired_watch_loses_no_update_and_no_half_mesh(
    kube: KubeCluster, kube_namespace: str, tmp_path: Path
) -> None:
    """meshca is cut off from the API server; meanwhile a Service is deleted, an endpoint
    added and the API server restarted (its watch cache starts afresh, so meshca's
    resourceVersion is too old: 410). Back in touch, meshca lists again: it has every
    change, and no mesh it ever handed on lacked a Service that was never deleted."""
    ns = kube_namespace
    names = [f"svc-{i}" for i in range(5)]
    for i, name in enumerate(names):
        web(kube, ns, name=name, subnet=10 + i)
    relay = Relay(kube.port)
    try:
        async with watching(relay.kubeconfig(kube, tmp_path / "relay.kubeconfig")) as watched:
            await watched.until(lambda m: service_names(m, ns) == set(names), "every service")
            relay.cut()
            kube.delete(f"/api/v1/namespaces/{ns}/services/svc-0")
            kube.pod(
                ns, "svc-1-9", service_account="svc-1", labels={"app": "svc-1"}, ip="10.244.11.9"
            )
            kube.patch(
                f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices/svc-1-slice",
                {"endpoints": [
                    {"addresses": ["10.244.11.2"], "targetRef": {"kind": "Pod", "name": "svc-1-0"}},
                    {"addresses": ["10.244.11.9"], "targetRef": {"kind": "Pod", "name": "svc-1-9"}},
                ]},
            )  # fmt: skip
            kube.restart_apiserver()
            relay.restore()
            await watched.until(
                lambda m: (
                    service_names(m, ns) == set(names[1:])
                    and endpoint_addresses(m, ns, "svc-1") == {"10.244.11.2", "10.244.11.9"}
                ),
                "both changes made while cut off",
                timeout=60,
            )
            expired = sum(r.expirations for r in watched.source.reflectors.values())
            assert expired > 0, "no watch was answered 410 Gone: the test did not test a re-list"
            for mesh in watched.meshes:
                assert set(names[1:]) <= service_names(mesh, ns), "a mesh with services missing"
    finally:
        relay.close()


async def test_a_port_meshca_cannot_use_is_left_out_alone_with_one_log_line(
    kube: KubeCluster, kube_namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A Service port the proxy itself listens on (15001) is left out of the mesh, said
    once in the log however often the mesh is rebuilt; the Service's other ports and every
    other Service are served as usual."""
    ns = kube_namespace
    web(kube, ns)
    kube.service_account(ns, "odd")
    kube.service(ns, "odd", {"http": 8080, "tcp-capture": 15001})
    kube.pod(ns, "odd-0", service_account="odd", labels={"app": "odd"}, ip="10.244.4.2")
    kube.endpoint_slice(ns, "odd", [("10.244.4.2", "odd-0")], {"http": 8080, "tcp-capture": 15001})
    with caplog.at_level(logging.WARNING, logger="meshca.kube"):
        async with watching(kube.kubeconfig) as watched:
            mesh = await watched.until(
                lambda m: service_names(m, ns) == {"web", "odd"}, "both services"
            )
            kube.pod(ns, "web-1", service_account="web", labels={"app": "web"}, ip="10.244.1.3")
            kube.patch(
                f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices/web-slice",
                slice_of_web(["10.244.1.2", "10.244.1.3"]),
            )
            await watched.until(lambda m: len(endpoint_addresses(m, ns, "web")) == 2, "rebuilt")
    odd = mesh.service(ns, "odd")
    assert odd is not None and [p.port for p in odd.ports] == [8080]
    assert endpoint_addresses(mesh, ns, "odd") == {"10.244.4.2"}
    said = [r.getMessage() for r in caplog.records if "15001" in r.getMessage()]
    assert said == [
        f"Service {ns}/odd port 15001 is left out: it is reserved for the outbound capture listener"
    ]


def slice_of_web(addresses: list[str]) -> dict[str, object]:
    return {
        "endpoints": [
            {"addresses": [a], "targetRef": {"kind": "Pod", "name": f"web-{i}"}}
            for i, a in enumerate(addresses)
        ]
    }
