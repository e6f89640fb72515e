"""Generation cost of per-identity Envoy configuration at mesh scale.

Run: ``.venv/bin/python bench/xds_scale.py [--services 1000] [--replicas 5] [--callers 5]``

A synthetic mesh: ``--services`` services in namespaces of 10, each backed by
``--replicas`` workloads running as the service's own account (1,000 services give
5,000 workloads and 1,000 identities); 10 % of the services are TCP and 10 % gRPC, 20 %
split 80/20 between two versions; each service may be called by ``--callers`` other
identities (strict mode), so a proxy typically reaches about that many services.

Figures:
  parse_s            mesh document -> validated model (with its derived index)
  index_ms           the model's lookup index alone (built once per mesh version)
  one_proxy_*        one proxy's snapshot, strict mesh (a typical sidecar), from a mesh
                     with nothing generated yet (the first proxy after a change)
  one_wide_proxy_*   one proxy in the permissive variant: it sees every service
  all_proxies_*      a snapshot for every workload (intercept mode), all held in memory;
                     replicas of one identity share their outbound resources
  distinct_*         of those, the first workload of each identity: a generation of its own
  cache_hit_*        the other replicas, which reuse their identity's generated resources
  ack_*              push to ACK over real gRPC (mTLS, one stream per identity, a minimal
                     Envoy-like SotW client on the same event loop as the server): every
                     split's weights change as a mesh-file reload would; the time from
                     the reload (parse included) until the last stream has ACKed, and
                     how many proxies were pushed against how many configurations changed
  baseline_*         the same resources only re-serialised (deterministic bytes), the
                     floor any generator pays, measured in the same run: these machines
                     are noisy, so the ratios are what to compare
  layout_*           per sidecar layout (osm, istio-sidecar): one proxy's cold generation
                     time and bytes, the mean per proxy over 200 workloads, ratios
                     against osm
  ambient_*          one ambient node proxy serving ``--node-workloads`` workloads (one
                     identity each; the services' other replicas on other nodes): its
                     cold generation time, bytes and memory, against generating the same
                     workloads' osm sidecars in the same run; over real gRPC (mTLS as the
                     node's identity), the full push from connecting until every type and
                     all the workloads' certificates are ACKed, then a mesh change (a
                     pod scheduled on the node) until ACKed (the reload's parse of the
                     whole file included, and shown apart), and the RSS growth
Memory: ``tracemalloc`` peak for single snapshots, RSS growth for all snapshots
(tracemalloc would slow the long run several-fold). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import dataclasses
import gc
import json
import random
import tempfile
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from meshca.backends.local import init_local_ca
from meshca.envoy.ads_bootstrap import CAPTURE_METADATA, LAYOUT_METADATA, WORKLOAD_METADATA
from meshca.envoy.generate import generate
from meshca.envoy.mesh import Mesh, parse_mesh
from meshca.envoy.snapshot import Snapshot
from meshca.issuer import Issuer
from meshca.issuer.keys import private_key_pem
from meshca.sds.secrets import SecretSource
from meshca.serve.ads import MeshAds
from meshca.spiffe import SpiffeId, TrustDomain
from meshca.store import SecretStore
from meshca.xds.ads import AggregatedDiscoveryServicer, add_ads_to_server
from meshca.xds.auth import CallerAuthenticator
from meshca.xds.resources import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    SECRET_TYPE,
)

TD = TrustDomain("cluster.local")
T = TypeVar("T")


def _protocol(i: int) -> str:
    return "tcp" if i % 10 == 3 else "grpc" if i % 10 == 7 else "http"


def synthetic_mesh(services: int, replicas: int, callers: int, *, permissive: bool = False) -> Any:
    rng = random.Random(6)
    workloads: list[dict[str, Any]] = []
    service_docs: list[dict[str, Any]] = []
    splits: list[dict[str, Any]] = []
    policies: list[dict[str, Any]] = []
    identities = [(f"ns-{i // 10}", f"svc-{i}") for i in range(services)]
    for i, (namespace, name) in enumerate(identities):
        protocol = _protocol(i)
        port = 3306 if protocol == "tcp" else 9000 if protocol == "grpc" else 8080
        for r in range(replicas):
            n = i * replicas + r
            workloads.append(
                {
                    "name": f"{name}-{r}",
                    "namespace": namespace,
                    "service_account": name,
                    "address": f"10.{1 + n // 65536}.{n // 256 % 256}.{n % 256}",
                    "ports": [{"port": port, "protocol": protocol}],
                    "labels": {"app": name, "version": "v2" if r == replicas - 1 else "v1"},
                }
            )
        service_docs.append(
            {
                "name": name,
                "namespace": namespace,
                "address": f"10.96.{i // 256}.{i % 256}",
                "ports": [{"port": port, "protocol": protocol}],
                "selector": {"app": name},
            }
        )
        if i % 5 == 0 and replicas > 1:
            splits.append(
                {
                    "service": f"{namespace}/{name}",
                    "backends": [
                        {"name": "v1", "labels": {"version": "v1"}, "weight": 80},
                        {"name": "v2", "labels": {"version": "v2"}, "weight": 20},
                    ],
                }
            )
        others = [k for k in rng.sample(range(services), min(callers + 1, services)) if k != i]
        policies.append(
            {
                "service": f"{namespace}/{name}",
                "from": [f"{identities[k][0]}/{identities[k][1]}" for k in others[:callers]],
            }
        )
    access: dict[str, Any] = {"mode": "permissive"} if permissive else {"policies": policies}
    return {
        "workloads": workloads,
        "services": service_docs,
        "traffic_splits": splits,
        "access": access,
    }


def generate_all(
    mesh: Mesh, proxies: list[tuple[SpiffeId, str]]
) -> tuple[list[Snapshot], float, float, float]:
    """Every workload's snapshot: (snapshots, total seconds, seconds spent on the first
    workload of each identity, a distinct generation, and on the others, which reuse
    that identity's outbound resources: cache hits)."""
    snapshots: list[Snapshot] = []
    seen: set[SpiffeId] = set()
    distinct = hits = 0.0
    for identity, workload in proxies:
        started = time.perf_counter()
        snapshots.append(generate(mesh, identity, workload=workload))
        took = time.perf_counter() - started
        if identity in seen:
            hits += took
        else:
            seen.add(identity)
            distinct += took
    return snapshots, distinct + hits, distinct, hits


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def best_of(fn: Callable[[], T], repeat: int) -> tuple[T, float]:
    best = float("inf")
    result: T | None = None
    for _ in range(repeat):
        result, elapsed = timed(fn)
        best = min(best, elapsed)
    assert result is not None
    return result, best


def traced_peak(fn: Callable[[], T]) -> tuple[T, int, int]:
    """(result, peak bytes while building, bytes still held by the result)."""
    gc.collect()
    tracemalloc.start()
    result = fn()
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return result, peak, current


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def reserialize(snapshots: list[Snapshot]) -> int:
    total = 0
    for snapshot in snapshots:
        for by_name in snapshot.resources.values():
            for message in by_name.values():
                total += len(message.SerializeToString(deterministic=True))
    return total


def counts(snapshot: Snapshot) -> dict[str, int]:
    return {t.rsplit(".", 1)[1]: len(v) for t, v in snapshot.resources.items()}


# --- layouts: the same proxies in OSM's and Istio's layouts ------------------------------


def snapshot_bytes(snapshot: Snapshot) -> int:
    return sum(len(data) for by_name in snapshot.encoded.values() for data in by_name.values())


def layout_figures(mesh: Mesh, fresh: Callable[[Mesh], Mesh], repeat: int) -> dict[str, Any]:
    """Per layout (intercept capture): one proxy's cold generation time (best of
    ``repeat``) and its bytes, and the mean per proxy over the first 200 workloads
    generated on one mesh (shared outbound parts reused, as serving does; best of 2);
    ratios against ``osm`` from the same run."""
    from meshca.envoy.layouts import LAYOUTS as ALL_LAYOUTS

    LAYOUTS = tuple(layout for layout in ALL_LAYOUTS if layout != "ambient")
    figures: dict[str, Any] = {}
    workload = mesh.workloads[0]
    proxy = mesh.identity_of(workload)
    sample = [(mesh.identity_of(w), w.name) for w in mesh.workloads[:200]]

    def one(m: Mesh, layout: str) -> Callable[[], Snapshot]:
        return lambda: generate(m, proxy, workload=workload.name, layout=layout)

    def many_of(m: Mesh, layout: str) -> Callable[[], list[Snapshot]]:
        return lambda: [generate(m, p, workload=w, layout=layout) for p, w in sample]

    # rounds alternate the layouts, so load on a shared machine falls on each alike
    one_runs: dict[str, list[tuple[Snapshot, float]]] = {layout: [] for layout in LAYOUTS}
    many_runs: dict[str, list[tuple[list[Snapshot], float]]] = {layout: [] for layout in LAYOUTS}
    gc.collect()
    gc.disable()  # the caller holds thousands of snapshots: a full collection would land
    try:  # in whichever timing happened to trigger it
        for _ in range(repeat):
            for layout in LAYOUTS:
                one_runs[layout].append(timed(one(fresh(mesh), layout)))
        for _ in range(2):
            for layout in LAYOUTS:
                many_runs[layout].append(timed(many_of(fresh(mesh), layout)))
    finally:
        gc.enable()
    for layout in LAYOUTS:
        one_s = min(elapsed for _, elapsed in one_runs[layout])
        many, many_s = min(many_runs[layout], key=lambda run: run[1])
        key = f"layout_{layout.replace('-', '_')}"
        figures[f"{key}_one_proxy_ms"] = round(one_s * 1e3, 2)
        figures[f"{key}_one_proxy_bytes"] = snapshot_bytes(one_runs[layout][0][0])
        figures[f"{key}_per_proxy_ms"] = round(many_s / len(sample) * 1e3, 2)
        figures[f"{key}_per_proxy_bytes"] = sum(snapshot_bytes(s) for s in many) // len(sample)
    for layout in LAYOUTS[1:]:
        key = f"layout_{layout.replace('-', '_')}"
        figures[f"{key}_vs_osm_time"] = round(
            figures[f"{key}_per_proxy_ms"] / figures["layout_osm_per_proxy_ms"], 2
        )
        figures[f"{key}_vs_osm_bytes"] = round(
            figures[f"{key}_per_proxy_bytes"] / figures["layout_osm_per_proxy_bytes"], 2
        )
    return figures


# --- push to ACK: a mesh change reaching connected proxies -------------------------------


class MeshRef:
    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh


class ProxyClient:
    """A minimal SotW ADS client acting like Envoy: wildcard CDS and LDS, EDS for its
    EDS clusters, RDS for the route configurations its listeners name; ACKs everything."""

    def __init__(self, identity: SpiffeId, workload: str) -> None:
        self.identity = identity
        self.workload = workload
        self.names: dict[str, list[str]] = {EDS: [], RDS: []}
        self.nonces: dict[str, str] = {}
        self.versions: dict[str, str] = {}
        self.responses = 0

    def request(self, type_url: str) -> Any:
        return discovery_pb2.DiscoveryRequest(
            type_url=type_url,
            resource_names=self.names.get(type_url, []),
            response_nonce=self.nonces.get(type_url, ""),
            version_info=self.versions.get(type_url, ""),
        )

    def _wanted(self, response: Any) -> tuple[str, list[str]] | None:
        if response.type_url == CLUSTER_TYPE:
            clusters = [cluster_pb2.Cluster.FromString(r.value) for r in response.resources]
            return EDS, sorted(c.name for c in clusters if c.type == cluster_pb2.Cluster.EDS)
        if response.type_url == LISTENER_TYPE:
            names = set()
            for raw in response.resources:
                for chain in listener_pb2.Listener.FromString(raw.value).filter_chains:
                    for network_filter in chain.filters:
                        if network_filter.typed_config.type_url.endswith("HttpConnectionManager"):
                            manager = hcm_pb2.HttpConnectionManager()
                            network_filter.typed_config.Unpack(manager)
                            if manager.HasField("rds"):
                                names.add(manager.rds.route_config_name)
            return RDS, sorted(names)
        return None

    def first_requests(self) -> list[Any]:
        first = self.request(CLUSTER_TYPE)
        first.node.id = str(self.identity)
        first.node.metadata.fields[CAPTURE_METADATA].string_value = "intercept"
        first.node.metadata.fields[WORKLOAD_METADATA].string_value = self.workload
        return [first, self.request(LISTENER_TYPE)]

    async def run(self, stub: Any) -> None:
        call = stub.StreamAggregatedResources()
        for request in self.first_requests():
            await call.write(request)
        async for response in call:
            self.responses += 1
            self.nonces[response.type_url] = response.nonce
            self.versions[response.type_url] = response.version_info
            await call.write(self.request(response.type_url))  # ACK
            wanted = self._wanted(response)
            if wanted is not None and wanted[1] != self.names[wanted[0]]:
                self.names[wanted[0]] = wanted[1]
                await call.write(self.request(wanted[0]))


EDS = ENDPOINT_TYPE
RDS = ROUTE_TYPE


def _changed_weights(document: dict[str, Any]) -> dict[str, Any]:
    changed = copy.deepcopy(document)
    for split in changed["traffic_splits"]:
        split["backends"][0]["weight"], split["backends"][1]["weight"] = 50, 50
    return changed


@contextlib.asynccontextmanager
async def ads_server(mesh_ref: MeshRef) -> AsyncIterator[tuple[MeshAds, Any]]:
    """meshca's ADS (with the Secret source, node proxies authorized as the mesh says)
    on mTLS loopback, and ``connect(client)`` -> (channel, task) for a client."""
    with tempfile.TemporaryDirectory() as data:
        ca = init_local_ca(Path(data), TD)
    issuer = Issuer(ca.authority())
    store = SecretStore(issuer)
    secrets = SecretSource(
        store,
        lambda ns, svc: mesh_ref.mesh.service_identities(ns, svc),
        node_proxies=lambda identity: mesh_ref.mesh.node_proxies_of(identity),
    )
    ads = MeshAds(lambda: mesh_ref.mesh, secrets)
    server = grpc.aio.server()
    add_ads_to_server(AggregatedDiscoveryServicer(ads.engine, CallerAuthenticator(TD)), server)
    server_svid = issuer.issue(
        SpiffeId.from_kubernetes("meshca", "meshca", TD), dns_names=("localhost",)
    )
    assert server_svid.private_key is not None
    bundle = ca.bundle.pem()
    port = server.add_secure_port(
        "127.0.0.1:0",
        grpc.ssl_server_credentials(
            [(private_key_pem(server_svid.private_key), server_svid.chain_pem())],
            root_certificates=bundle,
            require_client_auth=True,
        ),
    )
    await server.start()

    def connect(client: ProxyClient) -> tuple[Any, asyncio.Task[None]]:
        svid = issuer.issue(client.identity)
        assert svid.private_key is not None
        credentials = grpc.ssl_channel_credentials(
            bundle, private_key_pem(svid.private_key), svid.chain_pem()
        )
        channel = grpc.aio.secure_channel(
            f"127.0.0.1:{port}",
            credentials,
            options=[("grpc.ssl_target_name_override", "localhost")],
        )
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        return channel, asyncio.create_task(client.run(stub))

    try:
        yield ads, connect
    finally:
        await server.stop(grace=None)
        secrets.close()
        store.stop()


async def _settled(
    ads: MeshAds, clients: list[Any], tasks: list[asyncio.Task[None]], start: float
) -> None:
    while len(ads.engine.streams()) < len(clients) or ads.engine.unsettled():
        await asyncio.sleep(0.05)
        failed = [t for t in tasks if t.done()]
        if failed:
            raise SystemExit(f"an ADS client stopped: {failed[0].exception()}")
        if time.perf_counter() - start > 300:
            raise SystemExit("clients did not settle within 300 s")


async def push_to_ack(document: dict[str, Any], proxies: int) -> dict[str, Any]:
    """Connect ``proxies`` clients (one identity each, mTLS), change every split's weights
    as a mesh-file reload would, and time until every stream has ACKed."""
    mesh_ref = MeshRef(parse_mesh(document, TD))
    async with ads_server(mesh_ref) as (ads, connect):
        return await _push_to_ack(document, proxies, mesh_ref, ads, connect)


async def _push_to_ack(
    document: dict[str, Any], proxies: int, mesh_ref: MeshRef, ads: MeshAds, connect: Any
) -> dict[str, Any]:
    seen: dict[SpiffeId, str] = {}
    for workload in mesh_ref.mesh.workloads:
        seen.setdefault(mesh_ref.mesh.identity_of(workload), workload.name)
    clients = [ProxyClient(identity, name) for identity, name in list(seen.items())[:proxies]]
    channels = []
    tasks = []
    for client in clients:
        channel, task = connect(client)
        channels.append(channel)
        tasks.append(task)
    start = time.perf_counter()
    await _settled(ads, clients, tasks, start)
    connect_s = time.perf_counter() - start
    before = {id(c): c.responses for c in clients}
    changed = _changed_weights(document)
    start = time.perf_counter()
    mesh_ref.mesh = parse_mesh(changed, TD)  # the reload: parse and validate the new file
    ads.mesh_changed()
    await asyncio.sleep(0)
    unsettled = await ads.engine.wait_settled(300)
    change_s = time.perf_counter() - start
    pushed = sum(1 for c in clients if c.responses != before[id(c)])
    old, new = parse_mesh(document, TD), mesh_ref.mesh
    affected = sum(
        1
        for c in clients
        if generate(old, c.identity, workload=c.workload).versions
        != generate(new, c.identity, workload=c.workload).versions
    )
    for task in tasks:
        task.cancel()
    for channel in channels:
        await channel.close(None)
    latency = ads.engine.stats.ack_latency
    return {
        "ack_proxies": len(clients),
        "ack_connect_to_settled_s": round(connect_s, 2),
        "ack_change_to_last_ack_s": round(change_s, 3),
        "ack_proxies_affected": affected,
        "ack_proxies_pushed": pushed,
        "ack_unsettled": len(unsettled),
        "ack_latency_p50_ms": round((latency.quantile(0.5) or 0) * 1e3, 2),
        "ack_latency_max_ms": round(latency.maximum * 1e3, 1),
    }


# --- ambient: one node proxy serving many workloads -------------------------------------

NODE_ID = SpiffeId.parse("spiffe://cluster.local/ns/ztunnel/sa/node-0")


def ambient_document(document: dict[str, Any], node_workloads: int) -> dict[str, Any]:
    """The synthetic mesh with its first ``node_workloads`` services in the ambient
    layout: replica r of each on node-r, so node-0 runs one workload of each service
    (one identity each) and their other replicas are tunnel endpoints elsewhere."""
    changed = copy.deepcopy(document)
    replicas = max(1, len(changed["workloads"]) // max(1, len(changed["services"])))
    changed["nodes"] = [
        {"name": f"node-{r}", "identity": str(NODE_ID).replace("node-0", f"node-{r}")}
        for r in range(replicas)
    ]
    for n, workload in enumerate(changed["workloads"][: node_workloads * replicas]):
        workload.update(layout="ambient", node=f"node-{n % replicas}")
    return changed


def _scheduled_pod(document: dict[str, Any]) -> dict[str, Any]:
    """A mesh change for node-0: one more pod of the first service lands there."""
    changed = copy.deepcopy(document)
    pod = copy.deepcopy(changed["workloads"][0])
    pod.update(name=f"{pod['name']}-new", address="10.255.255.254")
    changed["workloads"].append(pod)
    return changed


def ambient_figures(document: dict[str, Any], node_workloads: int, repeat: int) -> dict[str, Any]:
    ambient = ambient_document(document, node_workloads)
    mesh = parse_mesh(ambient, TD)
    node = mesh.node_proxied_by(NODE_ID)
    assert node is not None
    pods = mesh.ambient_workloads(node)
    sidecars = parse_mesh(document, TD)

    def fresh(m: Mesh) -> Mesh:
        copied = dataclasses.replace(m)
        copied.service("", "")
        return copied

    def node_proxy(m: Mesh) -> Callable[[], Snapshot]:
        return lambda: generate(m, NODE_ID)

    def sidecars_of(m: Mesh) -> Callable[[], list[Snapshot]]:
        return lambda: [generate(m, m.identity_of(w), workload=w.name) for w in pods]

    node_runs, sidecar_runs = [], []
    for _ in range(repeat):  # alternating, so the machine's load falls on both alike
        node_runs.append(timed(node_proxy(fresh(mesh))))
        sidecar_runs.append(timed(sidecars_of(fresh(sidecars))))
    snapshot = node_runs[0][0]
    node_s = min(elapsed for _, elapsed in node_runs)
    sidecars_s = min(elapsed for _, elapsed in sidecar_runs)
    _, peak, held = traced_peak(node_proxy(fresh(mesh)))
    figures: dict[str, Any] = {
        "ambient_node_workloads": len(pods),
        "ambient_node_identities": len({mesh.identity_of(w) for w in pods}),
        "ambient_node_resources": counts(snapshot),
        "ambient_node_secrets": len(snapshot.secret_names),
        "ambient_node_generate_ms": round(node_s * 1e3, 1),
        "ambient_node_bytes": snapshot_bytes(snapshot),
        "ambient_node_peak_mib": round(peak / 2**20, 2),
        "ambient_node_held_mib": round(held / 2**20, 2),
        "ambient_same_workloads_osm_sidecars_ms": round(sidecars_s * 1e3, 1),
        "ambient_node_vs_osm_sidecars_time": round(node_s / sidecars_s, 2),
    }
    figures.update(asyncio.run(node_push(ambient, snapshot.secret_names)))
    return figures


class NodeClient(ProxyClient):
    """An ambient node proxy: no workload; it also asks for the secrets its resources
    name (every workload certificate and ROOTCA), as Envoy does."""

    def __init__(self, identity: SpiffeId, secrets: tuple[str, ...]) -> None:
        super().__init__(identity, "")
        self.names[SECRET_TYPE] = list(secrets)

    def first_requests(self) -> list[Any]:
        first = self.request(CLUSTER_TYPE)
        first.node.id = str(self.identity)
        first.node.metadata.fields[LAYOUT_METADATA].string_value = "ambient"
        return [first, self.request(LISTENER_TYPE), self.request(SECRET_TYPE)]


async def node_push(document: dict[str, Any], secrets: tuple[str, ...]) -> dict[str, Any]:
    gc.collect()
    rss_before = rss_bytes()
    mesh_ref = MeshRef(parse_mesh(document, TD))
    async with ads_server(mesh_ref) as (ads, connect):
        client = NodeClient(NODE_ID, secrets)
        channel, task = connect(client)
        start = time.perf_counter()
        await _settled(ads, [client], [task], start)
        full_s = time.perf_counter() - start
        before = client.responses
        start = time.perf_counter()
        mesh_ref.mesh = parse_mesh(_scheduled_pod(document), TD)  # the reload's parse
        parse_s = time.perf_counter() - start
        ads.mesh_changed()
        await asyncio.sleep(0)
        unsettled = await ads.engine.wait_settled(300)
        change_s = time.perf_counter() - start
        rss = rss_bytes() - rss_before
        task.cancel()
        await channel.close(None)
    return {
        "ambient_full_push_s": round(full_s, 3),
        "ambient_change_to_ack_ms": round(change_s * 1e3, 1),
        "ambient_change_parse_ms": round(parse_s * 1e3, 1),
        "ambient_change_responses": client.responses - before,
        "ambient_unsettled": len(unsettled),
        "ambient_push_rss_growth_mib": round(rss / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--replicas", type=int, default=5)
    parser.add_argument("--callers", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=5, help="best-of for single proxies")
    parser.add_argument(
        "--ack-proxies", type=int, default=1000, help="ADS clients for push-to-ACK (0: skip)"
    )
    parser.add_argument(
        "--node-workloads", type=int, default=100, help="workloads on the ambient node proxy"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny counts: checks that it runs (make test does)"
    )
    args = parser.parse_args()
    if args.smoke:
        args.services, args.replicas, args.callers, args.repeat, args.ack_proxies = 10, 1, 2, 1, 3
        args.node_workloads = 5

    document = synthetic_mesh(args.services, args.replicas, args.callers)
    mesh, parse_s = timed(lambda: parse_mesh(document, TD))
    wide_mesh = parse_mesh(synthetic_mesh(args.services, args.replicas, 0, permissive=True), TD)
    workload = mesh.workloads[0]
    proxy = mesh.identity_of(workload)

    def fresh(m: Mesh) -> Mesh:
        """The same mesh without derived state: the first proxy after a mesh change."""
        copy = dataclasses.replace(m)
        copy.service("", "")  # builds the lookup index
        return copy

    _, index_s = best_of(lambda: fresh(mesh), args.repeat)

    def one(m: Mesh) -> Callable[[], Snapshot]:
        return lambda: generate(m, proxy, workload=workload.name)

    def cold(m: Mesh) -> tuple[Snapshot, float]:
        """Best time to generate on a mesh where nothing was generated yet."""
        runs = [timed(one(fresh(m))) for _ in range(args.repeat)]
        return runs[0][0], min(elapsed for _, elapsed in runs)

    one_snapshot, one_s = cold(mesh)
    _, one_peak, one_held = traced_peak(one(fresh(mesh)))
    wide_snapshot, wide_s = cold(wide_mesh)
    _, wide_peak, wide_held = traced_peak(one(fresh(wide_mesh)))
    _, wide_baseline_s = best_of(lambda: reserialize([wide_snapshot]), args.repeat)

    shared = fresh(mesh)
    gc.collect()
    rss_before = rss_bytes()
    proxies = [(shared.identity_of(w), w.name) for w in shared.workloads]
    everything, all_s, distinct_s, hits_s = generate_all(shared, proxies)
    all_rss = rss_bytes() - rss_before
    _, all_baseline_s = timed(lambda: reserialize(everything))
    resources = sum(len(v) for s in everything for v in s.resources.values())
    identities = len({p for p, _ in proxies})
    hits = len(proxies) - identities

    figures = {
        "services": args.services,
        "workloads": len(mesh.workloads),
        "identities": identities,
        "parse_s": round(parse_s, 3),
        "index_ms": round(index_s * 1e3, 1),
        "one_proxy_resources": counts(one_snapshot),
        "one_proxy_ms": round(one_s * 1e3, 2),
        "one_proxy_peak_kib": round(one_peak / 1024, 1),
        "one_proxy_held_kib": round(one_held / 1024, 1),
        "one_wide_proxy_resources": counts(wide_snapshot),
        "one_wide_proxy_ms": round(wide_s * 1e3, 1),
        "one_wide_proxy_peak_mib": round(wide_peak / 2**20, 2),
        "one_wide_proxy_held_mib": round(wide_held / 2**20, 2),
        "one_wide_proxy_vs_reserialize": round(wide_s / wide_baseline_s, 1),
        "all_proxies": len(everything),
        "all_proxies_resources": resources,
        "all_proxies_s": round(all_s, 2),
        "all_proxies_ms_per_proxy": round(all_s / len(everything) * 1e3, 2),
        "distinct_generations": identities,
        "distinct_ms_per_proxy": round(distinct_s / identities * 1e3, 2),
        "cache_hits": hits,
        "cache_hit_ms_per_proxy": round(hits_s / hits * 1e3, 3) if hits else None,
        "all_proxies_rss_mib": round(all_rss / 2**20, 1),
        "all_proxies_rss_kib_per_proxy": round(all_rss / len(everything) / 1024, 1),
        "all_proxies_vs_reserialize": round(all_s / all_baseline_s, 1),
        "baseline_reserialize_all_s": round(all_baseline_s, 2),
    }
    figures.update(layout_figures(mesh, fresh, args.repeat))
    if args.node_workloads:
        figures.update(ambient_figures(document, args.node_workloads, args.repeat))
    if args.ack_proxies:
        del everything
        figures.update(asyncio.run(push_to_ack(document, args.ack_proxies)))
    for key, value in figures.items():
        print(f"{key:34} {value}")
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main()
