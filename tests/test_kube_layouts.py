"""The layout of each workload from Kubernetes labels (meshca/kube/layouts.py), against a
real API server: the Pod's ``meshca.io/layout``, else its Namespace's (or Istio's
``istio.io/dataplane-mode: ambient``), else the default; a label naming no layout is one
log line and that pod alone falls back. Ambient pods are carried by their node's proxy
(``spec.nodeName``), whose identity names the node: only a pod of the configured node
proxy service account scheduled on that node can obtain it, and it buys that node's
ambient pods' keys and no other's (PERMISSION_DENIED, over real gRPC). The last test runs
``meshca serve --kubernetes --kube-node-proxy`` in-process and reads it all over ADS."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.listener.v3 import listener_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc

from meshca.attest.kube_tokens import KubeTokenVerifier, NotEntitled
from meshca.envoy.generate import generate
from meshca.envoy.model import Mesh
from meshca.kube.client import KubeApi, load_config
from meshca.kube.identity import KubeIdentityApi
from meshca.kube.layouts import node_proxy_identity
from meshca.kube.source import KubeMeshSource
from meshca.spiffe import SpiffeId, TrustDomain
from meshca.util.retry import Backoff
from meshca.xds.resources import LISTENER_TYPE
from tests.kube_harness import KubeCluster
from tests.sds_harness import bodies, open_sotw, sds_harness, secrets_of, sotw
from tests.serve_harness import (
    client_svid,
    default_config,
    make_data_dir,
    mtls_channel,
    served,
    short_tempdir,
)

pytestmark = [pytest.mark.kube, pytest.mark.timeout(120)]

TD = TrustDomain("cluster.local")
MESH = {"meshca.io/mesh": "enabled"}
LAYOUT = "meshca.io/layout"


def sid(ns: str, account: str) -> SpiffeId:
    return SpiffeId.from_kubernetes(ns, account, TD)


class Watched:
    """A running source; every mesh it handed on."""

    def __init__(self, kubeconfig: Path, node_proxy: str | None = None) -> None:
        self.meshes: list[Mesh] = []
        self.changed = asyncio.Event()
        self.source = KubeMeshSource(
            KubeApi(load_config(kubeconfig)[0]),
            TD,
            self._changed,
            debounce=0.05,
            reflector_options={"retry": Backoff(0.1, 1.0)},
            node_proxy=node_proxy,
        )

    def _changed(self, mesh: Mesh) -> None:
        self.meshes.append(mesh)
        self.changed.set()

    async def until(self, check: Callable[[Mesh], bool], what: str) -> Mesh:
        async def wait() -> Mesh:
            while True:
                for mesh in reversed(self.meshes):
                    if check(mesh):
                        return mesh
                    break  # only the newest mesh counts
                self.changed.clear()
                await self.changed.wait()

        try:
            return await asyncio.wait_for(wait(), 30)
        except TimeoutError:
            raise AssertionError(f"not within 30s: {what}") from None


@contextlib.asynccontextmanager
async def watching(kubeconfig: Path, node_proxy: str | None = None) -> AsyncIterator[Watched]:
    watched = Watched(kubeconfig, node_proxy)
    watched.source.start()
    try:
        yield watched
    finally:
        await watched.source.stop()


def pods_behind_a_service(
    kube: KubeCluster, ns: str, pods: dict[str, tuple[str, dict[str, str], str | None]]
) -> None:
    """Pods ``name -> (ip, labels, node)``, each running as service account ``name``,
    ready endpoints of Service ``app`` on port 8080."""
    for name, (ip, labels, node) in pods.items():
        kube.service_account(ns, name)
        kube.pod(ns, name, service_account=name, labels={"app": "app", **labels}, node=node, ip=ip)
    kube.service(ns, "app", {"tcp": 8080})
    kube.endpoint_slice(ns, "app", [(ip, name) for name, (ip, _, _) in pods.items()], {"tcp": 8080})


def layouts(mesh: Mesh, ns: str) -> dict[str, str | None]:
    return {w.name: w.layout for w in mesh.workloads if w.namespace == ns}


def listener_names(mesh: Mesh, identity: SpiffeId) -> set[str]:
    return set(generate(mesh, identity).resources[LISTENER_TYPE])


async def test_layout_from_pod_label_else_namespace_else_default_and_a_bad_value_is_contained(
    kube: KubeCluster, kube_namespaces: Callable[..., str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "meshca.kube")
    sidecar_ns = kube_namespaces("istio", labels={**MESH, LAYOUT: "istio-sidecar"})
    plain_ns = kube_namespaces("plain", labels=MESH)
    pods_behind_a_service(
        kube,
        sidecar_ns,
        {
            "inherits": ("10.244.1.2", {}, None),
            "own-osm": ("10.244.1.3", {LAYOUT: "osm"}, None),
            "bad": ("10.244.1.4", {LAYOUT: "sidecar-v2"}, None),
        },
    )
    pods_behind_a_service(kube, plain_ns, {"plain": ("10.244.2.2", {}, None)})
    async with watching(kube.kubeconfig) as watched:
        mesh = await watched.source.complete()
        assert layouts(mesh, sidecar_ns) == {
            "inherits": "istio-sidecar",
            "own-osm": "osm",
            "bad": "istio-sidecar",  # the bad pod label is skipped: the namespace's is used
        }
        assert layouts(mesh, plain_ns) == {"plain": None}  # the server's default
        # the generated configuration follows: Istio's listeners, OSM's, OSM's by default
        assert "virtualOutbound" in listener_names(mesh, sid(sidecar_ns, "inherits"))
        assert "virtualOutbound" in listener_names(mesh, sid(sidecar_ns, "bad"))
        assert "outbound-listener" in listener_names(mesh, sid(sidecar_ns, "own-osm"))
        assert "outbound-listener" in listener_names(mesh, sid(plain_ns, "plain"))
        bad = [r.getMessage() for r in caplog.records if "sidecar-v2" in r.getMessage()]
        assert bad == [
            f"Pod {sidecar_ns}/bad: label {LAYOUT}='sidecar-v2' is not one of osm, "
            "istio-sidecar, ambient; ignored"
        ]

        # the namespace's label changes: its pods' proxies are generated again, and the
        # pod with its own label keeps it; Istio's ambient label is understood
        kube.patch(
            f"/api/v1/namespaces/{sidecar_ns}",
            {"metadata": {"labels": {LAYOUT: None, "istio.io/dataplane-mode": "ambient"}}},
        )
        mesh = await watched.until(
            lambda m: layouts(m, sidecar_ns).get("inherits") == "ambient", "ambient namespace"
        )
        assert layouts(mesh, sidecar_ns)["own-osm"] == "osm"
        assert "outbound-listener" in listener_names(mesh, sid(sidecar_ns, "own-osm"))

        # a namespace label naming no layout: said once, its pods keep the default
        for change in ({LAYOUT: "nope"}, {"unrelated": "1"}, {"unrelated": "2"}):
            builds = watched.source.builds
            kube.patch(f"/api/v1/namespaces/{plain_ns}", {"metadata": {"labels": change}})
            for _ in range(300):  # each change is one more rebuild
                if watched.source.builds > builds:
                    break
                await asyncio.sleep(0.05)
            assert watched.source.builds > builds
        assert layouts(watched.meshes[-1], plain_ns) == {"plain": None}
        nope = [r for r in caplog.records if "'nope'" in r.getMessage()]
        assert len(nope) == 1, [r.getMessage() for r in nope]


async def test_an_ambient_node_proxy_gets_only_its_own_nodes_pods_keys(
    kube: KubeCluster, kube_namespaces: Callable[..., str], tmp_path: Path
) -> None:
    ns = kube_namespaces("shop", labels={**MESH, "istio.io/dataplane-mode": "ambient"})
    proxies_ns = kube_namespaces("istio-system")
    node_proxy = f"{proxies_ns}/ztunnel"
    pods_behind_a_service(
        kube,
        ns,
        {
            "web": ("10.244.3.2", {}, "node-a"),
            # labels claiming node-a change nothing: the node is spec.nodeName
            "db": ("10.244.4.2", {"kubernetes.io/hostname": "node-a"}, "node-b"),
            "sidecar": ("10.244.4.3", {LAYOUT: "osm"}, "node-b"),
        },
    )
    node_a = node_proxy_identity(TD, node_proxy, "node-a")
    node_b = node_proxy_identity(TD, node_proxy, "node-b")
    web, db, sidecar = sid(ns, "web"), sid(ns, "db"), sid(ns, "sidecar")
    async with watching(kube.kubeconfig, node_proxy) as watched:
        mesh = await watched.source.complete()
    assert {(n.name, n.identity) for n in mesh.nodes} == {("node-a", node_a), ("node-b", node_b)}
    assert mesh.node_proxies_of(web) == {node_a}
    assert mesh.node_proxies_of(db) == {node_b}
    assert mesh.node_proxies_of(sidecar) == frozenset()  # not ambient: no node proxy holds it

    # the node identity: only a node proxy pod on that node may obtain it
    kube.service_account(proxies_ns, "ztunnel")
    kube.service_account(proxies_ns, "impostor")
    proxy_pod = kube.pod(proxies_ns, "ztunnel-a", service_account="ztunnel", node="node-a")
    impostor = kube.pod(
        proxies_ns,
        "impostor",
        service_account="impostor",
        node="node-b",
        labels={"app": "ztunnel", "kubernetes.io/hostname": "node-b"},
    )
    verifier = KubeTokenVerifier(
        KubeIdentityApi(KubeApi(load_config(kube.kubeconfig)[0])), TD, node_proxy=node_proxy
    )
    try:
        caller = await verifier.verify(kube.token(proxies_ns, "ztunnel", pod=proxy_pod))
        await verifier.authorize(caller, node_a)
        with pytest.raises(NotEntitled, match="node-b"):
            await verifier.authorize(caller, node_b)
        other = await verifier.verify(kube.token(proxies_ns, "impostor", pod=impostor))
        with pytest.raises(NotEntitled):
            await verifier.authorize(other, node_b)
    finally:
        await verifier.close()

    # node-a's proxy, authenticated as node-a, gets web's key and is refused db's
    async with sds_harness(tmp_path, mesh=mesh) as h:
        stub = h.stub(h.mtls_channel(node_a))
        answer = await stub.FetchSecrets(sotw([str(web)]), timeout=10)
        assert str(web) in secrets_of(answer)
        for refused in (db, sidecar):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.FetchSecrets(sotw([str(refused)]), timeout=10)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, info.value.details()
            assert h.store.cached(refused) is None


# --- over ADS, from meshca serve --kubernetes --kube-node-proxy ----------------------------


def listeners_of(response: Any) -> set[str]:
    return {listener_pb2.Listener.FromString(b.value).name for b in bodies(response)}


async def test_serve_kubernetes_serves_each_pods_layout_over_ads_and_ambient_keys_by_node(
    kube: KubeCluster, kube_namespaces: Callable[..., str]
) -> None:
    ns = kube_namespaces("istio", labels={**MESH, LAYOUT: "istio-sidecar"})
    ambient_ns = kube_namespaces("ambient", labels={**MESH, "istio.io/dataplane-mode": "ambient"})
    proxies_ns = kube_namespaces("istio-system")
    node_proxy = f"{proxies_ns}/ztunnel"
    pods_behind_a_service(
        kube, ns, {"a": ("10.244.5.2", {}, None), "b": ("10.244.5.3", {LAYOUT: "osm"}, None)}
    )
    pods_behind_a_service(
        kube,
        ambient_ns,
        {"web": ("10.244.6.2", {}, "node-a"), "db": ("10.244.6.3", {}, "node-b")},
    )
    with short_tempdir() as root:
        make_data_dir(root)
        config = default_config(
            root, kubernetes=True, kubeconfig=kube.kubeconfig, kube_node_proxy=node_proxy
        )
        async with served(config) as server, contextlib.AsyncExitStack() as channels:

            def channel_as(identity: SpiffeId) -> Any:
                channel = mtls_channel(server, client_svid(server, identity))
                channels.push_async_callback(channel.close)
                return channel

            async def lds(identity: SpiffeId) -> tuple[Any, set[str]]:
                channel = channel_as(identity)
                stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
                stream = await open_sotw(
                    stub, sotw([], type_url=LISTENER_TYPE, node_id=str(identity))
                )
                return stream, listeners_of(await stream.recv())

            a_stream, a_listeners = await lds(sid(ns, "a"))
            assert {"virtualOutbound", "virtualInbound"} <= a_listeners  # the namespace's
            _, b_listeners = await lds(sid(ns, "b"))
            assert "outbound-listener" in b_listeners  # the pod's own label

            # the namespace's label changes: a's proxy receives OSM's listeners
            kube.patch(f"/api/v1/namespaces/{ns}", {"metadata": {"labels": {LAYOUT: "osm"}}})
            pushed = await a_stream.recv(timeout=30)
            assert "outbound-listener" in listeners_of(pushed)
            assert "virtualOutbound" not in listeners_of(pushed)

            # node-a's proxy, as node-a's identity: web's key, never db's (node-b)
            node_a = node_proxy_identity(TD, node_proxy, "node-a")
            channel = channel_as(node_a)
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            web, db = sid(ambient_ns, "web"), sid(ambient_ns, "db")
            own = await open_sotw(stub, sotw([str(web)], node_id=str(node_a)))
            assert str(web) in secrets_of(await own.recv())
            with pytest.raises(grpc.aio.AioRpcError) as info:
                other = await open_sotw(stub, sotw([str(db)], node_id=str(node_a)))
                await other.recv()
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, info.value.details()
