"""Istio's CA API on meshca serve: ``istio.v1.auth.IstioCertificateService/
CreateCertificate``, called by two clients that share nothing with meshca, each in a
process of its own: one generated from Istio's published proto (Python), and the Go client
Istio itself links (``istio.io/api``, built by ``make istio-client``), authenticated the
way istio-agent and ztunnel are: a projected service-account token in ``authorization``
metadata, checked by a real API server."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshca.issuer import TrustBundle, X509Svid
from meshca.issuer.keys import public_keys_equal
from meshca.issuer.svid import spiffe_id_of
from tests.ca_api_harness import CaApi, ca_api
from tests.kube_harness import KubeCluster
from tests.serve_harness import TD, kube_id, short_tempdir
from tests.svid_checks import assert_openssl_accepts

pytestmark = pytest.mark.kube

CLIENT = Path(__file__).resolve().parent / "istio_client"


def go_client() -> Path:
    """Where ``tests/istio_client/go/build.sh`` puts Istio's Go client."""
    found = re.search(r"^\s*istio\.io/api (v\S+)", (CLIENT / "go" / "go.mod").read_text(), re.M)
    assert found, "tests/istio_client/go/go.mod requires no istio.io/api"
    cache = os.environ.get("MESHCA_ISTIO_CLIENT_CACHE") or str(
        Path.home() / ".cache" / "meshca" / f"istio-ca-client-{found.group(1)}"
    )
    return Path(cache) / "istio-ca-client"


@pytest.fixture(params=["python", "go"])
def client_command(request: pytest.FixtureRequest) -> list[str]:
    """The command of one client: the generated Python one, or Istio's Go client."""
    if request.param == "python":
        return [sys.executable, str(CLIENT / "create_certificate.py")]
    binary = go_client()
    if not os.access(binary, os.X_OK):
        pytest.skip(f"Istio's Go client is not built ({binary}): run `make istio-client`")
    return [str(binary)]


def istio_csr(key: ec.EllipticCurvePrivateKey, *uris: str) -> str:
    """A CSR as istio-agent makes one: an empty subject and the SPIFFE ID as a URI SAN."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=True,
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


@dataclass
class Istio:
    kube: KubeCluster
    ns: str
    agents_ns: str
    api: CaApi
    command: list[str]

    def token(self, name: str, account: str, node: str, ns: str = "") -> str:
        ns = ns or self.ns
        self.kube.service_account(ns, account)
        pod = self.kube.pod(ns, name, service_account=account, node=node)
        return self.kube.token(ns, account, pod=pod)

    async def create_certificate(self, *calls: dict[str, Any]) -> list[dict[str, Any]]:
        """Each call's result from the generated client: code, details, cert_chain (the
        client runs in a thread: meshca serve answers on this test's event loop)."""
        job = {
            "address": self.api.attest_address,
            "roots": self.api.server.store.bundle().pem().decode(),
            "calls": list(calls),
        }
        env = {**os.environ, "PYTHONPATH": str(CLIENT)}
        done = await asyncio.to_thread(
            subprocess.run,
            self.command,
            input=json.dumps(job),
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=True,
        )
        return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.fixture
async def istio(
    kube: KubeCluster, kube_namespaces: Callable[..., str], client_command: list[str]
) -> AsyncIterator[Istio]:
    ns = kube_namespaces("shop")
    agents_ns = kube_namespaces("istio-system")
    with short_tempdir() as root:
        async with ca_api(
            root,
            kube_tokens=True,  # the mesh from no source: only tokens are verified
            kubeconfig=kube.kubeconfig,
            kube_node_agents=(f"{agents_ns}/ztunnel",),
        ) as api:
            yield Istio(kube, ns, agents_ns, api, client_command)


def svid_of(chain_pem: list[str], key: ec.EllipticCurvePrivateKey) -> tuple[X509Svid, TrustBundle]:
    """Istio's answer: the leaf, its intermediates, and the roots as the last element."""
    certs = [x509.load_pem_x509_certificates(p.encode()) for p in chain_pem]
    chain = tuple(c for pem in certs[:-1] for c in pem)
    return X509Svid(spiffe_id_of(chain[0]), chain, key), TrustBundle.of(TD, certs[-1])


async def test_a_client_generated_from_istios_proto_gets_its_pods_certificate(
    istio: Istio, tmp_path: Path
) -> None:
    web = kube_id(istio.ns, "web")
    key = ec.generate_private_key(ec.SECP256R1())
    [answer] = await istio.create_certificate(
        {
            "token": istio.token("web-0", "web", "node-a"),
            "csr": istio_csr(key, str(web)),
            "validity": 3600,
            "metadata": {"ClusterID": "Kubernetes"},
        }
    )
    assert answer["code"] == "OK", answer
    svid, bundle = svid_of(answer["cert_chain"], key)
    assert svid.spiffe_id == web
    assert public_keys_equal(svid.leaf.public_key(), key.public_key())
    assert int((svid.not_after - svid.not_before).total_seconds()) <= 3600 + 120
    assert bundle == istio.api.server.store.bundle()
    assert_openssl_accepts(svid, bundle, tmp_path / "svid")


async def test_istio_callers_are_refused_what_their_token_does_not_entitle_them_to(
    istio: Istio, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "meshca")
    ns = istio.ns
    web, db = kube_id(ns, "web"), kube_id(ns, "db")
    web_token = istio.token("web-0", "web", "node-a")
    istio.token("db-0", "db", "node-b")
    ztunnel = istio.token("ztunnel-a", "ztunnel", "node-a", ns=istio.agents_ns)
    key = ec.generate_private_key(ec.SECP256R1())

    def call(token: str, *uris: str, **metadata: str) -> dict[str, Any]:
        return {"token": token, "csr": istio_csr(key, *uris), "metadata": metadata}

    results = await istio.create_certificate(
        call("", str(web)),  # no token
        call(web_token, str(db)),  # a CSR naming another service account
        call(web_token),  # a CSR naming nobody
        call(web_token, str(db), ImpersonatedIdentity=str(db)),  # not a node agent
        call(ztunnel, str(web), ImpersonatedIdentity=str(web)),  # a pod on its node
        call(ztunnel, str(db), ImpersonatedIdentity=str(db)),  # a pod on another node
        call("not-a-token", str(web)),
    )
    codes = [r["code"] for r in results]
    assert codes == [
        "UNAUTHENTICATED",
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        "PERMISSION_DENIED",
        "OK",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
    ], results
    assert "Bearer" in results[0]["details"]
    assert f"names more than {web}" in results[1]["details"]
    assert f"may obtain only {web}, not {db}" in results[3]["details"]
    impersonated, _ = svid_of(results[4]["cert_chain"], key)
    assert impersonated.spiffe_id == web
    assert (
        "no running pod with that identity is scheduled on its node 'node-a'"
        in (results[5]["details"])
    )
    for refused in (r for r in results if r["code"] != "OK"):
        assert refused["details"][:60] in caplog.text
