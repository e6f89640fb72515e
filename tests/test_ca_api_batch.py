"""``BatchSignWorkload``: several workload CSRs in one call, each authorized, checked and
answered on its own, so one refused entry does not fail the others; the batch itself is
bounded (entries and bytes) and needs a current agent SVID (real gRPC over loopback)."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

from meshca.agent.ca_client import CaClient, CaRefused, Signed
from meshca.ca_api.service import MAX_BATCH
from meshca.issuer.authority import workload_csr
from meshca.issuer.keys import PrivateKey, generate_private_key, public_keys_equal
from meshca.spiffe import SpiffeId
from tests.ca_api_harness import CaApi, ca_api
from tests.serve_harness import client_svid, kube_id, short_tempdir

WORKLOAD = kube_id("shop", "web")
OTHER = kube_id("shop", "db")


def csr_for(key: PrivateKey, spiffe_id: SpiffeId, dns: tuple[str, ...] = ()) -> bytes:
    return workload_csr(key, spiffe_id, dns).public_bytes(serialization.Encoding.DER)


@pytest.fixture
async def api() -> CaApi:  # type: ignore[misc]
    with short_tempdir() as root:
        async with ca_api(root) as running:
            yield running


async def test_one_refused_entry_does_not_fail_the_others(
    api: CaApi, caplog: pytest.LogCaptureFixture
) -> None:
    client, _ = await api.attested(WORKLOAD)
    first, last = generate_private_key(), generate_private_key()
    batch: list[tuple[SpiffeId, bytes, timedelta | None]] = [
        (WORKLOAD, csr_for(first, WORKLOAD), None),
        (OTHER, csr_for(generate_private_key(), OTHER), None),  # not this agent's
        (WORKLOAD, b"not a CSR", None),
        (WORKLOAD, csr_for(generate_private_key(), WORKLOAD, ("evil.example",)), None),
        (WORKLOAD, csr_for(last, WORKLOAD), timedelta(minutes=10)),
    ]
    with caplog.at_level(logging.WARNING, logger="meshca.ca_api"):
        answers = await asyncio.to_thread(client.sign_batch, batch)
    assert len(answers) == len(batch)
    signed_first, not_entitled, unreadable, extra_san, signed_last = answers
    for answer, key in ((signed_first, first), (signed_last, last)):
        assert isinstance(answer, Signed) and answer.svid.spiffe_id == WORKLOAD
        assert public_keys_equal(answer.svid.leaf.public_key(), key.public_key())
    assert isinstance(signed_last, Signed)
    life = signed_last.svid.not_after - signed_last.svid.not_before
    assert life <= timedelta(minutes=11)  # its own TTL, not the batch's first
    assert isinstance(not_entitled, CaRefused)
    assert not_entitled.code is grpc.StatusCode.PERMISSION_DENIED
    assert f"not entitled to {OTHER}" in str(not_entitled)
    assert any(f"not entitled to {OTHER}" in r.getMessage() for r in caplog.records)
    for refusal, needle in ((unreadable, "cannot read CSR"), (extra_san, "names more than")):
        assert isinstance(refusal, CaRefused)
        assert refusal.code is grpc.StatusCode.INVALID_ARGUMENT and needle in str(refusal)
    assert api.server.agent_ca.refusals == 3
    # Nothing is lost: the agent signs again, one CSR or a batch.
    again = await asyncio.to_thread(client.sign, WORKLOAD, csr_for(first, WORKLOAD))
    assert again.svid.spiffe_id == WORKLOAD


async def test_a_batch_is_bounded_in_entries_and_bytes(api: CaApi) -> None:
    client, _ = await api.attested(WORKLOAD)
    csr = csr_for(generate_private_key(), WORKLOAD)
    full = await asyncio.to_thread(client.sign_batch, [(WORKLOAD, csr, None)] * MAX_BATCH)
    assert all(isinstance(a, Signed) for a in full)
    assert len({a.svid.serial for a in full if isinstance(a, Signed)}) == MAX_BATCH
    too_many = [(WORKLOAD, csr, None)] * (MAX_BATCH + 1)
    too_large = [(WORKLOAD, b"\x30" * 20_000, None)] * MAX_BATCH  # 1.28 MB of CSRs
    for batch in (too_many, too_large, []):
        with pytest.raises(CaRefused) as info:
            await asyncio.to_thread(client.sign_batch, batch)
        assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
        assert f"1 to {MAX_BATCH} CSRs" in str(info.value)


async def test_a_stolen_workload_svid_gets_no_batch_signed(api: CaApi) -> None:
    await api.attested(WORKLOAD)
    thief = CaClient(api.address, api.server.trust_domain, api.server.store.bundle())
    thief.use(client_svid(api.server, WORKLOAD))
    batch = [(WORKLOAD, csr_for(generate_private_key(), WORKLOAD), None)]
    with pytest.raises(CaRefused) as info:
        await asyncio.to_thread(thief.sign_batch, batch)
    assert info.value.code is grpc.StatusCode.PERMISSION_DENIED
    assert "workload SVID" in str(info.value)
