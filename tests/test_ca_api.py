"""meshca serve's CSR API: join tokens for agent SVIDs, renewal with the agent SVID,
workload CSRs for entitled identities only, and every refusal (real gRPC over loopback)."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from meshca.agent.ca_client import CaClient, CaRefused, CaUnavailable, bare_csr
from meshca.attest.records import AGENTS_FILE
from meshca.attest.state_file import agents_dir
from meshca.ca_api import ca_pb2
from meshca.ca_api.rpc import AgentCaStub
from meshca.issuer.authority import workload_csr
from meshca.issuer.keys import generate_private_key, public_keys_equal
from meshca.spiffe import SpiffeId
from tests.ca_api_harness import CaApi, ca_api
from tests.serve_harness import client_svid, fetch, kube_id, mtls_channel, short_tempdir
from tests.svid_checks import assert_openssl_accepts

WORKLOAD = kube_id("shop", "web")
OTHER = kube_id("shop", "db")


def der(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.DER)


async def refused(call: object, *args: object) -> CaRefused:
    with pytest.raises(CaRefused) as info:
        await asyncio.to_thread(call, *args)  # type: ignore[arg-type]
    return info.value


@pytest.fixture
async def api() -> CaApi:  # type: ignore[misc]
    with short_tempdir() as root:
        async with ca_api(root) as running:
            yield running


async def test_a_join_token_buys_an_agent_svid_that_gets_workload_csrs_signed(
    api: CaApi, tmp_path: Path
) -> None:
    client, signed = await api.attested(WORKLOAD)
    agent_id = signed.svid.spiffe_id
    assert agent_id.is_agent and agent_id.path.startswith("/meshca/agent/join_token/")
    assert signed.entitled == (WORKLOAD,)
    assert_openssl_accepts(signed.svid, signed.bundle, tmp_path / "agent")
    # Renewal over mutual TLS with the agent SVID keeps the ID, with a new key.
    key = generate_private_key()
    renewed = await asyncio.to_thread(client.renew, key)
    assert renewed.svid.spiffe_id == agent_id and renewed.svid.serial != signed.svid.serial
    client.use(renewed.svid)
    # A workload key made by the agent: only its CSR travels, and the certificate is for it.
    workload_key = generate_private_key()
    csr = der(workload_csr(workload_key, WORKLOAD, ()))
    leaf = await asyncio.to_thread(client.sign, WORKLOAD, csr)
    assert leaf.svid.spiffe_id == WORKLOAD
    assert public_keys_equal(leaf.svid.leaf.public_key(), workload_key.public_key())
    assert_openssl_accepts(leaf.svid, leaf.bundle, tmp_path / "leaf")
    assert api.tokens.list() == []  # the token was spent


async def test_reused_expired_and_forged_join_tokens_are_refused(api: CaApi) -> None:
    client = api.client()
    token = api.token(WORKLOAD)
    await asyncio.to_thread(client.attest, token, generate_private_key())
    reused = await refused(client.attest, token, generate_private_key())
    assert reused.code is grpc.StatusCode.UNAUTHENTICATED and "already used" in str(reused)
    past = datetime.now(UTC) - timedelta(hours=2)
    expired_token, _ = api.tokens.create(WORKLOAD, ttl=timedelta(hours=1), now=past)
    expired = await refused(client.attest, expired_token, generate_private_key())
    assert expired.code is grpc.StatusCode.UNAUTHENTICATED
    forged = await refused(client.attest, "mca-jt-" + "A" * 43, generate_private_key())
    assert forged.code is grpc.StatusCode.UNAUTHENTICATED
    assert token not in str(reused) and expired_token not in str(expired)


def raw_attest(api: CaApi, token: str, csr: bytes) -> None:
    """AttestAgent with a CSR of the test's making (the client always sends a good one)."""
    credentials = grpc.ssl_channel_credentials(api.server.store.bundle().pem())
    with grpc.secure_channel(api.attest_address, credentials) as channel:
        stub = AgentCaStub(channel)
        try:
            stub.call(
                "AttestAgent",
                ca_pb2.AttestAgentRequest(attestor="join_token", evidence=token.encode(), csr=csr),
                timeout=10,
            )
        except grpc.RpcError as exc:
            raise CaRefused(exc.code(), exc.details() or "") from None


def ca_true_csr(key: ec.EllipticCurvePrivateKey) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    return der(builder.sign(key, hashes.SHA256()))


def broken_signature(csr: bytes) -> bytes:
    """The same CSR with one bit of its signature flipped: proof of possession fails."""
    return csr[:-3] + bytes([csr[-3] ^ 0x01]) + csr[-2:]


async def test_malformed_csrs_get_one_clear_invalid_argument(api: CaApi) -> None:
    client, signed = await api.attested(WORKLOAD)
    key = generate_private_key()
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    cases = {
        "cannot read CSR": b"not a CSR",
        "names more than": der(workload_csr(key, WORKLOAD, ("evil.example",))),
        "names more than ": der(workload_csr(key, OTHER, ())),
        "CA:true": ca_true_csr(key),
        "proof of possession": broken_signature(der(workload_csr(key, WORKLOAD, ()))),
        "at least 2048 bits": bare_csr(weak),
    }
    for needle, csr in cases.items():
        error = await refused(client.sign, WORKLOAD, csr)
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT, (needle, error)
        assert needle.strip() in str(error) and "\n" not in str(error), (needle, error)
    # At attestation too, and a refused CSR does not spend the token.
    token = api.token(WORKLOAD)
    for csr in (ca_true_csr(key), der(workload_csr(key, WORKLOAD, ())), b"\x30\x00"):
        with pytest.raises(CaRefused) as info:
            await asyncio.to_thread(raw_attest, api, token, csr)
        assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert await asyncio.to_thread(api.client().attest, token, generate_private_key())
    # Nothing issued before is lost: the agent still renews and signs.
    assert (await asyncio.to_thread(client.renew, generate_private_key())).svid.spiffe_id == (
        signed.svid.spiffe_id
    )


async def test_an_agent_gets_only_its_entitled_identity(
    api: CaApi, caplog: pytest.LogCaptureFixture
) -> None:
    client, _ = await api.attested(WORKLOAD)
    key = generate_private_key()
    with caplog.at_level(logging.WARNING, logger="meshca.ca_api"):
        error = await refused(client.sign, OTHER, der(workload_csr(key, OTHER, ())))
    assert error.code is grpc.StatusCode.PERMISSION_DENIED
    assert f"not entitled to {OTHER}" in str(error)
    assert any(f"not entitled to {OTHER}" in r.getMessage() for r in caplog.records)
    agent_path = SpiffeId.parse(f"spiffe://cluster.local/meshca/agent/join_token/{'0' * 16}")
    error = await refused(client.sign, agent_path, bare_csr(key))
    assert error.code is grpc.StatusCode.PERMISSION_DENIED


async def test_a_stolen_workload_svid_buys_nothing_at_the_csr_api(
    api: CaApi, caplog: pytest.LogCaptureFixture
) -> None:
    await api.attested(WORKLOAD)
    stolen = client_svid(api.server, WORKLOAD)  # the workload's own SVID, key and all
    thief = CaClient(api.address, api.server.trust_domain, api.server.store.bundle())
    thief.use(stolen)
    key = generate_private_key()
    with caplog.at_level(logging.WARNING, logger="meshca.ca_api"):
        for call, args in (
            (thief.sign, (WORKLOAD, der(workload_csr(key, WORKLOAD, ())))),
            (thief.renew, (key,)),
            (thief.fetch_bundle, ()),
        ):
            error = await refused(call, *args)
            assert error.code is grpc.StatusCode.PERMISSION_DENIED
            assert "workload SVID" in str(error)
    assert any("workload SVID" in r.getMessage() for r in caplog.records)
    # No client certificate at all (the attestation listener): unauthenticated.
    anonymous = CaClient(api.attest_address, api.server.trust_domain, api.server.store.bundle())
    anonymous.use(stolen)
    error = await refused(anonymous.sign, WORKLOAD, der(workload_csr(key, WORKLOAD, ())))
    assert error.code is grpc.StatusCode.UNAUTHENTICATED


async def test_agent_svids_are_refused_where_workloads_get_keys(api: CaApi) -> None:
    """An agent SVID is no workload credential: SDS refuses it."""
    _, signed = await api.attested(WORKLOAD)
    async with mtls_channel(api.server, signed.svid) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await fetch(channel, ["default"])
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "agent SVID" in (info.value.details() or "")


async def test_self_renewal_ends_at_the_maximum_age_set_at_attestation(api: CaApi) -> None:
    client, signed = await api.attested(WORKLOAD)
    assert signed.reattest_by - datetime.now(UTC) > timedelta(days=29)
    # The record, not the certificate, bounds the chain of renewals: move its end to now.
    path = agents_dir(api.server.config.data_dir) / AGENTS_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    records = json.loads(path.read_text())
    records[str(signed.svid.spiffe_id)]["reattest_by"] = int(datetime.now(UTC).timestamp())
    path.write_text(json.dumps(records))
    error = await refused(client.renew, generate_private_key())
    assert error.code is grpc.StatusCode.PERMISSION_DENIED and "attest again" in str(error)
    # Evicting the record (deleting it) has the same effect at once.
    path.write_text("{}")
    error = await refused(client.fetch_bundle)
    assert error.code is grpc.StatusCode.PERMISSION_DENIED and "not attested" in str(error)


async def test_a_backend_failure_reaches_the_agent_without_its_detail(
    api: CaApi, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Signing that fails inside the CA (here the issuer raises what a Vault outage raises,
    with an address and a token-like value in its wording) tells the agent UNAVAILABLE and
    nothing of the backend; the detail goes to the server log only."""
    from meshca.backends.errors import BackendUnavailable

    client, _ = await api.attested(WORKLOAD)
    detail = "vault: cannot reach http://10.1.2.3:8200 (token hvs.SECRETSECRET)"

    def outage(*args: object, **kwargs: object) -> object:
        raise BackendUnavailable(detail)

    monkeypatch.setattr(api.server.agent_ca.issuer, "sign_csr", outage)
    csr = der(workload_csr(generate_private_key(), WORKLOAD, ()))
    with caplog.at_level(logging.WARNING, logger="meshca"), pytest.raises(CaUnavailable) as info:
        await asyncio.to_thread(client.sign, WORKLOAD, csr)  # UNAVAILABLE: the agent retries
    refusal = info.value
    assert "backend is unavailable" in str(refusal)
    assert "10.1.2.3" not in str(refusal) and "SECRET" not in str(refusal)
    assert any("10.1.2.3" in r.getMessage() for r in caplog.records)
