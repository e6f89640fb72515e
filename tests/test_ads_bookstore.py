"""The bookstore over ADS with real Envoys: mTLS, a 50/50 split, identity-based
authorization, and live mesh changes without restarting anything.

Explicit capture on loopback: each workload has its own 127.0.0.x addresses (from
``examples/bookstore/mesh.yaml``; the service port is replaced by a free one). The
Envoys are configured only by ``build_ads_bootstrap``; meshca's ADS server runs on its
own event loop in a thread, over mutual TLS on 127.0.0.1. bookbuyer's Envoy uses
incremental (delta) ADS, the others state of the world.
"""

from __future__ import annotations

import asyncio
import copy
import http.client
import ssl
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from meshca.backends.local import init_local_ca
from meshca.envoy.ads_bootstrap import build_ads_bootstrap
from meshca.envoy.bootstrap import BootstrapSpec, ClientTls
from meshca.envoy.mesh import Mesh, parse_mesh
from meshca.issuer import Issuer, X509Svid
from meshca.issuer.keys import private_key_pem
from meshca.sds.secrets import SecretSource
from meshca.serve.ads import MeshAds
from meshca.spiffe import SpiffeId, TrustDomain
from meshca.store import SecretStore
from meshca.util.files import PRIVATE, atomic_write
from meshca.util.netaddr import TcpServer
from meshca.xds.ads import AggregatedDiscoveryServicer, add_ads_to_server
from meshca.xds.auth import CallerAuthenticator
from meshca.xds.resources import CLUSTER_TYPE, ENDPOINT_TYPE, SECRET_TYPE
from tests.envoy_harness import (
    EnvoyProcess,
    RecordingApp,
    bookstore_document,
    eventually,
    free_port_on,
    http_get,
)

TD = TrustDomain("cluster.local")
SERVER_ID = SpiffeId.from_kubernetes("meshca", "meshca", TD)

pytestmark = [pytest.mark.envoy, pytest.mark.timeout(120)]


def sid(namespace: str, account: str) -> SpiffeId:
    return SpiffeId.from_kubernetes(namespace, account, TD)


# --- meshca's ADS server on its own loop ------------------------------------------------


class AdsServer:
    """CA, secret store and ADS servicer on a private event loop in a thread."""

    def __init__(self, root: Path, mesh: Mesh) -> None:
        self.mesh = mesh
        ca = init_local_ca(root / "data", TD)
        self.issuer = Issuer(ca.authority())
        self.bundle_pem = ca.bundle.pem()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.port = self.run(self._start())

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=30)

    async def _start(self) -> int:
        self.store = SecretStore(self.issuer)
        self.secrets = SecretSource(
            self.store, lambda ns, svc: self.mesh.service_identities(ns, svc)
        )
        self.ads = MeshAds(lambda: self.mesh, self.secrets)
        self.server = grpc.aio.server()
        add_ads_to_server(
            AggregatedDiscoveryServicer(self.ads.engine, CallerAuthenticator(TD)), self.server
        )
        svid = self.issuer.issue(SERVER_ID, dns_names=("localhost",))
        assert svid.private_key is not None
        credentials = grpc.ssl_server_credentials(
            [(private_key_pem(svid.private_key), svid.chain_pem())],
            root_certificates=self.bundle_pem,
            require_client_auth=True,
        )
        port = self.server.add_secure_port("127.0.0.1:0", credentials)
        await self.server.start()
        return port

    def set_mesh(self, mesh: Mesh) -> None:
        async def change() -> None:
            self.mesh = mesh
            self.ads.mesh_changed()

        self.run(change())

    def stats(self) -> Any:
        async def read() -> Any:
            return self.ads.engine.stats

        return self.run(read())

    def close(self) -> None:
        async def stop() -> None:
            await self.server.stop(grace=None)
            self.secrets.close()
            self.store.stop()

        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


# --- straight to a proxy, bypassing the caller's own ------------------------------------


def last_xfcc(app: RecordingApp) -> str:
    """The ``x-forwarded-client-cert`` header of the last request ``app`` served."""
    return app.requests[-1].get("x-forwarded-client-cert", "")


def mtls_get(address: str, port: int, svid: X509Svid | None, bundle: Path, tmp: Path) -> int:
    """GET / straight to a proxy's inbound listener, presenting ``svid`` (if any)."""
    context = ssl.create_default_context(cafile=str(bundle))
    context.check_hostname = False
    if svid is not None:
        assert svid.private_key is not None
        cert, key = tmp / "direct-cert.pem", tmp / "direct-key.pem"
        atomic_write(cert, svid.chain_pem())
        atomic_write(key, private_key_pem(svid.private_key), PRIVATE)
        context.load_cert_chain(cert, key)
    connection = http.client.HTTPSConnection(address, port, context=context, timeout=5)
    try:
        connection.request("GET", "/", headers={"Host": "bookwarehouse.bookwarehouse"})
        response = connection.getresponse()
        response.read()
        return response.status
    except (OSError, ssl.SSLError):
        return 0
    finally:
        connection.close()


# --- the mesh ------------------------------------------------------------------------------


def _with_ports(document: dict[str, Any], http_port: int, tcp_port: int) -> dict[str, Any]:
    text = yaml.safe_dump(document).replace("14001", str(http_port)).replace("3306", str(tcp_port))
    result = yaml.safe_load(text)
    assert isinstance(result, dict)
    return result


@pytest.fixture(scope="module")
def ports() -> tuple[int, int]:
    addresses = [f"127.0.0.{n}" for n in (*range(21, 27), *range(31, 37), *range(41, 46))]
    return free_port_on(addresses), free_port_on(addresses)


@pytest.fixture(scope="module")
def document(ports: tuple[int, int]) -> dict[str, Any]:
    return _with_ports(bookstore_document(), *ports)


PROXIES = {  # workload -> (identity, delta ADS)
    "bookbuyer": (sid("bookbuyer", "bookbuyer"), True),
    "bookstore-v1": (sid("bookstore", "bookstore-v1"), False),
    "bookstore-v2": (sid("bookstore", "bookstore-v2"), False),
    "bookwarehouse": (sid("bookwarehouse", "bookwarehouse"), False),
}


class Bookstore:
    def __init__(self, server: AdsServer, envoys: dict[str, EnvoyProcess],
                 apps: dict[str, RecordingApp], document: dict[str, Any], port: int,
                 root: Path) -> None:  # fmt: skip
        self.server, self.envoys, self.apps = server, envoys, apps
        self.document, self.port, self.root = document, port, root
        self.bundle = root / "bundle.pem"

    def via(self, workload: str, host: str) -> tuple[int, str]:
        outbound = next(w for w in self.document["workloads"] if w["name"] == workload)
        address = outbound["outbound_address"]
        return http_get(self.port, address=address, host=f"{host}:{self.port}")

    def change(self, edit: Callable[[dict[str, Any]], None]) -> None:
        edit(self.document)
        self.server.set_mesh(parse_mesh(self.document, TD))


@pytest.fixture(scope="module")
def bookstore(
    tmp_path_factory: pytest.TempPathFactory, document: dict[str, Any], ports: tuple[int, int]
) -> Iterator[Bookstore]:
    root = tmp_path_factory.mktemp("bookstore")
    server = AdsServer(root, parse_mesh(document, TD))
    atomic_write(root / "bundle.pem", server.bundle_pem)
    apps: dict[str, RecordingApp] = {}
    envoys: dict[str, EnvoyProcess] = {}
    try:
        for workload in document["workloads"]:
            if workload["name"] in PROXIES and workload.get("ports"):
                name, address = workload["name"], workload["app_address"]
                apps[name] = RecordingApp(address, ports[0], body=name.encode())
        for name, (identity, delta) in PROXIES.items():
            certs = root / name / "certs"
            svid = server.issuer.issue(identity)
            assert svid.private_key is not None
            atomic_write(certs / "cert.pem", svid.chain_pem())
            atomic_write(certs / "key.pem", private_key_pem(svid.private_key), PRIVATE)
            atomic_write(certs / "bundle.pem", server.bundle_pem)
            spec = BootstrapSpec(
                identity,
                TcpServer("127.0.0.1", server.port),
                client_tls=ClientTls.from_dir(certs),
                server_id=SERVER_ID,
            )
            bootstrap = build_ads_bootstrap(spec, capture="explicit", workload=name, delta=delta)
            envoys[name] = EnvoyProcess(bootstrap, root, name)
        with ThreadPoolExecutor(len(envoys)) as pool:
            list(pool.map(lambda e: e.start(), envoys.values()))
        yield Bookstore(server, envoys, apps, copy.deepcopy(document), ports[0], root)
    finally:
        for envoy in envoys.values():
            envoy.stop()
        for app in apps.values():
            app.close()
        server.close()


def _split(bookstore: Bookstore, requests: int) -> Counter[str]:
    seen: Counter[str] = Counter()
    for _ in range(requests):
        status, body = bookstore.via("bookbuyer", "bookstore.bookstore")
        assert status == 200, body
        seen[body] += 1
    return seen


def test_bookbuyer_reaches_both_bookstores_near_the_split(bookstore: Bookstore) -> None:
    eventually(lambda: bookstore.via("bookbuyer", "bookstore.bookstore")[0] == 200,
               "bookbuyer -> bookstore answers")  # fmt: skip
    seen = _split(bookstore, 200)
    assert set(seen) == {"bookstore-v1", "bookstore-v2"}
    assert 60 <= seen["bookstore-v1"] <= 140, seen  # 50 % of 200, far outside binomial noise
    for name in ("bookstore-v1", "bookstore-v2"):
        assert last_xfcc(bookstore.apps[name]).count("URI=") == 1
        assert "URI=spiffe://cluster.local/ns/bookbuyer/sa/bookbuyer" in last_xfcc(
            bookstore.apps[name]
        )


@pytest.mark.parametrize("store", ["bookstore-v1", "bookstore-v2"])
def test_bookstore_reaches_bookwarehouse_as_itself(bookstore: Bookstore, store: str) -> None:
    _, body = eventually(
        lambda: (r := bookstore.via(store, "bookwarehouse.bookwarehouse"))[0] == 200 and r,
        f"{store} -> bookwarehouse answers",
    )
    assert body == "bookwarehouse"
    xfcc = last_xfcc(bookstore.apps["bookwarehouse"])
    assert f"URI=spiffe://cluster.local/ns/bookstore/sa/{store}" in xfcc


def test_bookbuyer_cannot_reach_bookwarehouse(bookstore: Bookstore) -> None:
    """Not in its configuration: no route, so its proxy answers 404 and sends nothing."""
    before = len(bookstore.apps["bookwarehouse"].requests)
    status, _ = bookstore.via("bookbuyer", "bookwarehouse.bookwarehouse")
    assert status == 404
    assert len(bookstore.apps["bookwarehouse"].requests) == before


def test_bookthief_is_refused_by_rbac(bookstore: Bookstore, tmp_path: Path) -> None:
    """Bypassing its own proxy, with a valid SVID of its own, still gets 403."""
    warehouse = next(w for w in bookstore.document["workloads"] if w["name"] == "bookwarehouse")
    address, port = warehouse["address"], bookstore.port
    issuer = bookstore.server.issuer
    store_v1 = issuer.issue(sid("bookstore", "bookstore-v1"))
    thief = issuer.issue(sid("bookthief", "bookthief"))
    eventually(lambda: mtls_get(address, port, store_v1, bookstore.bundle, tmp_path) == 200,
               "bookstore-v1 SVID admitted")  # fmt: skip
    before = len(bookstore.apps["bookwarehouse"].requests)
    assert mtls_get(address, port, thief, bookstore.bundle, tmp_path) == 403
    assert mtls_get(address, port, None, bookstore.bundle, tmp_path) == 0  # no certificate
    assert len(bookstore.apps["bookwarehouse"].requests) == before


def test_mesh_changes_apply_to_running_envoys(bookstore: Bookstore) -> None:
    pids = {name: envoy.process.pid for name, envoy in bookstore.envoys.items() if envoy.process}
    eventually(lambda: bookstore.via("bookbuyer", "bookstore.bookstore")[0] == 200,
               "bookbuyer -> bookstore answers")  # fmt: skip

    def all_v1(d: dict[str, Any]) -> None:
        d["traffic_splits"][0]["backends"][0]["weight"] = 100
        d["traffic_splits"][0]["backends"][1]["weight"] = 0

    bookstore.change(all_v1)
    eventually(lambda: set(_split(bookstore, 10)) == {"bookstore-v1"}, "the split moved to v1")
    assert set(_split(bookstore, 40)) == {"bookstore-v1"}

    def v2_loses_warehouse(d: dict[str, Any]) -> None:
        d["access"]["policies"][1]["from"] = ["bookstore/bookstore-v1"]

    bookstore.change(v2_loses_warehouse)
    eventually(lambda: bookstore.via("bookstore-v2", "bookwarehouse.bookwarehouse")[0] != 200,
               "bookstore-v2 lost bookwarehouse")  # fmt: skip
    assert bookstore.via("bookstore-v1", "bookwarehouse.bookwarehouse") == (200, "bookwarehouse")
    assert pids == {n: e.process.pid for n, e in bookstore.envoys.items() if e.process}
    for envoy in bookstore.envoys.values():
        assert envoy.process is not None and envoy.process.poll() is None
    stats = bookstore.server.stats()
    assert sum(stats.nacks.values()) == 0, dict(stats.nacks)  # Envoy accepted every push


# --- what an attacker gets over ADS --------------------------------------------------------


def _ads_exchange(
    bookstore: Bookstore, identity: SpiffeId, requests: list[Any]
) -> tuple[list[Any], grpc.StatusCode | None, str]:
    """Send ``requests`` on one SotW ADS stream as ``identity`` (mTLS); collect answers."""
    svid = bookstore.server.issuer.issue(identity)
    assert svid.private_key is not None

    async def exchange() -> tuple[list[Any], grpc.StatusCode | None, str]:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=bookstore.server.bundle_pem,
            private_key=private_key_pem(svid.private_key),
            certificate_chain=svid.chain_pem(),
        )
        options = [("grpc.ssl_target_name_override", "localhost")]
        address = f"127.0.0.1:{bookstore.server.port}"
        async with grpc.aio.secure_channel(address, credentials, options=options) as channel:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            call = stub.StreamAggregatedResources()
            responses = []
            try:
                for request in requests:
                    await call.write(request)
                    responses.append(await asyncio.wait_for(call.read(), 10))
            except grpc.aio.AioRpcError as exc:
                return responses, exc.code(), exc.details() or ""
            call.cancel()
            return responses, None, ""

    return asyncio.run(exchange())


def _request(type_url: str, names: tuple[str, ...] = (), node_id: str | None = None) -> Any:
    request = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=list(names))
    if node_id is not None:
        request.node.id = node_id
    return request


THIEF = sid("bookthief", "bookthief")


def test_bookthief_gets_no_trace_of_bookwarehouse(bookstore: Bookstore) -> None:
    """Asking for bookwarehouse's endpoints by name gets nothing, and the stream (with
    the rest of the proxy's configuration) carries on: an unknown name is absent."""
    own = f"bookstore/bookstore|{bookstore.port}|v1"
    foreign = f"bookwarehouse/bookwarehouse|{bookstore.port}"
    responses, code, _ = _ads_exchange(
        bookstore,
        THIEF,
        [_request(CLUSTER_TYPE, node_id=str(THIEF)), _request(ENDPOINT_TYPE, (own, foreign))],
    )
    assert code is None
    clusters, endpoints = responses
    names = {cluster_pb2.Cluster.FromString(r.value).name for r in clusters.resources}
    assert names == {"blackhole"} | {
        f"bookstore/bookstore|{bookstore.port}|{v}" for v in ("v1", "v2")
    }
    assert endpoints.type_url == ENDPOINT_TYPE
    assert [
        endpoint_pb2.ClusterLoadAssignment.FromString(r.value).cluster_name
        for r in endpoints.resources
    ] == [own]


@pytest.mark.parametrize(
    ("requests", "code", "detail"),
    [
        (  # another identity's private key
            [_request(SECRET_TYPE, ("service-cert:bookwarehouse/bookwarehouse",), str(THIEF))],
            grpc.StatusCode.PERMISSION_DENIED,
            "may not obtain the private key",
        ),
        (  # claiming another identity in node.id
            [_request(CLUSTER_TYPE, node_id=str(sid("bookwarehouse", "bookwarehouse")))],
            grpc.StatusCode.PERMISSION_DENIED,
            "claims an identity",
        ),
    ],
    ids=["foreign-key", "foreign-node"],
)
def test_ads_refusals(
    bookstore: Bookstore, requests: list[Any], code: grpc.StatusCode, detail: str
) -> None:
    responses, got, details = _ads_exchange(bookstore, THIEF, requests)
    assert (responses, got) == ([], code)
    assert detail in details


# --- PERMISSIVE inbound, source wildcards, route timeouts (after the changes above) ------


def _service(document: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in document["services"] if s["name"] == name)


def _plaintext_get(address: str, port: int, headers: dict[str, str]) -> int:
    connection = http.client.HTTPConnection(address, port, timeout=5)
    try:
        connection.request("GET", "/", headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException):
        return 0
    finally:
        connection.close()


def test_permissive_accepts_plaintext_and_mtls_strict_only_mtls(
    bookstore: Bookstore, tmp_path: Path
) -> None:
    warehouse = next(w for w in bookstore.document["workloads"] if w["name"] == "bookwarehouse")
    address, port = warehouse["address"], bookstore.port
    app = bookstore.apps["bookwarehouse"]
    forged = {
        "Host": "bookwarehouse.bookwarehouse",
        "x-forwarded-client-cert": "URI=spiffe://cluster.local/ns/bookstore/sa/bookstore-v1",
    }
    before = len(app.requests)
    assert _plaintext_get(address, port, forged) == 0  # STRICT: no TLS, no request
    assert len(app.requests) == before

    def permissive(d: dict[str, Any]) -> None:
        _service(d, "bookwarehouse")["mtls"] = "permissive"
        policy = next(p for p in d["access"]["policies"] if p["service"].endswith("bookwarehouse"))
        policy["from"] = ["bookstore/*"]  # bookstore-v2 lost it above: the wildcard restores it

    bookstore.change(permissive)
    eventually(lambda: _plaintext_get(address, port, forged) == 200, "plaintext admitted")
    assert app.callers()[-1] == ""  # no identity, and the forged one was removed
    _, body = eventually(
        lambda: (r := bookstore.via("bookstore-v2", "bookwarehouse.bookwarehouse"))[0] == 200 and r,
        "bookstore-v2 -> bookwarehouse through the namespace wildcard",
    )
    assert body == "bookwarehouse"
    assert app.callers()[-1] == "spiffe://cluster.local/ns/bookstore/sa/bookstore-v2"
    thief = bookstore.server.issuer.issue(THIEF)
    assert mtls_get(address, port, thief, bookstore.bundle, tmp_path) == 403  # RBAC still


def test_routes_have_no_timeout_unless_one_is_configured(bookstore: Bookstore) -> None:
    """Without one, Envoy's 15 s default is gone: a 2 s answer passes, and the callee's
    proxy tells the app of no deadline (it said 15000 before); with 1 s configured, a 2 s
    answer is cut with 504 while a quick one passes."""

    def get(path: str) -> tuple[int, dict[str, str]]:
        host = f"bookstore.bookstore:{bookstore.port}"
        status, body = http_get(bookstore.port, path, address="127.0.0.41", host=host)
        return status, bookstore.apps[body].requests[-1] if status == 200 else {}

    status, headers = get("/delay/2")
    assert status == 200
    assert "x-envoy-expected-rq-timeout-ms" not in headers

    def one_second(d: dict[str, Any]) -> None:
        _service(d, "bookstore")["ports"] = [{"port": bookstore.port, "timeout": "1s"}]

    bookstore.change(one_second)
    eventually(lambda: get("/delay/2")[0] == 504, "the 1 s timeout applies")
    assert get("/")[0] == 200
