"""The API server's answers about service-account tokens and their pods, for
``meshca.attest.kube_tokens``: a TokenReview, a Pod by name, the Pods of a service
account on a node, over the same client as the mesh source (``client.KubeApi``).

A transport failure, a timeout or a 5xx answer is KubeUnavailable: the question was not
answered, and nothing is decided from it. So is a 401/403 (meshca's own credentials or
ClusterRole are wrong), with a message naming the permissions it needs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import httpx2 as httpx

from meshca.attest.kube_tokens import KubeUnavailable, Pod, TokenReview
from meshca.kube.client import KubeApi, KubeApiError
from meshca.util.logs import shorten

TOKEN_REVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"


def _unavailable(what: str, exc: Exception) -> KubeUnavailable:
    if isinstance(exc, KubeApiError) and exc.status in (401, 403):
        return KubeUnavailable(
            f"the Kubernetes API server refused meshca {what} ({exc}); meshca's "
            "ClusterRole needs tokenreviews create and pods get, list"
        )
    if isinstance(exc, KubeApiError):
        return KubeUnavailable(f"the Kubernetes API server failed {what} ({exc})")
    detail = shorten(str(exc) or type(exc).__name__, 200)
    return KubeUnavailable(f"the Kubernetes API server is unreachable ({what}): {detail}")


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _pod(obj: Mapping[str, Any]) -> Pod:
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    return Pod(
        namespace=_text(meta.get("namespace")),
        name=_text(meta.get("name")),
        uid=_text(meta.get("uid")),
        service_account=_text(spec.get("serviceAccountName")) or "default",
        node_name=_text(spec.get("nodeName")),
        phase=_text(status.get("phase")),
    )


def _review(status: Mapping[str, Any]) -> TokenReview:
    user = status.get("user") or {}
    extra = user.get("extra") or {}
    return TokenReview(
        authenticated=status.get("authenticated") is True,
        username=_text(user.get("username")),
        audiences=tuple(a for a in status.get("audiences") or () if isinstance(a, str)),
        extra={
            k: tuple(v for v in values if isinstance(v, str))
            for k, values in extra.items()
            if isinstance(k, str) and isinstance(values, list)
        },
        error=_text(status.get("error")),
    )


class KubeIdentityApi:
    """:class:`meshca.attest.kube_tokens.KubeIdentityApi` over one :class:`KubeApi`."""

    def __init__(self, api: KubeApi) -> None:
        self.api = api

    async def close(self) -> None:
        await self.api.close()

    async def review_token(self, token: str, audiences: Sequence[str]) -> TokenReview:
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": list(audiences)},
        }
        try:
            answer = await self.api.create(TOKEN_REVIEWS, body)
        except (KubeApiError, httpx.HTTPError, OSError, ValueError) as exc:
            raise _unavailable("a TokenReview", exc) from None
        status = answer.get("status")
        if not isinstance(status, dict):
            return TokenReview(False, error="the TokenReview answer has no status")
        return _review(status)

    async def pod(self, namespace: str, name: str) -> Pod | None:
        try:
            return _pod(await self.api.get(f"/api/v1/namespaces/{namespace}/pods/{name}"))
        except KubeApiError as exc:
            if exc.status == 404:
                return None
            raise _unavailable("a Pod lookup", exc) from None
        except (httpx.HTTPError, OSError, ValueError) as exc:
            raise _unavailable("a Pod lookup", exc) from None

    async def pods_on_node(self, namespace: str, service_account: str, node: str) -> list[Pod]:
        selector = f"spec.nodeName={node},spec.serviceAccountName={service_account}"
        try:
            answer = await self.api.get(
                f"/api/v1/namespaces/{namespace}/pods", {"fieldSelector": selector}
            )
        except (KubeApiError, httpx.HTTPError, OSError, ValueError) as exc:
            raise _unavailable("a Pod list", exc) from None
        items = answer.get("items")
        return [_pod(p) for p in items if isinstance(p, dict)] if isinstance(items, list) else []
