"""Traffic policy from the API server, carried by real Envoys: an HTTPRoute's weights
split live traffic and a change of weights shifts it; AccessPolicies decide who gets a
route and whom the callee's proxy admits; a refused object reports why in its status
and costs the others nothing.

The Pods are stand-ins (there is no kubelet): the EndpointSlices name cluster addresses
(10.244.x.x; the API server refuses loopback ones), which exist only inside a network
namespace the test creates, where the Envoys and the app run; the Service's ClusterIP
(10.96.x.x, from the API server) is local there too. meshca runs outside it, reads the
mesh with ``meshca serve --kubernetes``, and serves every Envoy over its Unix socket (a
path in the file system, reachable from any network namespace). Both versions' Envoys
forward to the one app on 127.0.0.1 in the namespace, which tells them apart by the
``By`` field each Envoy puts in ``x-forwarded-client-cert`` (its own SPIFFE ID).

Needs root and ``ip netns`` (skipped otherwise, saying which is missing).
"""

from __future__ import annotations

import http.client
import ssl
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.envoy_harness import EnvoyProcess, RecordingApp, eventually, http_get
from tests.kube_harness import KubeCluster
from tests.kube_policy_harness import POLICIES, ROUTES, install_crds
from tests.netns_harness import Netns, requirements
from tests.serve_harness import serving, short_tempdir

pytestmark = [pytest.mark.envoy, pytest.mark.kube, pytest.mark.timeout(240)]

MESHCA = [sys.executable, "-m", "meshca"]
PORT = 8080  # the Service's port, its pods' port, and the app's behind their Envoys
PODS = {"v1": "10.244.1.2", "v2": "10.244.2.2"}
MESH = {"meshca.io/mesh": "enabled"}


def spiffe(namespace: str, account: str) -> str:
    return f"spiffe://cluster.local/ns/{namespace}/sa/{account}"


def meshca(*args: str) -> str:
    result = subprocess.run([*MESHCA, *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def route(weights: dict[str, int]) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "shop-split"},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "shop", "port": PORT}],
            "rules": [
                {
                    "backendRefs": [
                        {"name": f"shop-{v}", "port": PORT, "weight": w} for v, w in weights.items()
                    ]
                }
            ],
        },
    }


def served_by(app: RecordingApp) -> str:
    """The service account of the Envoy that forwarded the app's last request."""
    fields = app.requests[-1].get("x-forwarded-client-cert", "").split(";")
    by = next((f[3:] for f in fields if f.startswith("By=")), "")
    return by.rsplit("/", 1)[-1]


def mtls_status(netns: Netns, address: str, svid_dir: Path) -> int:
    """GET / straight to a pod's Envoy (inside the namespace), presenting the SVID in
    ``svid_dir`` (``meshca issue`` output)."""

    def get() -> int:
        context = ssl.create_default_context(cafile=str(svid_dir / "bundle.pem"))
        context.check_hostname = False
        context.load_cert_chain(svid_dir / "cert.pem", svid_dir / "key.pem")
        connection = http.client.HTTPSConnection(address, PORT, context=context, timeout=5)
        try:
            connection.request("GET", "/")
            response = connection.getresponse()
            response.read()
            return response.status
        except (OSError, ssl.SSLError):
            return 0
        finally:
            connection.close()

    return netns.run(get)


def test_route_weights_steer_live_traffic_and_access_policies_admit_and_refuse(
    kube: KubeCluster, kube_namespaces: Callable[..., str]
) -> None:
    ip, iptables = requirements("pods at cluster addresses")
    install_crds(kube)
    shop, buyers = kube_namespaces("shop", labels=MESH), kube_namespaces("buyers", labels=MESH)
    kube.service_account(buyers, "buyer")
    for version, address in PODS.items():
        name = f"shop-{version}"
        labels = {"app": "shop", "version": version}
        kube.service_account(shop, name)
        kube.pod(shop, name, service_account=name, labels=labels, ip=address)
        kube.service(shop, name, {"http": PORT}, selector=labels)
        kube.endpoint_slice(shop, name, [(address, name)], {"http": PORT})
    cluster_ip = kube.service(shop, "shop", {"http": PORT}, selector={"app": "shop"})["spec"][
        "clusterIP"
    ]
    kube.endpoint_slice(shop, "shop", [(a, f"shop-{v}") for v, a in PODS.items()], {"http": PORT})
    policies, routes = POLICIES.format(ns=shop), ROUTES.format(ns=shop)
    kube.create(
        policies,
        {
            "apiVersion": "meshca.io/v1alpha1",
            "kind": "AccessPolicy",
            "metadata": {"name": "buyers"},
            "spec": {
                "targetRef": {"name": "shop"},
                "from": [{"kind": "ServiceAccount", "namespace": buyers, "name": "buyer"}],
            },
        },
    )
    kube.create(
        policies,
        {
            "apiVersion": "meshca.io/v1alpha1",
            "kind": "AccessPolicy",
            "metadata": {"name": "ghost"},
            "spec": {"targetRef": {"name": "nope"}, "from": [{"kind": "TrustDomain"}]},
        },
    )
    kube.create(routes, route({"v1": 100, "v2": 0}))
    identities = {
        "buyer": spiffe(buyers, "buyer"),
        "shop-v1": spiffe(shop, "shop-v1"),
        "shop-v2": spiffe(shop, "shop-v2"),
    }

    netns = Netns(ip, iptables, "-kube")
    envoys: list[EnvoyProcess] = []
    app: RecordingApp | None = None
    try:
        # Pod and Service addresses are local inside the namespace (and nowhere else).
        for cidr in ("10.244.0.0/16", "10.96.0.0/16"):
            netns.exec(ip, "route", "add", "local", cidr, "dev", "lo")
        with short_tempdir("mca-kpol-") as root:
            meshca("init", "--data-dir", str(root / "data"))
            args = ["--kubernetes", "--kubeconfig", str(kube.kubeconfig), "--log-level", "info"]
            for identity in identities.values():
                args += ["--uds-identity", f"0={identity}"]
            with serving(root, root / "data", *args) as server:
                app = netns.run(RecordingApp, "127.0.0.1", PORT, b"shop")
                for name, identity in identities.items():
                    workload = () if name == "buyer" else ("--workload", f"{shop}/{name}")
                    bootstrap = meshca(
                        *("bootstrap", identity, "--server", f"unix://{server.uds}"),
                        *("--ads", "--capture", "explicit", *workload),
                    )
                    envoys.append(EnvoyProcess(bootstrap, root, name))
                    netns.run(envoys[-1].start)

                def buy() -> tuple[int, str]:
                    return netns.run(
                        lambda: http_get(PORT, address=cluster_ip, host=f"shop.{shop}")
                    )

                def shares(count: int = 20) -> Counter[str]:
                    seen: Counter[str] = Counter()
                    for _ in range(count):
                        status, body = buy()
                        assert status == 200, (status, body)
                        seen[served_by(app)] += 1
                    return seen

                # 100/0: every request to the Service reaches v1, from buyer's identity.
                eventually(lambda: buy()[0] == 200, "buyer -> shop through its Envoy")
                assert shares() == Counter({"shop-v1": 20})
                assert set(app.callers()) == {identities["buyer"]}

                # The weights change in the API server: live traffic follows, no restart.
                kube.patch(f"{routes}/shop-split", {"spec": route({"v1": 0, "v2": 100})["spec"]})
                eventually(lambda: shares(5) == Counter({"shop-v2": 5}), "traffic moved to v2")
                assert shares() == Counter({"shop-v2": 20})

                # What meshca wrote back: the route applied, the policy without a target not.
                def parents() -> list[dict[str, Any]]:
                    return kube.get(f"{routes}/shop-split").get("status", {}).get("parents", [])

                eventually(
                    lambda: (
                        [c["observedGeneration"] for p in parents() for c in p["conditions"]]
                        == [2, 2]
                    ),
                    "the route's status names its current generation",
                )
                assert parents()[0]["conditions"][0]["message"] == (
                    f"splits {shop}/shop: shop-v1=0, shop-v2=100"
                )
                ghost = eventually(
                    lambda: kube.get(f"{policies}/ghost").get("status", {}).get("conditions"),
                    "the refused policy's status",
                )
                assert (ghost[0]["status"], ghost[0]["reason"]) == ("False", "TargetNotFound")
                assert f"AccessPolicy {shop}/ghost not applied" in server.log()

                # Straight to v2's Envoy with an identity no policy lists: RBAC refuses
                # it; buyer's own identity, the same way, is admitted.
                for account in ("thief", "buyer"):
                    meshca(
                        *("issue", spiffe(buyers, account), "--data-dir", str(root / "data")),
                        *("--out", str(root / account)),
                    )
                assert mtls_status(netns, PODS["v2"], root / "thief") == 403
                assert mtls_status(netns, PODS["v2"], root / "buyer") == 200

                # The policy goes: buyer's Envoy loses its route to shop.
                kube.delete(f"{policies}/buyers")
                eventually(lambda: buy()[0] != 200, "buyer refused once its policy is gone")
                assert mtls_status(netns, PODS["v2"], root / "buyer") == 403
                for envoy in envoys:
                    envoy.stop()
    finally:
        for envoy in envoys:
            envoy.stop()
        if app is not None:
            app.close()
        netns.delete()
