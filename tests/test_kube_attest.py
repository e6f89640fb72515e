"""Agents and Istio proxies attest with projected service-account tokens, checked by a real
API server (TokenReview, the bound Pod): the right SPIFFE ID for an accepted token, and a
clear refusal, logged, for every token that must not buy one. meshca serve runs
in-process with the CSR API on loopback, reading the admin kubeconfig of the test
cluster; pods never run (there is no kubelet), so tokens are bound to Pod objects that
name their node."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from meshca.agent.ca_client import CaClient, CaRefused, CaUnavailable, Signed
from meshca.attest.entries import EntryStore
from meshca.attest.kube_tokens import ExpiringCache
from meshca.issuer.authority import workload_csr
from meshca.issuer.keys import generate_private_key, public_keys_equal
from meshca.spiffe import SpiffeId
from tests.ca_api_harness import CaApi, agent_for, ca_api
from tests.kube_harness import SA_ISSUER, KubeCluster
from tests.serve_harness import TD, kube_id, short_tempdir

pytestmark = pytest.mark.kube

K8S = "k8s"


@dataclass
class Cluster:
    """The test cluster as one test sees it: a workload namespace, a node-agent
    namespace (its ``ztunnel`` service account is the configured node agent), and meshca
    serve reading the API server."""

    kube: KubeCluster
    ns: str
    agents_ns: str
    api: CaApi
    root: Path

    def pod(self, name: str, account: str, node: str = "node-a", ns: str = "") -> dict[str, Any]:
        ns = ns or self.ns
        accounts = {
            item["metadata"]["name"]
            for item in self.kube.get(f"/api/v1/namespaces/{ns}/serviceaccounts")["items"]
        }
        if account not in accounts:
            self.kube.service_account(ns, account)
        return self.kube.pod(ns, name, service_account=account, node=node)

    def token(self, pod: dict[str, Any], audience: str = "meshca") -> str:
        meta, spec = pod["metadata"], pod["spec"]
        return self.kube.token(
            meta["namespace"], spec["serviceAccountName"], audience=audience, pod=pod
        )

    async def attest(self, token: str) -> tuple[CaClient, Signed]:
        client = self.api.client()
        signed = await asyncio.to_thread(client.attest, token, generate_private_key(), K8S)
        client.use(signed.svid, signed.bundle)
        return client, signed

    async def refused(self, token: str) -> CaRefused:
        with pytest.raises(CaRefused) as info:
            await self.attest(token)
        return info.value


@pytest.fixture
async def cluster(kube: KubeCluster, kube_namespaces: Callable[..., str]) -> AsyncIterator[Cluster]:
    ns = kube_namespaces("shop")
    agents_ns = kube_namespaces("agents")
    with short_tempdir() as root:
        async with ca_api(
            root,
            kubernetes=True,
            kubeconfig=kube.kubeconfig,
            kube_node_agents=(f"{agents_ns}/ztunnel",),
        ) as api:
            yield Cluster(kube, ns, agents_ns, api, root)


def csr_for(spiffe_id: SpiffeId) -> tuple[Any, bytes]:
    key = generate_private_key()
    return key, workload_csr(key, spiffe_id, ()).public_bytes(serialization.Encoding.DER)


async def test_a_pod_token_attests_a_sidecar_agent_for_exactly_its_service_account(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    web = kube_id(cluster.ns, "web")
    pod = cluster.pod("web-0", "web")
    token = cluster.token(pod)
    caplog.set_level(logging.INFO, "meshca")

    client, signed = await cluster.attest(token)

    agent_id = signed.svid.spiffe_id
    assert agent_id == SpiffeId.for_agent(TD, K8S, pod["metadata"]["uid"])
    assert signed.entitled == (web,)
    assert f"pod {cluster.ns}/web-0" in caplog.text
    # The agent's renewals end with the token's own life; it then attests again with the
    # token the kubelet has refreshed.
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert abs(signed.reattest_by.timestamp() - claims["exp"]) <= 1
    # It gets its own workload's CSR signed, for a key that never left it ...
    key, csr = csr_for(web)
    leaf = await asyncio.to_thread(client.sign, web, csr)
    assert leaf.svid.spiffe_id == web
    assert public_keys_equal(leaf.svid.leaf.public_key(), key.public_key())
    # ... and nothing else: another service account of the namespace is refused.
    other = kube_id(cluster.ns, "db")
    with pytest.raises(CaRefused) as info:
        await asyncio.to_thread(client.sign, other, csr_for(other)[1])
    assert info.value.code is grpc.StatusCode.PERMISSION_DENIED
    assert f"not entitled to {other}" in str(info.value)


async def test_tokens_that_must_not_attest_are_refused_with_a_clear_status_and_a_log_line(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "meshca")
    kube, ns = cluster.kube, cluster.ns

    # The wrong audience: a token for someone else is refused by the API server itself.
    web = cluster.pod("web-0", "web")
    wrong = await cluster.refused(cluster.token(web, audience="vault"))
    assert wrong.code is grpc.StatusCode.UNAUTHENTICATED
    assert "not for audience 'meshca'" in str(wrong)

    # A token of a service account that is bound to no pod (a legacy or hand-made one).
    kube.service_account(ns, "loose")
    unbound = await cluster.refused(kube.token(ns, "loose"))
    assert unbound.code is grpc.StatusCode.UNAUTHENTICATED
    assert "not bound to a pod" in str(unbound)

    # The pod was deleted: its token is refused at once, although a TokenReview of it was
    # answered a moment ago (the answer is cached, the pod is looked up every time).
    token = cluster.token(web)
    await cluster.attest(token)
    kube.delete(f"/api/v1/namespaces/{ns}/pods/web-0")
    deleted = await cluster.refused(token)
    assert deleted.code is grpc.StatusCode.UNAUTHENTICATED
    assert f"pod {ns}/web-0 no longer exists" in str(deleted)

    # ... and re-created under the same name: a new UID, so the old token is still refused.
    cluster.pod("web-0", "web")
    recreated = await cluster.refused(token)
    assert recreated.code is grpc.StatusCode.UNAUTHENTICATED
    assert "re-created" in str(recreated)

    # An expired token, signed with the cluster's own service-account key.
    db = cluster.pod("db-0", "db")
    expired = await cluster.refused(expired_token(kube, db))
    assert expired.code is grpc.StatusCode.UNAUTHENTICATED
    assert "refused by the API server" in str(expired)

    for refusal in (wrong, unbound, deleted, recreated, expired):
        assert str(refusal).split(": ", 1)[1][:60] in caplog.text
    assert cluster.api.server.agent_ca.refusals == 5


def expired_token(kube: KubeCluster, pod: dict[str, Any]) -> str:
    """A projected-style token for ``pod`` that expired a minute ago, signed with the
    cluster's service-account signing key (the API server's TokenRequest API will not
    make one that is already expired)."""
    meta, account = pod["metadata"], pod["spec"]["serviceAccountName"]
    sa = kube.get(f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{account}")
    now = int(time.time())
    claims = {
        "iss": SA_ISSUER,
        "sub": f"system:serviceaccount:{meta['namespace']}:{account}",
        "aud": ["meshca"],
        "iat": now - 700,
        "nbf": now - 700,
        "exp": now - 60,
        "kubernetes.io": {
            "namespace": meta["namespace"],
            "serviceaccount": {"name": account, "uid": sa["metadata"]["uid"]},
            "pod": {"name": meta["name"], "uid": meta["uid"]},
        },
    }
    key = serialization.load_pem_private_key(kube.sa_signing_key.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "ES256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    r, s = decode_dss_signature(key.sign(f"{header}.{body}".encode(), ec.ECDSA(hashes.SHA256())))
    return f"{header}.{body}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


async def test_a_node_agent_obtains_only_identities_of_pods_on_its_own_node(
    cluster: Cluster,
) -> None:
    ns = cluster.ns
    web, db = kube_id(ns, "web"), kube_id(ns, "db")
    cluster.pod("web-0", "web", node="node-a")
    cluster.pod("db-0", "db", node="node-b")
    agent_pod = cluster.pod("ztunnel-a", "ztunnel", node="node-a", ns=cluster.agents_ns)
    client, signed = await cluster.attest(cluster.token(agent_pod))
    agent_id = signed.svid.spiffe_id
    assert agent_id == SpiffeId.for_agent(TD, K8S, "node.node-a")
    entries = EntryStore(cluster.api.server.config.data_dir)
    for identity in (web, db):
        entries.create(identity, agent_id, ["unix:uid:1000"])

    state = await asyncio.to_thread(client.fetch_bundle)
    assert state.node and state.entitled == (web,)
    assert [e.spiffe_id for e in state.entries] == [web]
    assert (await asyncio.to_thread(client.sign, web, csr_for(web)[1])).svid.spiffe_id == web
    with pytest.raises(CaRefused) as info:
        await asyncio.to_thread(client.sign, db, csr_for(db)[1])
    assert info.value.code is grpc.StatusCode.PERMISSION_DENIED

    # A pod that is not a node agent gets no node mode, whatever node it is on.
    sidecar = cluster.pod("other-0", "other", node="node-a")
    _, plain = await cluster.attest(cluster.token(sidecar))
    assert plain.entitled == (kube_id(ns, "other"),)


async def test_api_server_down_is_unavailable_and_agents_keep_serving_cached_svids(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    from spiffe import WorkloadApiClient

    web = kube_id(cluster.ns, "web")
    token = cluster.token(cluster.pod("web-0", "web"))
    (cluster.root / "web.token").write_text(token)
    async with agent_for(
        cluster.api, cluster.root, None, name="web", token=token, attestor=K8S
    ) as agent:
        assert agent.identity == web
        await asyncio.wait_for(agent.store.svid(web), 30)
        kube = cluster.kube
        assert kube.apiserver is not None
        verifier = cluster.api.server.kube_tokens
        assert verifier is not None
        verifier.timeout = 1.0
        # A hung API server (stopped, its socket open): the call times out, UNAVAILABLE.
        os.kill(kube.apiserver.pid, signal.SIGSTOP)
        try:
            hung = cluster.api.client()
            with pytest.raises(CaUnavailable) as info:
                await asyncio.to_thread(hung.attest, token, generate_private_key(), K8S)
            assert "did not answer a Pod lookup within 1s" in str(info.value)
        finally:
            os.kill(kube.apiserver.pid, signal.SIGCONT)
        kube.stop_apiserver()
        try:
            # A new attestation cannot be decided: UNAVAILABLE, retried by the agent, and
            # the server goes on serving everything else.
            other = cluster.api.client()
            with pytest.raises(CaUnavailable):
                await asyncio.to_thread(other.attest, token, generate_private_key(), K8S)
            assert "Kubernetes API server is unreachable" in caplog.text
            # The attested agent keeps serving its workload's SVID to a Workload API client.
            socket = f"unix://{agent.config.socket}"
            with WorkloadApiClient(socket) as workload:
                svid = await asyncio.to_thread(workload.fetch_x509_svid)
            assert str(svid.spiffe_id) == str(web)
        finally:
            kube.start_apiserver()
        _, again = await cluster.attest(token)
        assert again.entitled == (web,)


def test_the_token_review_cache_is_bounded_and_entries_end() -> None:
    cache = ExpiringCache(3)
    for n in range(5):
        cache.put(str(n), n, 60)
    assert len(cache) == 3 and cache.get("0") is None and cache.get("4") == 4
    cache.get("2")  # used: kept over the least recently used
    cache.put("5", 5, 60)
    assert cache.get("2") == 2 and cache.get("3") is None
    cache.put("gone", 1, 0)  # a token that has already expired is never held
    assert cache.get("gone") is None
