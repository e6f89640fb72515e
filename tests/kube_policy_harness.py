"""The CRDs meshca's traffic policy needs, installed into the test API server from deploy/.

``install_crds(cluster)`` creates the AccessPolicy CRD and the vendored HTTPRoute CRD
(idempotent: the session's API server is shared by every test module) and waits until
the API server serves them. ``patch_status(cluster)`` is what ``meshca.kube.status``
writes through, as the admin.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from tests.kube_harness import KubeCluster, KubeError

REPO = Path(__file__).resolve().parent.parent
KUBE_DEPLOY = REPO / "deploy" / "kubernetes"
CRD_FILES = (
    KUBE_DEPLOY / "crds" / "meshca.io_accesspolicies.yaml",
    KUBE_DEPLOY / "gateway-api" / "gateway.networking.k8s.io_httproutes.yaml",
)
CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
ROUTES = "/apis/gateway.networking.k8s.io/v1/namespaces/{ns}/httproutes"
POLICIES = "/apis/meshca.io/v1alpha1/namespaces/{ns}/accesspolicies"


def install_crds(cluster: KubeCluster) -> None:
    for path in CRD_FILES:
        crd = yaml.safe_load(path.read_text())
        try:
            cluster.create(CRDS, crd)
        except KubeError as exc:
            if exc.reason != "AlreadyExists":
                raise
        deadline = time.monotonic() + 30
        while True:
            conditions = cluster.get(f"{CRDS}/{crd['metadata']['name']}").get("status", {})
            if any(
                c["type"] == "Established" and c["status"] == "True"
                for c in conditions.get("conditions") or []
            ):
                break
            assert time.monotonic() < deadline, f"{path.name} not established"
            time.sleep(0.1)


def patch_status(cluster: KubeCluster) -> Callable[[str, Mapping[str, Any]], Awaitable[object]]:
    async def patch(path: str, body: Mapping[str, Any]) -> object:
        return await asyncio.to_thread(
            cluster.request, "PATCH", path, body, content_type="application/merge-patch+json"
        )

    return patch
