"""``meshca serve --kubernetes`` against a real API server, with real Envoys configured only
over ADS: a client pod's proxy reaches a Service at its ClusterIP with mTLS, under an
AccessPolicy; endpoints added to and removed from the EndpointSlice reach the client's
EDS; a deleted Service leaves the client's configuration.

The API refuses loopback addresses in EndpointSlices, so the stand-in pods live in a
network namespace the test creates: its loopback interface carries the pods' IPs
(10.244.0.x) and the Service's ClusterIP; the app behind the web pods' proxies listens
on 127.0.0.1 there, as an app in a pod does. meshca runs outside and serves every Envoy
over its Unix socket (a path, reachable from any network namespace). Needs root and
``ip netns``; otherwise skipped, saying which is missing.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.envoy_harness import EnvoyProcess, RecordingApp, eventually, http_get
from tests.kube_harness import KubeCluster
from tests.kube_policy_harness import POLICIES, install_crds
from tests.netns_harness import Netns, requirements
from tests.serve_harness import serving, short_tempdir

pytestmark = [pytest.mark.envoy, pytest.mark.kube, pytest.mark.timeout(180)]

MESHCA = [sys.executable, "-m", "meshca"]
APP_PORT = 18080  # where the web pods' app listens (the slice's port)
PODS = {"web-0": "10.244.0.2", "web-1": "10.244.0.3"}


def meshca(*args: str) -> str:
    result = subprocess.run([*MESHCA, *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def netns() -> Iterator[Netns]:
    ip, iptables = requirements("pods at their own addresses")
    namespace = Netns(ip, iptables, "-kube")
    try:
        for address in PODS.values():
            namespace.exec(ip, "addr", "add", f"{address}/32", "dev", "lo")
        yield namespace
    finally:
        namespace.delete()


def slice_of(pods: list[str]) -> dict[str, object]:
    return {
        "endpoints": [
            {"addresses": [PODS[p]], "targetRef": {"kind": "Pod", "name": p}} for p in pods
        ]
    }


def upstream_hosts(envoy: EnvoyProcess, netns: Netns, cluster: str) -> set[str]:
    """The addresses EDS gave ``cluster`` in ``envoy`` (read inside the namespace)."""
    status, body = netns.run(envoy.get, "/clusters")
    assert status == 200
    fields = [line.split("::") for line in body.splitlines()]
    return {f[1] for f in fields if len(f) == 4 and f[0] == cluster and f[2] == "cx_active"}


def test_pods_services_and_policies_from_the_api_reach_envoys_over_ads(
    kube: KubeCluster, kube_namespace: str, netns: Netns
) -> None:
    ns = kube_namespace
    install_crds(kube)
    client_id = f"spiffe://cluster.local/ns/{ns}/sa/client"
    web_id = f"spiffe://cluster.local/ns/{ns}/sa/web"
    for account in ("client", "web"):
        kube.service_account(ns, account)
    service = kube.service(ns, "web", {"http": 8080})
    cluster_ip = service["spec"]["clusterIP"]
    netns.exec(netns.ip, "addr", "add", f"{cluster_ip}/32", "dev", "lo")
    for pod, address in PODS.items():
        kube.pod(ns, pod, service_account="web", labels={"app": "web"}, ip=address)
    kube.pod(ns, "client-0", service_account="client", labels={"app": "client"})
    kube.endpoint_slice(ns, "web", [(PODS["web-0"], "web-0")], {"http": APP_PORT})
    kube.create(
        POLICIES.format(ns=ns),
        {
            "apiVersion": "meshca.io/v1alpha1",
            "kind": "AccessPolicy",
            "metadata": {"name": "client-to-web"},
            "spec": {
                "targetRef": {"name": "web"},
                "from": [{"kind": "ServiceAccount", "name": "client"}],
            },
        },
    )

    envoys: list[EnvoyProcess] = []
    app = netns.run(RecordingApp, "127.0.0.1", APP_PORT, b"web")
    try:
        with short_tempdir("mca-kube-") as root:
            meshca("init", "--data-dir", str(root / "data"))
            args = ["--kubernetes", "--kubeconfig", str(kube.kubeconfig), "--log-level", "info"]
            for identity in (client_id, web_id):
                args += ["--uds-identity", f"0={identity}"]
            with serving(root, root / "data", *args) as server:
                announced = server.stdout.read_text()
                assert f"Kubernetes API server {kube.url} (kubeconfig " in announced
                assert "mesh from the Kubernetes API: 1 service(s), watched" in announced

                def proxy(identity: str, name: str, *extra: str) -> EnvoyProcess:
                    bootstrap = meshca(
                        *("bootstrap", identity, "--server", f"unix://{server.uds}"),
                        *("--ads", "--capture", "explicit", *extra),
                    )
                    envoy = EnvoyProcess(bootstrap, root, name)
                    envoys.append(envoy)
                    netns.run(envoy.start)
                    return envoy

                client = proxy(client_id, "client")
                proxy(web_id, "web-0", "--workload", "web-0")

                # The app dials the ClusterIP; its proxy calls web-0's over mTLS.
                def dial() -> tuple[int, str]:
                    return netns.run(lambda: http_get(8080, address=cluster_ip))

                eventually(lambda: dial() == (200, "web"), f"client -> {cluster_ip}:8080")
                assert set(app.callers()) == {client_id}

                cluster = f"{ns}/web|8080"
                assert upstream_hosts(client, netns, cluster) == {f"{PODS['web-0']}:{APP_PORT}"}
                slice_path = f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices/web-slice"
                kube.patch(slice_path, slice_of(["web-0", "web-1"]))
                eventually(
                    lambda: (
                        upstream_hosts(client, netns, cluster)
                        == {f"{a}:{APP_PORT}" for a in PODS.values()}
                    ),
                    "web-1 added to the client's EDS",
                )
                kube.patch(slice_path, slice_of(["web-1"]))
                eventually(
                    lambda: (
                        upstream_hosts(client, netns, cluster) == {f"{PODS['web-1']}:{APP_PORT}"}
                    ),
                    "web-0 removed from the client's EDS",
                )

                kube.delete(f"/api/v1/namespaces/{ns}/services/web")

                def clusters() -> set[str]:
                    dump = netns.run(client.config_dump, "dynamic_active_clusters")
                    return {config["cluster"]["name"] for config in dump.get("configs", [])}

                eventually(lambda: cluster not in clusters(), "web gone from the client")
                assert dial()[0] != 200
                assert "Traceback" not in server.log()
    finally:
        for envoy in envoys:
            envoy.stop()
        app.close()
