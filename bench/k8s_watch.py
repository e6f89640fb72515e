"""The mesh from a real Kubernetes API server at scale, against the same mesh from a file.

Run: ``.venv/bin/python bench/k8s_watch.py [--services 1000] [--replicas 10] [--proxies 1000]``

The API server is the tests' (etcd + kube-apiserver on loopback, ``tests/kube_harness.py``;
``make kube`` builds it). It is filled with ``bench/xds_scale.py``'s synthetic mesh, as
Kubernetes objects: ``--services`` Services in namespaces of 10 (labelled
``meshca.io/mesh=enabled``), ``--replicas`` Pods each with one EndpointSlice per
Service, and an AccessPolicy per Service admitting ``--callers`` other service accounts.
No traffic splits (HTTPRoutes): the figures are about endpoints.

meshca's source (``meshca/kube/source.py``) then watches it, in this process, feeding the
ADS engine that ``--proxies`` Envoy-like clients (one identity each, mTLS, the client of
``bench/xds_scale.py``) are connected to. Figures:

  create_s              filling the API server (threads of plain HTTP requests)
  complete_s            the source's start to its first complete mesh (every list, the
                        build); relist_s the same for a second source started while the
                        first runs (what a re-list after 410 Gone costs), build_s one
                        build from the caches alone
  source_rss_mib        the process's memory growth from the source's start to its first
                        complete mesh (caches and mesh), and per pod
  k8s_change_to_ack_s   an EndpointSlice gains a ready endpoint (a PATCH): until every
                        ADS stream has ACKed (watch event, 0.1 s debounce, rebuild,
                        generation, push); k8s_proxies_pushed how many were sent anything
  file_change_to_ack_s  the same change written to a mesh file holding the same mesh,
                        through the mesh file's reload (read, parse, validate), in the
                        same run, to the same proxies; ratio_k8s_vs_file
The goal (issue 14): under 1 s from the EndpointSlice change to the last ACK with 1,000
connected proxy streams. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import requests
import yaml
from envoy.service.discovery.v3 import ads_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from xds_scale import ProxyClient, rss_bytes, synthetic_mesh

from meshca.backends.local import init_local_ca
from meshca.envoy.mesh import Mesh
from meshca.issuer import Issuer
from meshca.issuer.keys import private_key_pem
from meshca.kube.client import KubeApi, load_config
from meshca.kube.source import KubeMeshSource
from meshca.sds.secrets import SecretSource
from meshca.serve.ads import MeshAds
from meshca.serve.mesh_reload import MeshFile
from meshca.spiffe import SpiffeId, TrustDomain
from meshca.store import SecretStore
from meshca.xds.ads import AggregatedDiscoveryServicer, add_ads_to_server
from meshca.xds.auth import CallerAuthenticator
from tests.kube_harness import KubeCluster, missing_binaries, running_cluster
from tests.kube_policy_harness import install_crds

TD = TrustDomain("cluster.local")
PORT_NAMES = {"http": "http", "grpc": "grpc", "tcp": "tcp"}


# --- filling the API server ----------------------------------------------------------------


class Poster:
    """POSTs from a pool of threads, one HTTP session each (admin token, the cluster's CA)."""

    def __init__(self, cluster: KubeCluster, threads: int = 16) -> None:
        self.cluster = cluster
        self.local = threading.local()
        self.pool = ThreadPoolExecutor(threads)

    def _session(self) -> requests.Session:
        session = getattr(self.local, "session", None)
        if session is None:
            session = self.local.session = requests.Session()
            session.trust_env = False
            session.verify = str(self.cluster.ca_file)
            session.headers["Authorization"] = f"Bearer {self.cluster.admin_token}"
        return session

    def _post(self, path: str, body: Mapping[str, Any]) -> None:
        answer = self._session().post(self.cluster.url + path, json=body, timeout=60)
        if answer.status_code >= 300:
            raise SystemExit(f"POST {path}: {answer.status_code} {answer.text[:300]}")

    def all(self, posts: list[tuple[str, Mapping[str, Any]]]) -> None:
        for future in [self.pool.submit(self._post, p, b) for p, b in posts]:
            future.result()


def kube_objects(document: Mapping[str, Any]) -> list[list[tuple[str, Mapping[str, Any]]]]:
    """The synthetic mesh as API objects, in waves that may each be posted in parallel."""
    namespaces = sorted({s["namespace"] for s in document["services"]})
    waves: list[list[tuple[str, Mapping[str, Any]]]] = [
        [
            (
                "/api/v1/namespaces",
                {"metadata": {"name": ns, "labels": {"meshca.io/mesh": "enabled"}}},
            )
            for ns in namespaces
        ],
        [],
        [],
    ]
    accounts = {(w["namespace"], w["service_account"]) for w in document["workloads"]}
    accounts |= {(ns, "default") for ns in namespaces}
    for ns, account in sorted(accounts):
        waves[1].append(
            (f"/api/v1/namespaces/{ns}/serviceaccounts", {"metadata": {"name": account}})
        )
    behind: dict[str, list[Mapping[str, Any]]] = {}
    for workload in document["workloads"]:
        ns = workload["namespace"]
        behind.setdefault(f"{ns}/{workload['labels']['app']}", []).append(workload)
        waves[2].append(
            (
                f"/api/v1/namespaces/{ns}/pods",
                {
                    "metadata": {"name": workload["name"], "labels": workload["labels"]},
                    "spec": {
                        "serviceAccountName": workload["service_account"],
                        "automountServiceAccountToken": False,
                        "containers": [{"name": "app", "image": "registry.invalid/app:1"}],
                    },
                },
            )
        )
    for service in document["services"]:
        ns, name = service["namespace"], service["name"]
        [port] = service["ports"]
        waves[2].append(
            (
                f"/api/v1/namespaces/{ns}/services",
                {
                    "metadata": {"name": name},
                    "spec": {
                        "selector": service["selector"],
                        "ports": [{"name": PORT_NAMES[port["protocol"]], "port": port["port"]}],
                    },
                },
            )
        )
        waves[2].append(slice_post(ns, name, behind.get(f"{ns}/{name}", []), port))
    for policy in document["access"]["policies"]:
        ns, name = policy["service"].split("/")
        sources = [{"kind": "ServiceAccount", "namespace": f.split("/")[0], "name": f.split("/")[1]}
                   for f in policy["from"]]  # fmt: skip
        waves[2].append(
            (
                f"/apis/meshca.io/v1alpha1/namespaces/{ns}/accesspolicies",
                {
                    "apiVersion": "meshca.io/v1alpha1",
                    "kind": "AccessPolicy",
                    "metadata": {"name": name},
                    "spec": {"targetRef": {"name": name}, "from": sources},
                },
            )
        )
    return waves


def slice_body(
    ns: str, service: str, workloads: list[Mapping[str, Any]], port: Mapping[str, Any]
) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{service}-slice",
            "namespace": ns,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "endpoints": [
            {
                "addresses": [w["address"]],
                "conditions": {"ready": True},
                "targetRef": {"kind": "Pod", "name": w["name"]},
            }
            for w in workloads
        ],
        "ports": [{"name": PORT_NAMES[port["protocol"]], "port": port["port"]}],
    }


def slice_post(
    ns: str, service: str, workloads: list[Mapping[str, Any]], port: Mapping[str, Any]
) -> tuple[str, Mapping[str, Any]]:
    return (
        f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices",
        slice_body(ns, service, workloads, port),
    )


# --- the same mesh as a file ---------------------------------------------------------------


def mesh_document(mesh: Mesh) -> dict[str, Any]:
    """A mesh file holding exactly ``mesh`` (services, workloads, access policies)."""
    return {
        "workloads": [
            {
                "name": w.name,
                "namespace": w.namespace,
                "service_account": w.service_account,
                "address": w.address,
                "ports": [{"port": p.port, "protocol": p.protocol} for p in w.ports],
                "labels": dict(w.labels),
            }
            for w in mesh.workloads
        ],
        "services": [
            {
                "name": s.name,
                "namespace": s.namespace,
                "address": s.address,
                "ports": [
                    {"port": p.port, "protocol": p.protocol}
                    | ({"target_port": p.target_port} if p.target_port is not None else {})
                    for p in s.ports
                ],
                "selector": dict(s.selector or ()),
            }
            for s in mesh.services
        ],
        "access": {
            "policies": [
                {"service": p.service, "from": [str(i) for i in p.sources]} for p in mesh.policies
            ]
        },
    }


def yaml_text(document: Mapping[str, Any]) -> str:
    """YAML without aliases (a mesh file refuses them): no object is shared after a copy
    through JSON."""
    return yaml.safe_dump(json.loads(json.dumps(document)), sort_keys=False)


# --- ADS: the engine and Envoy-like clients --------------------------------------------------


class Serving:
    """An ADS server over ``mesh()`` with ``count`` connected clients, one identity each."""

    def __init__(self, mesh: Callable[[], Mesh]) -> None:
        self.mesh = mesh
        with tempfile.TemporaryDirectory() as data:
            self.ca = init_local_ca(Path(data), TD)
        self.issuer = Issuer(self.ca.authority())
        self.secrets = SecretSource(
            SecretStore(self.issuer), lambda ns, svc: self.mesh().service_identities(ns, svc)
        )
        self.ads = MeshAds(mesh, self.secrets)
        self.server = grpc.aio.server()
        self.channels: list[grpc.aio.Channel] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.clients: list[ProxyClient] = []

    async def start(self, count: int) -> float:
        add_ads_to_server(
            AggregatedDiscoveryServicer(self.ads.engine, CallerAuthenticator(TD)), self.server
        )
        svid = self.issuer.issue(
            SpiffeId.from_kubernetes("meshca", "meshca", TD), dns_names=("localhost",)
        )
        assert svid.private_key is not None
        bundle = self.ca.bundle.pem()
        port = self.server.add_secure_port(
            "127.0.0.1:0",
            grpc.ssl_server_credentials(
                [(private_key_pem(svid.private_key), svid.chain_pem())],
                root_certificates=bundle,
                require_client_auth=True,
            ),
        )
        await self.server.start()
        mesh = self.mesh()
        seen: dict[SpiffeId, str] = {}
        for workload in mesh.workloads:
            seen.setdefault(mesh.identity_of(workload), f"{workload.namespace}/{workload.name}")
        self.clients = [ProxyClient(i, w) for i, w in list(seen.items())[:count]]
        for client in self.clients:
            client_svid = self.issuer.issue(client.identity)
            assert client_svid.private_key is not None
            channel = grpc.aio.secure_channel(
                f"127.0.0.1:{port}",
                grpc.ssl_channel_credentials(
                    bundle, private_key_pem(client_svid.private_key), client_svid.chain_pem()
                ),
                options=[("grpc.ssl_target_name_override", "localhost")],
            )
            self.channels.append(channel)
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            self.tasks.append(asyncio.create_task(client.run(stub)))
        start = time.perf_counter()
        while len(self.ads.engine.streams()) < len(self.clients) or self.ads.engine.unsettled():
            await asyncio.sleep(0.05)
            if failed := [t for t in self.tasks if t.done()]:
                raise SystemExit(f"an ADS client stopped: {failed[0].exception()}")
            if time.perf_counter() - start > 600:
                raise SystemExit("clients did not settle within 600 s")
        return time.perf_counter() - start

    def responses(self) -> dict[int, int]:
        return {id(c): c.responses for c in self.clients}

    def pushed_since(self, before: dict[int, int]) -> int:
        return sum(1 for c in self.clients if c.responses != before[id(c)])

    async def settled(self) -> None:
        await asyncio.sleep(0)
        unsettled = await self.ads.engine.wait_settled(300)
        if unsettled:
            raise SystemExit(f"{len(unsettled)} streams did not ACK within 300 s")

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for channel in self.channels:
            await channel.close(None)
        await self.server.stop(grace=None)
        self.secrets.close()


# --- the run -----------------------------------------------------------------------------


class Current:
    """The mesh ADS serves: a new one wakes the ADS streams, as the server's
    ``_mesh_changed`` does, and whoever waits for it."""

    def __init__(self) -> None:
        self.mesh: Mesh | None = None
        self.ads: MeshAds | None = None
        self.changed = asyncio.Event()

    def set(self, mesh: Mesh) -> None:
        self.mesh = mesh
        if self.ads is not None:
            self.ads.mesh_changed()
        self.changed.set()

    def get(self) -> Mesh:
        assert self.mesh is not None
        return self.mesh


async def until(current: Current, check: Callable[[Mesh], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while current.mesh is None or not check(current.mesh):
        current.changed.clear()
        left = deadline - time.monotonic()
        if left <= 0:
            raise SystemExit("the source did not hand on the expected mesh in time")
        await asyncio.wait_for(current.changed.wait(), left)


def endpoint_count(mesh: Mesh, ns: str, name: str) -> int:
    service = mesh.service(ns, name)
    return len(mesh.endpoints(service)) if service else 0


async def measure(cluster: KubeCluster, document: dict[str, Any], proxies: int) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    config, _ = load_config(cluster.kubeconfig)
    current = Current()
    rss_before = rss_bytes()
    started = time.perf_counter()
    source = KubeMeshSource(KubeApi(config), TD, current.set)
    source.start()
    mesh = await source.complete()
    current.set(mesh)
    figures["complete_s"] = round(time.perf_counter() - started, 2)
    figures["source_rss_mib"] = round((rss_bytes() - rss_before) / 2**20, 1)
    figures["source_rss_kib_per_pod"] = round(
        (rss_bytes() - rss_before) / 1024 / max(len(document["workloads"]), 1), 2
    )
    figures["build_s"] = round(source.last_build_seconds, 3)
    figures["mesh_services"] = len(mesh.services)
    figures["mesh_workloads"] = len(mesh.workloads)
    figures["mesh_policies"] = len(mesh.policies)

    second = KubeMeshSource(KubeApi(config), TD)
    started = time.perf_counter()
    second.start()
    await second.complete()
    figures["relist_s"] = round(time.perf_counter() - started, 2)
    await second.stop()

    serving = Serving(current.get)
    current.ads = serving.ads
    figures["ads_connect_to_settled_s"] = round(await serving.start(proxies), 2)
    figures["proxies"] = len(serving.clients)

    # The change: one Service gains a ready endpoint (its pod made first, untimed).
    target = document["services"][0]
    ns, name = target["namespace"], target["name"]
    members = [w for w in document["workloads"] if w["labels"]["app"] == name]
    before_count = endpoint_count(current.get(), ns, name)
    extra = {**members[0], "name": f"{name}-extra", "address": "10.250.0.1"}
    extra_file = {**members[0], "name": f"{name}-extra2", "address": "10.250.0.2"}
    cluster.create(
        f"/api/v1/namespaces/{ns}/pods",
        {
            "metadata": {"name": extra["name"], "labels": extra["labels"]},
            "spec": {
                "serviceAccountName": extra["service_account"],
                "automountServiceAccountToken": False,
                "containers": [{"name": "app", "image": "registry.invalid/app:1"}],
            },
        },
    )
    await serving.settled()  # a new pod in no slice changes no proxy, but let it pass
    before = serving.responses()
    started = time.perf_counter()
    await asyncio.to_thread(
        cluster.request,
        "PUT",
        f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices/{name}-slice",
        slice_body(ns, name, [*members, extra], target["ports"][0]),
    )
    await until(current, lambda m: endpoint_count(m, ns, name) == before_count + 1)
    await serving.settled()
    figures["k8s_change_to_ack_s"] = round(time.perf_counter() - started, 3)
    figures["k8s_proxies_pushed"] = serving.pushed_since(before)
    await source.stop()

    # The same change through a mesh file holding the same mesh.
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "mesh.yaml"
        path.write_text(yaml_text(mesh_document(current.get())))
        mesh_file = MeshFile(path, TD, current.set)
        figures["file_mesh_equal"] = mesh_file.mesh == current.get()
        current.set(mesh_file.mesh)
        await serving.settled()
        changed = mesh_document(current.get())
        workload = next(w for w in changed["workloads"] if w["name"] == members[0]["name"])
        changed["workloads"].append(
            {**workload, "name": extra_file["name"], "address": extra_file["address"]}
        )
        text = yaml_text(changed)
        before = serving.responses()
        started = time.perf_counter()
        path.write_text(text)
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 1))
        if not mesh_file.check():
            from meshca.envoy.mesh import load_mesh

            load_mesh(path, TD)  # says why
            raise SystemExit("the mesh file was not reloaded")
        await serving.settled()
        figures["file_change_to_ack_s"] = round(time.perf_counter() - started, 3)
        figures["file_proxies_pushed"] = serving.pushed_since(before)
    figures["ratio_k8s_vs_file"] = round(
        figures["k8s_change_to_ack_s"] / max(figures["file_change_to_ack_s"], 1e-6), 2
    )
    await serving.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--replicas", type=int, default=10)
    parser.add_argument("--callers", type=int, default=5)
    parser.add_argument("--proxies", type=int, default=1000, help="connected ADS clients")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny counts: checks that it runs (make test does)"
    )
    args = parser.parse_args()
    if args.smoke:
        args.services, args.replicas, args.callers, args.proxies = 4, 2, 2, 3
    why = missing_binaries()
    if why:
        print(f"k8s_watch: not run: {why}")
        print(json.dumps({"skipped": why}))
        return
    document = synthetic_mesh(args.services, args.replicas, args.callers)
    document["traffic_splits"] = []
    load = os.getloadavg()[0]
    with running_cluster() as cluster:
        install_crds(cluster)
        poster = Poster(cluster)
        started = time.perf_counter()
        for wave in kube_objects(document):
            poster.all(wave)
        create_s = time.perf_counter() - started
        figures = {
            "services": args.services,
            "pods": len(document["workloads"]),
            "create_s": round(create_s, 1),
            **asyncio.run(measure(cluster, document, args.proxies)),
            "load_average": round(load, 1),
        }
    for key, value in figures.items():
        print(f"{key:28} {value}")
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main()
