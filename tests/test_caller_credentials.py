"""What a client certificate buys over mutual TLS, and for how long (issue 11, items 1, 15).

The attacker holds a stolen SVID (or a bootstrap certificate from ``meshca issue``) and
its key. What it obtains never outlives that certificate; a stream it holds open ends
when the certificate expires or stops chaining to the trust bundle; connections are
re-established (and the certificate checked again) at a maximum age; a certificate whose
key the CSR policy would refuse authenticates nobody.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from envoy.service.secret.v3 import sds_pb2_grpc

from meshca.issuer import ActiveSigner, TrustBundle, X509Svid
from meshca.issuer.keys import generate_private_key
from meshca.issuer.profile import Signer, build_ca, build_leaf
from meshca.serve.server import MeshcaServer
from tests.sds_harness import Stream, sotw
from tests.serve_harness import (
    TD,
    client_svid,
    default_config,
    fetch,
    kube_id,
    make_data_dir,
    mtls_channel,
    served,
    short_tempdir,
    uds_channel,
)

pytestmark = pytest.mark.timeout(90)

A = kube_id("shop", "web")


@pytest.fixture
def root() -> Iterator[Path]:
    with short_tempdir() as path:
        make_data_dir(path)
        yield path


@pytest.fixture
async def server(root: Path) -> AsyncIterator[MeshcaServer]:
    async with served(default_config(root, uds_identities={os.getuid(): (A,)})) as running:
        yield running


def served_leaf(secret: object) -> x509.Certificate:
    chain = secret.tls_certificate.certificate_chain.inline_bytes  # type: ignore[attr-defined]
    return x509.load_pem_x509_certificates(chain)[0]


def as_svid(secret: object) -> X509Svid:
    """The served secret as a client credential (what an attacker who stole it holds)."""
    from meshca.issuer.keys import load_private_key_pem

    tls = secret.tls_certificate  # type: ignore[attr-defined]
    chain = tuple(x509.load_pem_x509_certificates(tls.certificate_chain.inline_bytes))
    return X509Svid(A, chain, load_private_key_pem(tls.private_key.inline_bytes))


async def test_a_stolen_svid_cannot_renew_itself_past_its_own_expiry(server: MeshcaServer) -> None:
    stolen = client_svid(server, A, ttl=timedelta(minutes=30))
    limit = stolen.not_after
    assert limit.tzinfo is not None
    credential = stolen
    for _ in range(3):  # each served SVID used to authenticate the next call
        async with mtls_channel(server, credential) as channel:
            [secret] = await fetch(channel, ["default"])
        leaf = served_leaf(secret)
        assert leaf.not_valid_after_utc <= limit  # the store's own SVID lives 24 h
        credential = as_svid(secret)
    # a Unix-socket caller (authenticated by the kernel on every connection) keeps the TTL
    async with uds_channel(server) as channel:
        [secret] = await fetch(channel, ["default"])
    assert served_leaf(secret).not_valid_after_utc - limit > timedelta(hours=20)


async def open_stream(channel: grpc.aio.Channel) -> Stream:
    stream = Stream(sds_pb2_grpc.SecretDiscoveryServiceStub(channel).StreamSecrets())
    await stream.send(sotw(["default"]))
    await stream.recv()
    return stream


async def test_a_stream_ends_when_its_client_certificate_expires(server: MeshcaServer) -> None:
    short = client_svid(server, A, ttl=timedelta(seconds=4))
    async with mtls_channel(server, short) as channel:
        stream = await open_stream(channel)
        error = await stream.error(timeout=30)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "expired" in (error.details() or "")


async def test_a_stream_ends_when_a_root_rotation_removes_its_root(server: MeshcaServer) -> None:
    client = client_svid(server, A)
    async with mtls_channel(server, client) as channel:
        stream = await open_stream(channel)
        # The last step of a root rotation: the new root signs, the old one leaves the bundle.
        new_root_key = generate_private_key()
        new_root = Signer(new_root_key, build_ca(TD, new_root_key, timedelta(days=3650)))
        authority = server.authority
        assert isinstance(authority, ActiveSigner)
        authority.activate(new_root, TrustBundle.of(TD, [new_root.certificate]))
        assert server.store.refresh_bundle()
        error = await stream.error(timeout=30)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "no longer chains to the trust bundle" in (error.details() or "")


async def test_connections_are_closed_at_their_maximum_age(root: Path) -> None:
    config = default_config(
        root,
        uds_identities={os.getuid(): (A,)},
        max_connection_age=timedelta(seconds=2),
        connection_age_grace=timedelta(seconds=1),
    )
    async with served(config) as server, mtls_channel(server, client_svid(server, A)) as channel:
        stream = await open_stream(channel)
        error = await stream.error(timeout=30)  # a stream never ends by itself
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        [secret] = await fetch(channel, ["default"])  # the client reconnects, re-checked
        assert served_leaf(secret)


@pytest.mark.parametrize("bits", [1024, 1536])
async def test_a_client_certificate_with_a_key_the_csr_policy_refuses_is_refused(
    server: MeshcaServer, bits: int
) -> None:
    authority = server.authority
    assert isinstance(authority, ActiveSigner)
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    leaf = build_leaf(authority.signer, key.public_key(), A, timedelta(hours=1))
    weak = X509Svid(A, (leaf, *authority.signer.chain), key)
    async with mtls_channel(server, weak) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await fetch(channel, ["default"])
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert f"RSA key of {bits} bits refused" in (refused.value.details() or "")
    assert server.store.cached(A) is None  # nothing was issued for it


async def test_the_credential_watch_lets_a_valid_stream_run(server: MeshcaServer) -> None:
    """The control: a long-lived client certificate keeps its stream."""
    async with mtls_channel(server, client_svid(server, A)) as channel:
        stream = await open_stream(channel)
        assert await stream.nothing_within(1.0)
        stream.cancel()
    await asyncio.sleep(0)
