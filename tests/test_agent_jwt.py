"""JWT-SVIDs: signed by meshca serve's ES256 key, fetched and validated through the
agent's Workload API with py-spiffe (JwtSource, WorkloadApiClient), published in the
SPIFFE bundle with ``use: jwt-svid``; forged, expired or misaddressed tokens refused."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from spiffe import JwtSource, WorkloadApiClient
from spiffe.errors import PySpiffeError
from spiffe.spiffe_id.spiffe_id import SpiffeId as PySpiffeId
from spiffe.svid.jwt_svid import JwtSvid

from meshca.agent.runtime import MeshcaAgent
from meshca.backends.jwt_key import load_jwt_signer
from meshca.cli.main import main
from meshca.issuer.jwt_svid import JwtError, JwtSigner, validate_jwt_svid
from meshca.spiffe import TrustDomain
from tests.ca_api_harness import CaApi, agent_for, ca_api
from tests.serve_harness import kube_id, short_tempdir

WORKLOAD = kube_id("shop", "web")
OTHER = kube_id("shop", "db")
TD = TrustDomain("cluster.local")


@pytest.fixture
async def running() -> AsyncIterator[tuple[CaApi, MeshcaAgent]]:
    with short_tempdir() as root:
        async with ca_api(root) as api, agent_for(api, root, WORKLOAD) as agent:
            yield api, agent


async def test_py_spiffe_fetches_and_validates_a_jwt_svid(
    running: tuple[CaApi, MeshcaAgent],
) -> None:
    api, agent = running
    endpoint = f"unix://{agent.config.socket}"
    source = await asyncio.to_thread(JwtSource, socket_path=endpoint, timeout_in_seconds=10)
    try:
        svid = await asyncio.to_thread(source.fetch_svid, {"orders"})
        assert str(svid.spiffe_id) == str(WORKLOAD) and svid.audience == {"orders"}
        # py-spiffe checks it itself, against the JWT bundle the agent streamed...
        bundle = source.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
        assert bundle is not None
        checked = JwtSvid.parse_and_validate(svid.token, bundle, {"orders"})
        assert str(checked.spiffe_id) == str(WORKLOAD)
        with pytest.raises(PySpiffeError):
            JwtSvid.parse_and_validate(svid.token, bundle, {"billing"})
    finally:
        await asyncio.to_thread(source.close)
    # ...and the agent's ValidateJWTSVID agrees, and refuses a forged signature.
    with WorkloadApiClient(endpoint) as client:
        valid = await asyncio.to_thread(client.validate_jwt_svid, svid.token, "orders")
        assert str(valid.spiffe_id) == str(WORKLOAD)
        head, body, signature = svid.token.split(".")
        claims = json.loads(base64.urlsafe_b64decode(body + "=="))
        claims["sub"] = str(OTHER)
        forged_body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=")
        forged = f"{head}.{forged_body.decode()}.{signature}"
        with pytest.raises(PySpiffeError):
            await asyncio.to_thread(client.validate_jwt_svid, forged, "orders")
        with pytest.raises(PySpiffeError):
            await asyncio.to_thread(client.validate_jwt_svid, svid.token, "billing")
        # Another identity's JWT-SVID is not the caller's to have.
        with pytest.raises(PySpiffeError):
            await asyncio.to_thread(client.fetch_jwt_svid, {"orders"}, PySpiffeId(str(OTHER)))
    # The key that signed it is meshca's, published with use: jwt-svid.
    signer = load_jwt_signer(api.server.config.data_dir)
    assert signer is not None and json.loads(base64.urlsafe_b64decode(head + "=="))["kid"] == (
        signer.kid
    )


async def test_a_jwt_svid_request_needs_an_audience(running: tuple[CaApi, MeshcaAgent]) -> None:
    from spiffe._proto import workload_pb2, workload_pb2_grpc

    _, agent = running
    async with grpc.aio.insecure_channel(f"unix:{agent.config.socket}") as channel:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        metadata = (("workload.spiffe.io", "true"),)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(), metadata=metadata, timeout=10)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["a"]), timeout=10)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # no security header


def test_the_spiffe_bundle_publishes_the_jwt_authority(
    running: tuple[CaApi, MeshcaAgent], capsys: pytest.CaptureFixture[str]
) -> None:
    api, _ = running
    assert main(["bundle", "--data-dir", str(api.server.config.data_dir), "--format", "jwks"]) == 0
    keys = json.loads(capsys.readouterr().out)["keys"]
    assert [k["use"] for k in keys] == ["x509-svid", "jwt-svid"]
    signer = load_jwt_signer(api.server.config.data_dir)
    assert signer is not None and keys[1]["kid"] == signer.kid and keys[1]["crv"] == "P-256"


def test_expired_and_unsigned_tokens_are_refused() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    signer = JwtSigner(ec.generate_private_key(ec.SECP256R1()))
    keys = {signer.kid: signer.key.public_key()}
    past = datetime.now(UTC) - timedelta(hours=1)
    token, _ = signer.sign(WORKLOAD, ["orders"], timedelta(minutes=5), now=past)
    with pytest.raises(JwtError, match="expired"):
        validate_jwt_svid(token, "orders", keys, TD)
    fresh, _ = signer.sign(WORKLOAD, ["orders"])
    _, body, _ = fresh.split(".")
    unsigned_head = base64.urlsafe_b64encode(b'{"alg":"none","kid":"x"}').rstrip(b"=").decode()
    with pytest.raises(JwtError, match="ES256"):
        validate_jwt_svid(f"{unsigned_head}.{body}.", "orders", keys, TD)
    with pytest.raises(JwtError, match="outside"):
        validate_jwt_svid(fresh, "orders", keys, TrustDomain("other.example"))
    assert validate_jwt_svid(fresh, "orders", keys, TD)[0] == WORKLOAD
