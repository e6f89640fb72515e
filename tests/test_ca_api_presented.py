"""The CSR API reads an agent's client certificate once per certificate, not once per
call; what changes with time is still checked on every call: an agent evicted, or a
certificate past its validity on a connection opened while it was valid, is refused at
its next call though its certificate is cached (real gRPC over loopback)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

from meshca.agent.ca_client import CaRefused
from meshca.ca_api.presented import PresentedCertificates
from meshca.cli.main import main
from meshca.issuer.authority import workload_csr
from meshca.issuer.errors import SvidError
from meshca.issuer.keys import generate_private_key
from tests.ca_api_harness import CaApi, ca_api
from tests.serve_harness import client_svid, kube_id, short_tempdir

WORKLOAD = kube_id("shop", "web")


def csr() -> bytes:
    key = generate_private_key()
    return workload_csr(key, WORKLOAD, ()).public_bytes(serialization.Encoding.DER)


@pytest.fixture
async def api() -> CaApi:  # type: ignore[misc]
    with short_tempdir() as root:
        async with ca_api(root) as running:
            yield running


async def test_an_evicted_agent_is_refused_though_its_certificate_is_cached(api: CaApi) -> None:
    client, signed = await api.attested(WORKLOAD)
    await asyncio.to_thread(client.sign, WORKLOAD, csr())
    pem = signed.svid.leaf.public_bytes(serialization.Encoding.PEM)
    cache = api.server.agent_ca.presented
    assert cache.read(pem) is cache.read(pem)  # held: the call above read it
    data_dir = str(api.server.config.data_dir)
    assert main(["agent-admin", "evict", str(signed.svid.spiffe_id), "--data-dir", data_dir]) == 0
    for call, args in ((client.sign, (WORKLOAD, csr())), (client.sign_batch, ([],))):
        with pytest.raises(CaRefused) as info:
            await asyncio.to_thread(call, *args)
        assert info.value.code is grpc.StatusCode.PERMISSION_DENIED
        assert "not attested" in str(info.value)


async def test_a_cached_certificate_past_its_validity_is_refused(api: CaApi) -> None:
    """The connection was opened (and TLS checked the certificate) while it was valid;
    the next call after its NotAfter is refused on that same connection."""
    client, signed = await api.attested(WORKLOAD)
    await asyncio.to_thread(client.sign, WORKLOAD, csr())
    servicer = api.server.agent_ca
    expired_at = signed.svid.not_after
    servicer.clock = lambda: expired_at + timedelta(seconds=1)
    with pytest.raises(CaRefused) as info:
        await asyncio.to_thread(client.sign, WORKLOAD, csr())
    assert info.value.code is grpc.StatusCode.UNAUTHENTICATED
    assert "not valid now" in str(info.value)
    servicer.clock = lambda: expired_at - timedelta(seconds=1)
    assert (await asyncio.to_thread(client.sign, WORKLOAD, csr())).svid.spiffe_id == WORKLOAD


async def test_the_cache_is_bounded_and_keeps_only_svids(api: CaApi) -> None:
    cache = PresentedCertificates(max_entries=2)
    pems = [
        client_svid(api.server, WORKLOAD).leaf.public_bytes(serialization.Encoding.PEM)
        for _ in range(3)
    ]
    first = cache.read(pems[0])
    assert first.spiffe_id == WORKLOAD
    cache.read(pems[1])
    cache.read(pems[2])
    assert len(cache) == 2
    assert cache.read(pems[0]) is not first  # the least recently presented was dropped
    # A CA certificate is no SVID: refused, and not kept.
    root = next(iter(api.server.store.bundle())).public_bytes(serialization.Encoding.PEM)
    for _ in range(2):
        with pytest.raises(SvidError):
            cache.read(root)
    assert len(cache) == 2
