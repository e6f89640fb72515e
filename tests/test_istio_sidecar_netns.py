"""The ``istio-sidecar`` layout for real: three pods, each its own network namespace
with Istio's capture rules, Envoys configured only over ADS by ``meshca serve``.

bookbuyer's app dials the bookstore ClusterIP; iptables sends the connection to
``virtualOutbound`` (15001), which hands it to ``0.0.0.0_14001``; the route ``14001``
splits it between bookstore-v1 and -v2 over mTLS (``outbound|14001|v1|...`` clusters,
Istio's SNI). In bookstore-v1's pod, PREROUTING sends it to ``virtualInbound`` (15006),
whose chain checks the caller's SPIFFE ID and forwards to the app on 127.0.0.1.
bookstore-v2 runs the ``osm`` layout (``inbound-listener`` on 15003): the two layouts
interoperate. The pods are linked by veth pairs (bookbuyer to each bookstore) with
link-local addresses that exist only inside these namespaces. bookbuyer asks for its
layout in its bootstrap (``--layout``); the bookstores' entries in the mesh file say
theirs.

Then: STRICT refuses plaintext, PERMISSIVE (a live mesh-file change) accepts it while
mTLS still works, a caller the policy does not name is refused by RBAC, and a
destination outside the mesh goes to ``BlackHoleCluster``.

Needs root, ``ip netns`` and iptables, or is skipped saying which is missing.
"""

from __future__ import annotations

import http.client
import ssl
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.envoy_harness import EnvoyProcess, RecordingApp, eventually, http_get
from tests.netns_harness import Netns, meshca_stdout, requirements
from tests.serve_harness import ServeProcess, serving, short_tempdir

pytestmark = [pytest.mark.envoy, pytest.mark.timeout(150)]

PORT = 14001
CLUSTER_IP = "169.254.100.1"
OUTSIDE = "169.254.100.9"  # redirected like a mesh service, but no service is there
PODS = {  # workload -> (its address, bookbuyer's address on that link)
    "bookstore-v1": ("169.254.11.2", "169.254.11.1"),
    "bookstore-v2": ("169.254.12.2", "169.254.12.1"),
}
LAYOUTS = {"bookstore-v1": "istio-sidecar", "bookstore-v2": "osm"}  # in the mesh file
INBOUND = {"istio-sidecar": 15006, "osm": 15003}


def identity(namespace: str, account: str) -> str:
    return f"spiffe://cluster.local/ns/{namespace}/sa/{account}"


BUYER = identity("bookbuyer", "bookbuyer")


def mesh_document(mtls: str = "strict") -> dict[str, Any]:
    workloads: list[dict[str, Any]] = [
        {"name": "bookbuyer", "namespace": "bookbuyer", "service_account": "bookbuyer",
         "address": PODS["bookstore-v1"][1]},
    ]  # fmt: skip
    for name, (address, _) in PODS.items():
        workloads.append(
            {"name": name, "namespace": "bookstore", "service_account": name,
             "address": address, "ports": [PORT], "layout": LAYOUTS[name],
             "labels": {"app": "bookstore", "version": name.rsplit("-", 1)[1]}}
        )  # fmt: skip
    return {
        "workloads": workloads,
        "services": [
            {
                "name": "bookstore",
                "namespace": "bookstore",
                "address": CLUSTER_IP,
                "ports": [PORT],
                "selector": {"app": "bookstore"},
                "mtls": mtls,
            },
        ],
        "traffic_splits": [
            {
                "service": "bookstore/bookstore",
                "backends": [
                    {"name": "v1", "labels": {"version": "v1"}, "weight": 50},
                    {"name": "v2", "labels": {"version": "v2"}, "weight": 50},
                ],
            },
        ],
        "access": {
            "policies": [{"service": "bookstore/bookstore", "from": ["bookbuyer/bookbuyer"]}]
        },
    }


@dataclass
class Pods:
    root: Path
    mesh: Path
    server: ServeProcess
    netns: dict[str, Netns]
    apps: dict[str, RecordingApp]
    envoys: dict[str, EnvoyProcess]

    def dial(
        self, address: str, port: int = PORT, host: str = "bookstore.bookstore"
    ) -> tuple[int, str]:
        """What bookbuyer's app gets when it dials ``address:port`` (in its namespace)."""
        return self.netns["bookbuyer"].run(
            lambda: http_get(port, address=address, host=f"{host}:{port}")
        )

    def requests(self) -> int:
        return sum(len(app.requests) for app in self.apps.values())


def _pod_rules(netns: Netns, iptables: str, name: str) -> None:
    if name == "bookbuyer":  # outbound: the mesh service (and one outside it) to 15001
        for destination in (CLUSTER_IP, OUTSIDE):
            netns.exec(iptables, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d",
                       f"{destination}/32", "-j", "REDIRECT", "--to-ports", "15001")  # fmt: skip
        return
    inbound = str(INBOUND[LAYOUTS[name]])
    netns.exec(iptables, "-t", "nat", "-A", "PREROUTING", "-p", "tcp", "--dport", str(PORT),
               "-j", "REDIRECT", "--to-ports", inbound)  # fmt: skip


@pytest.fixture(scope="module")
def pods() -> Iterator[Pods]:
    ip, iptables = requirements("the istio-sidecar layout test")
    netns: dict[str, Netns] = {}
    apps: dict[str, RecordingApp] = {}
    envoys: dict[str, EnvoyProcess] = {}
    try:
        for i, name in enumerate(("bookbuyer", *PODS)):
            netns[name] = Netns(ip, iptables, suffix=f"-istio{i}")
        for i, (name, (address, buyer_side)) in enumerate(PODS.items()):
            netns["bookbuyer"].link(f"veth{i}", f"{buyer_side}/24", netns[name], f"{address}/24")
        netns["bookbuyer"].exec(ip, "route", "add", "169.254.100.0/24", "dev", "veth0")
        for name, namespace in netns.items():
            _pod_rules(namespace, iptables, name)
        with short_tempdir("mca-istio-") as root:
            mesh = root / "mesh.yaml"
            mesh.write_text(yaml.safe_dump(mesh_document()))
            meshca_stdout("init", "--data-dir", str(root / "data"))
            args = ["--mesh", str(mesh), "--log-level", "warning"]
            for name in netns:
                namespace = "bookbuyer" if name == "bookbuyer" else "bookstore"
                args += ["--uds-identity", f"0={identity(namespace, name)}"]
            with serving(root, root / "data", *args) as server:
                for name in PODS:
                    apps[name] = netns[name].run(RecordingApp, "127.0.0.1", PORT, name.encode())
                for name in netns:
                    namespace = "bookbuyer" if name == "bookbuyer" else "bookstore"
                    layout = ["--layout", "istio-sidecar"] if name == "bookbuyer" else []
                    bootstrap = meshca_stdout(
                        *(
                            "bootstrap",
                            identity(namespace, name),
                            "--server",
                            f"unix://{server.uds}",
                        ),
                        *("--ads", "--workload", name, *layout),
                    )
                    envoys[name] = EnvoyProcess(bootstrap, root, name)
                    netns[name].run(envoys[name].start)
                yield Pods(root, mesh, server, netns, apps, envoys)
                for envoy in envoys.values():
                    envoy.stop()
    finally:
        for envoy in envoys.values():
            envoy.stop()
        for app in apps.values():
            app.close()
        for namespace in netns.values():
            namespace.delete()


def test_the_proxies_carry_istios_names(pods: Pods) -> None:
    buyer = pods.netns["bookbuyer"].run(pods.envoys["bookbuyer"].get, "/listeners")[1]
    assert {"virtualOutbound::0.0.0.0:15001", "0.0.0.0_14001::0.0.0.0:14001"} <= set(buyer.split())
    store = pods.netns["bookstore-v1"].run(pods.envoys["bookstore-v1"].get, "/listeners")[1]
    assert "virtualInbound::0.0.0.0:15006" in store.split()
    osm = pods.netns["bookstore-v2"].run(pods.envoys["bookstore-v2"].get, "/listeners")[1]
    assert "inbound-listener::0.0.0.0:15003" in osm.split()


def test_a_connection_to_the_cluster_ip_is_split_over_mtls(pods: Pods) -> None:
    """Also across layouts: bookstore-v2's proxy is in OSM's."""
    eventually(lambda: pods.dial(CLUSTER_IP)[0] == 200, "bookbuyer -> ClusterIP answers")
    seen: Counter[str] = Counter()
    for _ in range(30):
        status, body = pods.dial(CLUSTER_IP)
        assert status == 200, body
        seen[body] += 1
    assert set(seen) == {"bookstore-v1", "bookstore-v2"}, seen
    for app in pods.apps.values():  # each saw the caller's verified SPIFFE ID
        assert set(app.callers()) == {BUYER}


def test_outside_the_mesh_goes_to_the_black_hole(pods: Pods) -> None:
    before = pods.requests()
    assert pods.dial(OUTSIDE, 8080)[0] == 0
    assert pods.requests() == before


def _mtls_get(address: str, certs: Path) -> int:
    context = ssl.create_default_context(cafile=str(certs / "bundle.pem"))
    context.check_hostname = False
    context.load_cert_chain(certs / "cert.pem", certs / "key.pem")
    connection = http.client.HTTPSConnection(address, PORT, context=context, timeout=5)
    try:
        connection.request("GET", "/", headers={"Host": "bookstore.bookstore"})
        response = connection.getresponse()
        response.read()
        return response.status
    except (OSError, ssl.SSLError):
        return 0
    finally:
        connection.close()


def test_strict_then_permissive_and_rbac(pods: Pods) -> None:
    """STRICT: plaintext straight to a pod reaches nothing. A valid certificate of an
    identity the policy does not name: 403. Then the mesh file makes the service
    PERMISSIVE, and plaintext reaches the app (with no caller identity), while the
    mesh's mTLS traffic still flows."""
    v1 = PODS["bookstore-v1"][0]
    eventually(lambda: pods.dial(CLUSTER_IP)[0] == 200, "bookbuyer -> ClusterIP answers")
    before = pods.requests()
    assert pods.netns["bookbuyer"].run(lambda: http_get(PORT, address=v1))[0] == 0
    thief = pods.root / "thief"
    data = str(pods.root / "data")
    thief_id = identity("bookthief", "bookthief")
    meshca_stdout("issue", thief_id, "--data-dir", data, "--out", str(thief))
    assert pods.netns["bookbuyer"].run(_mtls_get, v1, thief) == 403
    assert pods.requests() == before

    pods.mesh.write_text(yaml.safe_dump(mesh_document(mtls="permissive")))
    deadline = time.monotonic() + 30
    while pods.netns["bookbuyer"].run(lambda: http_get(PORT, address=v1))[0] != 200:
        assert time.monotonic() < deadline, pods.server.log()[-2000:]
        time.sleep(0.2)
    assert pods.apps["bookstore-v1"].callers()[-1] == ""
    assert pods.dial(CLUSTER_IP)[0] == 200
    assert pods.netns["bookbuyer"].run(_mtls_get, v1, thief) == 403  # mTLS: RBAC still
