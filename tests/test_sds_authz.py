"""Who may obtain what, over real gRPC: mTLS on 127.0.0.1 and the SO_PEERCRED Unix socket.

The attacker here is an authenticated workload A trying to obtain workload B's private
key by every route the naming schemes and RPCs offer, or to pass for B via its node.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshca.envoy.mesh import Service
from meshca.issuer import X509Svid
from meshca.issuer.keys import private_key_pem
from meshca.issuer.profile import build_leaf
from meshca.spiffe import SpiffeId
from tests.sds_harness import (
    SdsHarness,
    Stream,
    delta,
    k8s,
    node,
    open_delta,
    open_sotw,
    sds_harness,
    secrets_of,
    sotw,
)

A = k8s("bookbuyer", "bookbuyer")
A2 = k8s("bookbuyer", "bookbuyer-batch")
B = k8s("bookstore", "bookstore-v1")
B_ISTIO_NODE = "sidecar~10.0.0.7~bookstore-v1-5d9f.bookstore~bookstore.svc.cluster.local"
A_ISTIO_NODE = "sidecar~10.0.0.8~bookbuyer-77.bookbuyer~bookbuyer.svc.cluster.local"

# (secret name, node.id): each asks for B's private key
ROUTES_TO_B_KEY = [
    ("service-cert:bookstore/bookstore-v1", None),
    (str(B), None),
    ("default", str(B)),
    ("default", B_ISTIO_NODE),
]
RPCS = ["stream", "delta", "fetch"]


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[SdsHarness]:
    async with sds_harness(tmp_path) as harness:
        yield harness


@pytest.fixture
async def h_uds(tmp_path: Path) -> AsyncIterator[SdsHarness]:
    async with sds_harness(tmp_path, uds=True, uid_identities={os.getuid(): [A]}) as harness:
        yield harness


async def call(stub: Any, rpc: str, names: list[str], node_id: str | None = None) -> Any:
    """Make one call; return the first response, or the gRPC error that ended it."""
    try:
        if rpc == "fetch":
            return await stub.FetchSecrets(sotw(names, node_id=node_id), timeout=10)
        if rpc == "stream":
            stream: Stream = await open_sotw(stub, sotw(names, node_id=node_id))
        else:
            stream = await open_delta(stub, delta(names, node_id=node_id))
        return await stream.recv()
    except grpc.aio.AioRpcError as exc:
        return exc


def assert_refused(result: Any, code: grpc.StatusCode, *fragments: str) -> str:
    assert isinstance(result, grpc.aio.AioRpcError), f"expected {code.name}, got a response"
    assert result.code() == code, result.details()
    details = result.details() or ""
    for fragment in fragments:
        assert fragment in details, f"{fragment!r} not in {details!r}"
    return details


@pytest.mark.parametrize("rpc", RPCS)
@pytest.mark.parametrize(("name", "node_id"), ROUTES_TO_B_KEY)
async def test_mtls_caller_cannot_obtain_another_identitys_key(
    h: SdsHarness, rpc: str, name: str, node_id: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    stub = h.stub(h.mtls_channel(A))
    result = await call(stub, rpc, [name], node_id)
    assert_refused(result, grpc.StatusCode.PERMISSION_DENIED, str(A), repr(name))
    assert h.store.cached(B) is None, "B's key must not even be generated"
    assert h.stats.refusals["PERMISSION_DENIED"] == 1
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert str(A) in logged and repr(name) in logged
    assert "PRIVATE KEY" not in logged


@pytest.mark.parametrize("rpc", RPCS)
@pytest.mark.parametrize(("name", "node_id"), ROUTES_TO_B_KEY)
async def test_unix_socket_caller_cannot_obtain_another_identitys_key(
    h_uds: SdsHarness, rpc: str, name: str, node_id: str | None
) -> None:
    stub = h_uds.stub(h_uds.uds_channel())
    result = await call(stub, rpc, [name], node_id)
    details = assert_refused(result, grpc.StatusCode.PERMISSION_DENIED, str(A), repr(name))
    assert f"uid={os.getuid()}" in details
    assert h_uds.store.cached(B) is None


@pytest.mark.parametrize("rpc", RPCS)
async def test_own_key_next_to_anothers_is_refused_whole(h: SdsHarness, rpc: str) -> None:
    """Never answered with the caller's own certificate instead, nor with part of it."""
    stub = h.stub(h.mtls_channel(A))
    result = await call(stub, rpc, ["service-cert:bookbuyer/bookbuyer", str(B)])
    assert_refused(result, grpc.StatusCode.PERMISSION_DENIED, str(B))


@pytest.mark.parametrize("rpc", ["stream", "delta"])  # a fetch has no running subscription
async def test_adding_anothers_key_to_a_running_stream_ends_it(h: SdsHarness, rpc: str) -> None:
    stub = h.stub(h.mtls_channel(A))
    own = "service-cert:bookbuyer/bookbuyer"
    if rpc == "stream":
        stream = await open_sotw(stub, sotw([own]))
        first = await stream.recv()
        await stream.send(sotw([own, str(B)], nonce=first.nonce, version=first.version_info))
    else:
        stream = await open_delta(stub, delta([own]))
        first = await stream.recv()
        await stream.send(delta([str(B)], nonce=first.nonce))
    assert_refused(await stream.error(), grpc.StatusCode.PERMISSION_DENIED, str(B))


@pytest.mark.parametrize("rpc", RPCS)
@pytest.mark.parametrize(
    "node_factory",
    [
        lambda: node(str(B)),
        lambda: node(B_ISTIO_NODE),
        lambda: node("envoy-1", NAMESPACE="bookstore"),
        lambda: node("envoy-1", SERVICE_ACCOUNT="bookstore-v1"),
        lambda: node("spiffe://cluster.local/ns/a b"),
        lambda: node("sidecar~10.0.0.7~pod.bookbuyer~bookstore.svc.cluster.local"),
        lambda: node(A_ISTIO_NODE, NAMESPACE="bookstore"),
    ],
    ids=[
        "spiffe",
        "istio",
        "meta-ns",
        "meta-sa",
        "bad-spiffe",
        "istio-inconsistent",
        "istio-meta-ns",
    ],
)
async def test_node_claiming_another_identity_is_refused_even_for_public_secrets(
    h: SdsHarness, rpc: str, node_factory: Callable[[], Any]
) -> None:
    stub = h.stub(h.mtls_channel(A))
    request = sotw(["ROOTCA"]) if rpc != "delta" else delta(["ROOTCA"])
    request.node.CopyFrom(node_factory())
    try:
        if rpc == "fetch":
            result: Any = await stub.FetchSecrets(request, timeout=10)
        elif rpc == "stream":
            result = await (await open_sotw(stub, request)).recv()
        else:
            result = await (await open_delta(stub, request)).recv()
    except grpc.aio.AioRpcError as exc:
        result = exc
    assert_refused(result, grpc.StatusCode.PERMISSION_DENIED, str(A), "'ROOTCA'")


@pytest.mark.parametrize("node_id", [str(A), "envoy-1", A_ISTIO_NODE])
async def test_nodes_consistent_with_the_caller_are_served(h: SdsHarness, node_id: str) -> None:
    stub = h.stub(h.mtls_channel(A))
    response = await (await open_sotw(stub, sotw(["default"], node_id=node_id))).recv()
    assert "default" in secrets_of(response)


async def test_bundles_are_public_and_a_services_identities_go_to_its_callers(
    h: SdsHarness,
) -> None:
    stub = h.stub(h.mtls_channel(A))
    names = ["root-cert-for-mtls-inbound:bookstore/bookstore-v1", "spiffe://cluster.local"]
    names.append("root-cert-for-mtls-outbound:bookstore/bookstore")  # a policy allows A
    response = await stub.FetchSecrets(sotw(names), timeout=10)
    secrets = secrets_of(response)
    assert set(secrets) == set(names)
    assert all(not s.HasField("tls_certificate") for s in secrets.values())
    # no policy lets A call bookbuyer: who serves it is not A's to know
    result = await call(stub, "fetch", ["root-cert-for-mtls-outbound:bookbuyer/bookbuyer"])
    assert_refused(result, grpc.StatusCode.PERMISSION_DENIED, "may not call service")


@pytest.mark.parametrize("rpc", RPCS)
async def test_caller_without_a_client_certificate_is_refused(h: SdsHarness, rpc: str) -> None:
    # on the mutual-TLS port the handshake itself fails
    result = await call(h.stub(h.tls_channel_without_certificate()), rpc, ["ROOTCA"])
    assert isinstance(result, grpc.aio.AioRpcError)
    assert result.code() == grpc.StatusCode.UNAVAILABLE
    # where no TLS layer stands in front (a plaintext listener), meshca itself refuses
    result = await call(h.stub(h.plaintext_channel()), rpc, ["ROOTCA"])
    assert_refused(result, grpc.StatusCode.UNAUTHENTICATED, "no client certificate")
    assert h.stats.auth_failures == 1


async def test_client_certificate_of_another_trust_domain_is_refused(h: SdsHarness) -> None:
    """Signed by our CA (so TLS accepts it) but naming a foreign trust domain."""
    key = ec.generate_private_key(ec.SECP256R1())
    foreign = SpiffeId.parse("spiffe://evil.example/ns/bookstore/sa/bookstore-v1")
    leaf = build_leaf(h.ca.signer, key.public_key(), foreign, timedelta(hours=1))
    svid = X509Svid(foreign, (leaf, *h.ca.signer.chain), key)
    stub = h.stub(h.mtls_channel(svid=svid))
    result = await call(stub, "fetch", [str(foreign)])
    assert_refused(result, grpc.StatusCode.UNAUTHENTICATED, "outside the trust domain")


async def test_client_certificate_without_a_spiffe_id_is_refused(h: SdsHarness) -> None:
    """Signed by our CA (so TLS accepts it) but not an X.509-SVID: no URI SAN."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    signer = h.ca.signer
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bookstore-v1")]))
        .issuer_name(signer.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(signer.key, hashes.SHA256())  # type: ignore[arg-type]
    )
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (leaf, *signer.chain))
    credentials = grpc.ssl_channel_credentials(h.bundle_pem, private_key_pem(key), chain)
    for rpc in RPCS:
        result = await call(h.stub(h.tls_channel(credentials)), rpc, ["ROOTCA"])
        assert_refused(result, grpc.StatusCode.UNAUTHENTICATED, "not an X.509-SVID")
    assert h.stats.auth_failures == len(RPCS)


async def test_unmapped_unix_socket_uid_gets_nothing(tmp_path: Path) -> None:
    others = {os.getuid() + 1: [A]}
    async with sds_harness(tmp_path, uds=True, uid_identities=others) as h:
        for rpc in RPCS:
            result = await call(h.stub(h.uds_channel()), rpc, ["ROOTCA"])
            assert_refused(
                result, grpc.StatusCode.UNAUTHENTICATED, f"uid={os.getuid()}", "not mapped"
            )


async def test_unix_socket_caller_obtains_its_own_key(h_uds: SdsHarness) -> None:
    stub = h_uds.stub(h_uds.uds_channel())
    response = await (await open_sotw(stub, sotw(["default", str(A)]))).recv()
    secrets = secrets_of(response)
    assert secrets["default"].tls_certificate == secrets[str(A)].tls_certificate


async def test_several_identities_per_uid_need_node_id_for_default(tmp_path: Path) -> None:
    async with sds_harness(tmp_path, uds=True, uid_identities={os.getuid(): [A, A2]}) as h:
        stub = h.stub(h.uds_channel())
        result = await call(stub, "stream", ["default"])
        assert_refused(result, grpc.StatusCode.PERMISSION_DENIED, "several identities")
        response = await (await open_sotw(stub, sotw(["default"], node_id=str(A2)))).recv()
        assert secrets_of(response)["default"].tls_certificate.certificate_chain.inline_bytes
        assert h.store.cached(A2) is not None and h.store.cached(A) is None
        both = await stub.FetchSecrets(sotw([str(A), "service-cert:bookbuyer/bookbuyer-batch"]))
        assert len(both.resources) == 2
        result = await call(stub, "fetch", [str(B)])
        assert_refused(result, grpc.StatusCode.PERMISSION_DENIED, str(B))


@pytest.mark.parametrize("rpc", RPCS)
@pytest.mark.parametrize(
    ("name", "code", "fragment"),
    [
        ("bogus-name", grpc.StatusCode.NOT_FOUND, "not a name of any known scheme"),
        ("service-cert:bookbuyer", grpc.StatusCode.INVALID_ARGUMENT, "expected service-cert"),
        ("spiffe://Cluster.local/x", grpc.StatusCode.INVALID_ARGUMENT, "lowercase"),
        ("spiffe://example.org", grpc.StatusCode.NOT_FOUND, "only the bundle of trust domain"),
        ("root-cert-for-mtls-outbound:ns/nope", grpc.StatusCode.NOT_FOUND, "not in the mesh"),
        ("root-cert-for-mtls-outbound:ops/empty", grpc.StatusCode.FAILED_PRECONDITION, "any"),
    ],
)
async def test_unknown_and_malformed_names_get_a_clear_error(
    tmp_path: Path, rpc: str, name: str, code: grpc.StatusCode, fragment: str
) -> None:
    services = [Service(name="empty", namespace="ops", ports=())]
    async with sds_harness(tmp_path, services=services) as h:
        result = await call(h.stub(h.mtls_channel(A)), rpc, [name])
        assert_refused(result, code, repr(name), fragment)


# gRPC refuses response metadata past 16 KB: a longer refusal would reach the caller as
# RESOURCE_EXHAUSTED instead of PERMISSION_DENIED.
GRPC_METADATA_LIMIT = 16 * 1024


@pytest.mark.parametrize("rpc", RPCS)
async def test_refusals_stay_small_for_a_uid_holding_thousands_of_identities(
    tmp_path: Path, rpc: str, caplog: pytest.LogCaptureFixture
) -> None:
    many = [k8s("fleet", f"workload-{i}") for i in range(2000)]
    async with sds_harness(tmp_path, uds=True, uid_identities={os.getuid(): many}) as h:
        stub = h.stub(h.uds_channel())
        caplog.set_level(logging.INFO)
        refused = await call(stub, rpc, [str(B)])
        details = assert_refused(refused, grpc.StatusCode.PERMISSION_DENIED, str(B), "1997 more")
        assert len(details) < 1024
        # 'default' with no node to choose: refused, and still small
        ambiguous = await call(stub, rpc, ["default"])
        details = assert_refused(ambiguous, grpc.StatusCode.PERMISSION_DENIED, "several")
        assert len(details) < 1024
        # a request naming thousands of secrets, from a node claiming someone else
        names = [f"service-cert:fleet/workload-{i}" for i in range(2000)]
        claimed = await call(stub, rpc, names, node_id=str(B))
        details = assert_refused(claimed, grpc.StatusCode.PERMISSION_DENIED, "1997 more")
        assert len(details) < GRPC_METADATA_LIMIT // 4
        assert max(len(r.getMessage()) for r in caplog.records) < 4096
        served = await call(stub, rpc, [str(many[1234])], node_id=str(many[1234]))
        assert not isinstance(served, grpc.aio.AioRpcError), served
        assert h.store.cached(many[1234]) is not None


async def test_the_node_is_checked_once_per_stream(
    h_uds: SdsHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    from meshca.xds import auth

    parsed: list[Any] = []
    original = auth.node_claims

    def counting(node: Any) -> auth.NodeClaims:
        parsed.append(node)
        return original(node)

    monkeypatch.setattr(auth, "node_claims", counting)
    stub = h_uds.stub(h_uds.uds_channel())
    stream = await open_sotw(stub, sotw(["default"], node_id=str(A)))
    first = await stream.recv()
    for names in (["default", "ROOTCA"], ["default", "ROOTCA", str(A)]):
        await stream.send(sotw(names, version=first.version_info, nonce=first.nonce))
        first = await stream.recv()
    assert secrets_of(first)["default"].tls_certificate.private_key.inline_bytes
    assert len(parsed) == 1
    stream.cancel()
