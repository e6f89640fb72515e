"""The xDS protocol over real gRPC (mTLS on 127.0.0.1, certificates from a real local CA):
versions, nonces, ACK/NACK, stale nonces, subscriptions, pushes on rotation, Delta."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import spiffe
from cryptography import x509
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2

from meshca.envoy.mesh import Mesh, Service
from meshca.issuer import IssuerError
from meshca.xds.engine import Resource, ResourceError
from meshca.xds.resources import CLUSTER_TYPE, ENDPOINT_TYPE
from tests.sds_harness import (
    DEFAULT_POLICIES,
    NO_WINDOW_GROWTH,
    TRUST_DOMAIN,
    SdsHarness,
    bodies,
    delta,
    k8s,
    open_delta,
    open_sotw,
    sds_harness,
    secrets_of,
    sotw,
    wait_until,
)

BUYER = k8s("bookbuyer", "bookbuyer")
BUYER_CERT = "service-cert:bookbuyer/bookbuyer"
OUTBOUND = "root-cert-for-mtls-outbound:bookstore/bookstore"


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[SdsHarness]:
    async with sds_harness(tmp_path) as harness:
        yield harness


def leaf_serial(secret: Any) -> int:
    chain = x509.load_pem_x509_certificates(secret.tls_certificate.certificate_chain.inline_bytes)
    return chain[0].serial_number


def total(counter: Any) -> int:
    return sum(counter.values())


async def test_sotw_first_response_serves_each_scheme_under_the_requested_name(
    h: SdsHarness,
) -> None:
    stub = h.stub(h.mtls_channel(BUYER))
    names = [BUYER_CERT, "default", "spiffe://cluster.local/ns/bookbuyer/sa/bookbuyer"]
    names += ["ROOTCA", "spiffe://cluster.local", OUTBOUND]
    names += ["root-cert-for-mtls-inbound:bookbuyer/bookbuyer"]
    stream = await open_sotw(stub, sotw(names, node_id="envoy-buyer"))
    response = await stream.recv()
    assert response.nonce and response.version_info
    assert response.type_url.endswith("envoy.extensions.transport_sockets.tls.v3.Secret")
    secrets = secrets_of(response)
    assert set(secrets) == set(names)
    for name in names[:3]:
        tls = secrets[name].tls_certificate
        # an independent parser agrees: the chain and key form a valid SVID for BUYER
        svid = spiffe.X509Svid.parse(
            tls.certificate_chain.inline_bytes, tls.private_key.inline_bytes
        )
        assert str(svid.spiffe_id) == str(BUYER)
    for name in names[3:]:
        context = secrets[name].validation_context
        assert context.trusted_ca.inline_bytes == h.bundle_pem
        bundle = spiffe.X509Bundle.parse(spiffe.TrustDomain("cluster.local"), h.bundle_pem)
        assert len(bundle.x509_authorities) == 1
    outbound = secrets[OUTBOUND].validation_context.match_typed_subject_alt_names
    assert [(m.san_type, m.matcher.exact) for m in outbound] == [
        (
            common_pb2.SubjectAltNameMatcher.URI,
            "spiffe://cluster.local/ns/bookstore/sa/bookstore-v1",
        ),
        (
            common_pb2.SubjectAltNameMatcher.URI,
            "spiffe://cluster.local/ns/bookstore/sa/bookstore-v2",
        ),
    ]
    assert not secrets["ROOTCA"].validation_context.match_typed_subject_alt_names


async def test_ack_is_not_answered_and_the_next_response_is_the_next_change(h: SdsHarness) -> None:
    stub = h.stub(h.mtls_channel(BUYER))
    stream = await open_sotw(stub, sotw([BUYER_CERT]))
    first = await stream.recv()
    await stream.send(sotw([BUYER_CERT], nonce=first.nonce, version=first.version_info))
    await wait_until(lambda: total(h.stats.acks) == 1, what="the ACK")
    h.servicer.resources_changed()  # recomputes the stream: same content, nothing to send
    await h.servicer.engine.wait_settled(timeout=10)
    renewed = await h.store.renew(BUYER)
    second = await stream.recv()  # a resend of the ACKed payload would arrive first
    assert leaf_serial(secrets_of(second)[BUYER_CERT]) == renewed.serial
    assert second.version_info != first.version_info
    assert second.nonce != first.nonce
    assert h.stats.ack_latency.count == 1


async def test_nack_is_counted_and_the_same_payload_is_not_sent_again(h: SdsHarness) -> None:
    stub = h.stub(h.mtls_channel(BUYER))
    stream = await open_sotw(stub, sotw([BUYER_CERT]))
    first = await stream.recv()
    await stream.send(sotw([BUYER_CERT], nonce=first.nonce, version="", error="bad key"))
    await wait_until(lambda: total(h.stats.nacks) == 1, what="the NACK")
    (rejected,) = h.servicer.engine.unsettled()  # a proxy that refused is not settled
    assert [t.nacked for t in rejected.types.values()] == [True]
    h.servicer.resources_changed()  # recomputes the stream: the rejected content again
    assert await stream.nothing_within(0.3)
    renewed = await h.store.renew(BUYER)
    second = await stream.recv()  # only changed content is sent after a NACK
    assert second.version_info != first.version_info
    assert leaf_serial(secrets_of(second)[BUYER_CERT]) == renewed.serial
    assert total(h.stats.acks) == 0


async def test_a_stream_whose_request_is_being_answered_is_not_settled(
    h: SdsHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Rotation waits judge "every connected proxy has ACKed" by the unsettled streams: a
    # proxy that (re)connected and whose first answer is still being resolved (its
    # certificate being issued) has ACKed nothing yet and must be waited for.
    resolving, release = asyncio.Event(), asyncio.Event()
    svid = h.store.svid

    async def slow_svid(identity: Any) -> Any:
        resolving.set()
        await release.wait()
        return await svid(identity)

    monkeypatch.setattr(h.store, "svid", slow_svid)
    engine = h.servicer.engine
    stub = h.stub(h.mtls_channel(BUYER))
    stream = await open_sotw(stub, sotw([BUYER_CERT]))
    await asyncio.wait_for(resolving.wait(), 10)
    assert [s.id for s in engine.unsettled()] == [s.id for s in engine.streams()]
    assert len(engine.streams()) == 1
    release.set()
    first = await stream.recv()
    assert len(engine.unsettled()) == 1  # sent, not yet ACKed
    await stream.send(sotw([BUYER_CERT], nonce=first.nonce, version=first.version_info))
    assert await engine.wait_settled(timeout=10) == []


async def test_stale_nonce_is_ignored(h: SdsHarness) -> None:
    stub = h.stub(h.mtls_channel(BUYER))
    stream = await open_sotw(stub, sotw([BUYER_CERT]))
    first = await stream.recv()
    await h.store.renew(BUYER)
    second = await stream.recv()
    inbound = "root-cert-for-mtls-inbound:bookbuyer/bookbuyer"
    # answers the first response, which is no longer the latest: ignored, names included
    await stream.send(sotw([BUYER_CERT, inbound], nonce=first.nonce, error="late"))
    await wait_until(lambda: total(h.stats.stale_nonces) == 1, what="the stale request")
    await stream.send(sotw([BUYER_CERT, "ROOTCA"], nonce=second.nonce))
    third = await stream.recv()
    assert set(secrets_of(third)) == {BUYER_CERT, "ROOTCA"}
    assert total(h.stats.nacks) == 0 and total(h.stats.acks) == 1


async def test_subscription_change_is_answered_with_every_subscribed_secret(h: SdsHarness) -> None:
    stub = h.stub(h.mtls_channel(BUYER))
    stream = await open_sotw(stub, sotw([BUYER_CERT]))
    first = await stream.recv()
    await stream.send(sotw([BUYER_CERT, "ROOTCA"], nonce=first.nonce, version=first.version_info))
    second = await stream.recv()
    assert set(secrets_of(second)) == {BUYER_CERT, "ROOTCA"}
    assert secrets_of(second)[BUYER_CERT] == secrets_of(first)[BUYER_CERT]
    # dropping a name needs no response; the next one is the rotation, without ROOTCA
    await stream.send(sotw([BUYER_CERT], nonce=second.nonce, version=second.version_info))
    await wait_until(lambda: total(h.stats.acks) == 2, what="the second ACK")
    renewed = await h.store.renew(BUYER)
    third = await stream.recv()
    assert set(secrets_of(third)) == {BUYER_CERT}
    assert leaf_serial(secrets_of(third)[BUYER_CERT]) == renewed.serial


async def test_unchanged_content_keeps_its_version_across_streams(h: SdsHarness) -> None:
    stub = h.stub(h.mtls_channel(BUYER))
    one = await open_sotw(stub, sotw([BUYER_CERT, "ROOTCA"]))
    two = await open_sotw(stub, sotw([BUYER_CERT, "ROOTCA"]))
    first, second = await one.recv(), await two.recv()
    assert first.version_info == second.version_info
    # a reconnecting proxy that already has this version gets no redundant response
    three = await open_sotw(stub, sotw([BUYER_CERT, "ROOTCA"], version=first.version_info))
    assert await three.nothing_within(0.3)
    renewed = await h.store.renew(BUYER)
    pushed = await three.recv()
    assert leaf_serial(secrets_of(pushed)[BUYER_CERT]) == renewed.serial


async def test_node_is_kept_from_the_first_request(h: SdsHarness) -> None:
    stub = h.stub(h.mtls_channel(BUYER))
    stream = await open_sotw(stub, sotw([BUYER_CERT], node_id=str(BUYER)))
    first = await stream.recv()
    await stream.send(sotw([BUYER_CERT, "ROOTCA"], nonce=first.nonce))  # no node: kept
    await stream.recv()
    (status,) = h.servicer.engine.streams()
    assert status.node_id == str(BUYER)


async def test_rotation_reaches_every_watcher_while_one_stream_never_reads(h: SdsHarness) -> None:
    many = [f"root-cert-for-mtls-inbound:ns{i}/sa{i}" for i in range(200)]
    stuck_channel = h.mtls_channel(BUYER, options=NO_WINDOW_GROWTH)
    stuck = await open_sotw(h.stub(stuck_channel), sotw([BUYER_CERT, *many]))
    # its first response (about 180 KB) overflows the window of a client that never reads
    await wait_until(
        lambda: any(s.writing for s in h.servicer.engine.streams()), what="a blocked write"
    )
    (blocked,) = h.servicer.engine.streams()
    readers = []
    for _ in range(3):
        stub = h.stub(h.mtls_channel(BUYER))
        sotw_stream = await open_sotw(stub, sotw([BUYER_CERT]))
        delta_stream = await open_delta(stub, delta(["default"]))
        readers += [(sotw_stream, BUYER_CERT), (delta_stream, "default")]
    for stream, name in readers:
        assert name in secrets_of(await stream.recv())
    renewed = await h.store.renew(BUYER)
    for stream, name in readers:
        response = await stream.recv()
        assert leaf_serial(secrets_of(response)[name]) == renewed.serial
    still_blocked = [s for s in h.servicer.engine.streams() if s.writing]
    assert [s.id for s in still_blocked] == [blocked.id], "the stuck stream is still stuck"
    stuck.cancel()
    await wait_until(lambda: h.stats.active_streams == len(readers), what="the stuck stream to end")


async def test_wait_settled_reports_streams_until_they_ack(h: SdsHarness) -> None:
    stub = h.stub(h.mtls_channel(BUYER))
    stream = await open_sotw(stub, sotw(["ROOTCA"]))
    response = await stream.recv()
    laggards = await h.servicer.engine.wait_settled(timeout=0.2)
    assert [lag.caller.split(" ")[0] for lag in laggards] == [str(BUYER)]
    await stream.send(sotw(["ROOTCA"], nonce=response.nonce, version=response.version_info))
    assert await h.servicer.engine.wait_settled(timeout=10) == []


async def test_mesh_reload_pushes_changed_validation_contexts(h: SdsHarness) -> None:
    stub = h.stub(h.mtls_channel(BUYER))
    stream = await open_sotw(stub, sotw([OUTBOUND, BUYER_CERT]))
    first = await stream.recv()
    await stream.send(sotw([OUTBOUND, BUYER_CERT], nonce=first.nonce, version=first.version_info))
    h.set_mesh(
        Mesh(
            TRUST_DOMAIN,
            services=(
                Service(
                    name="bookstore",
                    namespace="bookstore",
                    ports=(),
                    service_accounts=("bookstore-v3",),
                ),
            ),
            policies=DEFAULT_POLICIES,
        )
    )
    second = await stream.recv()
    matchers = secrets_of(second)[OUTBOUND].validation_context.match_typed_subject_alt_names
    assert [m.matcher.exact for m in matchers] == [
        "spiffe://cluster.local/ns/bookstore/sa/bookstore-v3"
    ]
    # the SotW stream cannot remove a secret: a vanished service leaves the last one in place
    h.set_mesh(Mesh(TRUST_DOMAIN))
    await stream.send(sotw([OUTBOUND, BUYER_CERT], nonce=second.nonce, version=second.version_info))
    renewed = await h.store.renew(BUYER)
    third = await stream.recv()
    assert leaf_serial(secrets_of(third)[BUYER_CERT]) == renewed.serial
    assert secrets_of(third)[OUTBOUND] == secrets_of(second)[OUTBOUND]


async def test_delta_subscribe_unsubscribe_and_resubscribe(h: SdsHarness) -> None:
    stub = h.stub(h.mtls_channel(BUYER))
    stream = await open_delta(stub, delta([BUYER_CERT, "ROOTCA"]))
    first = await stream.recv()
    assert {r.name for r in first.resources} == {BUYER_CERT, "ROOTCA"}
    assert all(r.version for r in first.resources) and first.nonce
    await stream.send(delta(["default"], nonce=first.nonce))
    second = await stream.recv()
    assert [r.name for r in second.resources] == ["default"]  # only what was added
    await stream.send(delta(unsubscribe=["ROOTCA"], nonce=second.nonce))
    await wait_until(lambda: total(h.stats.acks) == 1, what="the ACK")
    await stream.send(delta(["ROOTCA"], nonce=second.nonce))  # forgotten, so sent again
    third = await stream.recv()
    assert [r.name for r in third.resources] == ["ROOTCA"]
    await stream.send(delta(nonce=third.nonce))
    renewed = await h.store.renew(BUYER)
    fourth = await stream.recv()
    assert {r.name for r in fourth.resources} == {BUYER_CERT, "default"}
    assert leaf_serial(secrets_of(fourth)["default"]) == renewed.serial
    assert not fourth.removed_resources


async def test_delta_initial_resource_versions_are_not_resent(h: SdsHarness) -> None:
    stub = h.stub(h.mtls_channel(BUYER))
    first_stream = await open_delta(stub, delta([BUYER_CERT, "ROOTCA"]))
    held = {r.name: r.version for r in (await first_stream.recv()).resources}
    initial = {BUYER_CERT: held[BUYER_CERT], "ROOTCA": "an-older-version"}
    stream = await open_delta(stub, delta([BUYER_CERT, "ROOTCA"], initial=initial))
    response = await stream.recv()
    assert [(r.name, r.version) for r in response.resources] == [("ROOTCA", held["ROOTCA"])]


async def test_delta_removes_a_secret_that_disappears(h: SdsHarness) -> None:
    stub = h.stub(h.mtls_channel(BUYER))
    stream = await open_delta(stub, delta([OUTBOUND, BUYER_CERT]))
    first = await stream.recv()
    await stream.send(delta(nonce=first.nonce))
    h.set_mesh(Mesh(TRUST_DOMAIN))
    second = await stream.recv()
    assert list(second.removed_resources) == [OUTBOUND]
    assert not second.resources


async def test_delta_nack_and_stale_nonce(h: SdsHarness) -> None:
    stub = h.stub(h.mtls_channel(BUYER))
    stream = await open_delta(stub, delta([BUYER_CERT]))
    first = await stream.recv()
    await h.store.renew(BUYER)
    second = await stream.recv()
    # a stale nonce is no NACK, but its subscription is applied (Delta never repeats it)
    await stream.send(delta(["ROOTCA"], nonce=first.nonce, error="late"))
    third = await stream.recv()
    assert [r.name for r in third.resources] == ["ROOTCA"]
    assert total(h.stats.stale_nonces) == 1 and total(h.stats.nacks) == 0
    await stream.send(delta(nonce=third.nonce, error="rejected"))
    await wait_until(lambda: total(h.stats.nacks) == 1, what="the NACK")
    assert await stream.nothing_within(0.3)
    assert second.nonce not in (first.nonce, third.nonce)


async def test_fetch_returns_the_named_secrets(h: SdsHarness) -> None:
    stub = h.stub(h.mtls_channel(BUYER))
    response = await stub.FetchSecrets(sotw([BUYER_CERT, OUTBOUND]), timeout=10)
    secrets = secrets_of(response)
    assert set(secrets) == {BUYER_CERT, OUTBOUND}
    again = await stub.FetchSecrets(sotw([BUYER_CERT, OUTBOUND]), timeout=10)
    assert again.version_info == response.version_info
    assert h.stats.fetches == 2


async def test_streams_retain_their_identities_in_the_store(h: SdsHarness) -> None:
    h.store.idle_ttl = timedelta(0)
    stub = h.stub(h.mtls_channel(BUYER))
    stream = await open_sotw(stub, sotw([BUYER_CERT]))
    await stream.recv()
    assert h.store.sweep_idle() == []  # watched: kept
    stream.cancel()
    await wait_until(lambda: h.stats.active_streams == 0, what="the stream to close")
    assert h.store.sweep_idle() == [BUYER]


async def refusal(
    h: SdsHarness, variant: str, names: list[str], type_url: str | None = None
) -> grpc.aio.AioRpcError:
    """The error that ends one ``variant`` call (sotw, delta or fetch) asking for ``names``."""
    stub = h.stub(h.mtls_channel(BUYER))
    request = delta(names) if variant == "delta" else sotw(names)
    if type_url is not None:
        request.type_url = type_url
    if variant == "fetch":
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.FetchSecrets(request, timeout=10)
        return caught.value
    stream = await (open_sotw if variant == "sotw" else open_delta)(stub, request)
    return await stream.error()


VARIANTS = ["sotw", "delta", "fetch"]


@pytest.mark.parametrize("variant", VARIANTS)
async def test_unknown_type_url_ends_the_stream(h: SdsHarness, variant: str) -> None:
    error = await refusal(h, variant, [BUYER_CERT], type_url=CLUSTER_TYPE)
    assert error.code().name == "INVALID_ARGUMENT"
    assert "envoy.config.cluster.v3.Cluster" in (error.details() or "")


@pytest.mark.parametrize("variant", VARIANTS)
async def test_more_names_than_allowed_are_refused_before_anything_is_issued(
    h: SdsHarness, variant: str
) -> None:
    h.servicer.engine.max_names = 2
    error = await refusal(h, variant, [BUYER_CERT, "ROOTCA", OUTBOUND])
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "2" in (error.details() or "")
    assert h.store.cached(BUYER) is None
    assert h.stats.refusals["RESOURCE_EXHAUSTED"] == 1


async def test_a_fetch_must_name_its_secrets(h: SdsHarness) -> None:
    error = await refusal(h, "fetch", [])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "resource_names" in (error.details() or "")


@pytest.mark.parametrize("variant", VARIANTS)
async def test_a_certificate_that_cannot_be_issued_is_unavailable(
    h: SdsHarness, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def failing(identity: Any) -> Any:
        raise IssuerError("the backend is down")

    monkeypatch.setattr(h.store, "svid", failing)
    error = await refusal(h, variant, [BUYER_CERT])
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    details = error.details() or ""
    assert f"cannot issue a certificate for {BUYER}: the CA's backend is unavailable" in details
    assert "the backend is down" not in details  # the backend's own words: the log only


async def test_a_stream_serves_many_concurrent_pushes_in_order(h: SdsHarness) -> None:
    stub = h.stub(h.mtls_channel(BUYER))
    stream = await open_sotw(stub, sotw([BUYER_CERT]))
    response = await stream.recv()
    for _ in range(3):
        await stream.send(sotw([BUYER_CERT], nonce=response.nonce, version=response.version_info))
        renewed = await h.store.renew(BUYER)
        response = await stream.recv()
        assert leaf_serial(secrets_of(response)[BUYER_CERT]) == renewed.serial
    await asyncio.sleep(0)


# --- ADS: the same engine, a second (wildcard) type on the same stream -------------------


class NamedSource:
    """A resource type whose names a test sets; a change wakes the streams that watch it."""

    type_url = ""
    wildcard = False

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.watchers: dict[int, Any] = {}

    def set(self, names: list[str], *, wake: bool = True) -> None:
        self.names = names
        if wake:
            for stream in self.watchers.values():
                stream.wake(self.type_url)

    def watch(self, stream: Any, names: frozenset[str] | None) -> None:
        self.watchers[stream.id] = stream

    def unwatch(self, stream: Any) -> None:
        self.watchers.pop(stream.id, None)


class ClusterSource(NamedSource):
    """A wildcard type: what CDS looks like to the engine."""

    type_url = CLUSTER_TYPE
    wildcard = True

    async def resolve(self, caller: Any, node: Any, names: frozenset[str] | None) -> Any:
        wanted = self.names if names is None else [n for n in self.names if n in names]
        return {n: Resource.of(n, cluster_pb2.Cluster(name=n)) for n in wanted}


@pytest.fixture
async def ads(tmp_path: Path) -> AsyncIterator[tuple[SdsHarness, ClusterSource]]:
    clusters = ClusterSource(["bookstore-v1", "bookstore-v2"])
    async with sds_harness(tmp_path, ads_sources=[clusters]) as harness:
        yield harness, clusters


def cluster_names(response: Any) -> list[str]:
    return sorted(cluster_pb2.Cluster.FromString(body.value).name for body in bodies(response))


async def test_ads_sotw_serves_several_types_on_one_stream(
    ads: tuple[SdsHarness, ClusterSource],
) -> None:
    h, clusters = ads
    stub = h.ads_stub(h.mtls_channel(BUYER))
    stream = await open_sotw(stub, sotw([], type_url=CLUSTER_TYPE, node_id="envoy-buyer"))
    cds = await stream.recv()
    assert cds.type_url == CLUSTER_TYPE
    assert cluster_names(cds) == ["bookstore-v1", "bookstore-v2"]
    await stream.send(sotw([], type_url=CLUSTER_TYPE, nonce=cds.nonce, version=cds.version_info))
    await stream.send(sotw(["default"]))
    sds = await stream.recv()
    assert sds.type_url.endswith("Secret") and set(secrets_of(sds)) == {"default"}
    await stream.send(sotw(["default"], nonce=sds.nonce, version=sds.version_info))
    await wait_until(lambda: total(h.stats.acks) == 2, what="both ACKs")
    # a wildcard type deletes by omission
    clusters.set(["bookstore-v1"])
    update = await stream.recv()
    assert update.type_url == CLUSTER_TYPE and cluster_names(update) == ["bookstore-v1"]
    await stream.send(
        sotw([], type_url=CLUSTER_TYPE, nonce=update.nonce, version=update.version_info)
    )
    # both types changed at once: clusters go first (make before break)
    clusters.set(["bookstore-v1", "bookstore-v3"], wake=False)
    renewed = await h.store.renew(BUYER)
    h.ads_engine.wake_all()
    first, second = await stream.recv(), await stream.recv()
    assert first.type_url == CLUSTER_TYPE and second.type_url.endswith("Secret")
    assert leaf_serial(secrets_of(second)["default"]) == renewed.serial


async def test_ads_delta_removes_wildcard_resources(ads: tuple[SdsHarness, ClusterSource]) -> None:
    h, clusters = ads
    stub = h.ads_stub(h.mtls_channel(BUYER))
    stream = await open_delta(stub, delta(type_url=CLUSTER_TYPE))
    first = await stream.recv()
    assert cluster_names(first) == ["bookstore-v1", "bookstore-v2"]
    await stream.send(delta(type_url=CLUSTER_TYPE, nonce=first.nonce))
    clusters.set(["bookstore-v2"])
    second = await stream.recv()
    assert list(second.removed_resources) == ["bookstore-v1"] and not second.resources


# --- ADS: names that do not exist (yet) are absent, forbidden ones still refused ----------

FORBIDDEN = "bookwarehouse|forbidden"


class EndpointSource(NamedSource):
    """A named type: FORBIDDEN is PERMISSION_DENIED and any other unknown name NOT_FOUND
    (what EDS looks like to the engine)."""

    type_url = ENDPOINT_TYPE

    async def resolve(self, caller: Any, node: Any, names: frozenset[str] | None) -> Any:
        found: dict[str, Resource | ResourceError] = {}
        for name in names or ():
            if name == FORBIDDEN:
                found[name] = ResourceError(grpc.StatusCode.PERMISSION_DENIED, "not yours")
            elif name in self.names:
                found[name] = Resource.of(
                    name, endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
                )
            else:
                found[name] = ResourceError(grpc.StatusCode.NOT_FOUND, f"no {name!r}")
        return found


def assignment_names(response: Any) -> list[str]:
    return sorted(
        endpoint_pb2.ClusterLoadAssignment.FromString(body.value).cluster_name
        for body in bodies(response)
    )


@pytest.fixture
async def eds(tmp_path: Path) -> AsyncIterator[tuple[SdsHarness, EndpointSource]]:
    endpoints = EndpointSource(["bookstore-v1"])
    async with sds_harness(
        tmp_path, ads_sources=[endpoints], absent_types=[ENDPOINT_TYPE]
    ) as harness:
        yield harness, endpoints


async def test_ads_sotw_omits_unknown_names_until_they_exist(
    eds: tuple[SdsHarness, EndpointSource],
) -> None:
    h, endpoints = eds
    stub = h.ads_stub(h.mtls_channel(BUYER))
    names = ["bookstore-v1", "bookstore-v2"]
    stream = await open_sotw(stub, sotw(names, type_url=ENDPOINT_TYPE, node_id="envoy-buyer"))
    first = await stream.recv()
    assert assignment_names(first) == ["bookstore-v1"]
    await stream.send(
        sotw(names, type_url=ENDPOINT_TYPE, nonce=first.nonce, version=first.version_info)
    )
    # the stream lives on: other types are served, and the name arrives once it exists
    await stream.send(sotw(["default"]))
    assert set(secrets_of(await stream.recv())) == {"default"}
    endpoints.set(["bookstore-v1", "bookstore-v2"])
    second = await stream.recv()
    assert second.type_url == ENDPOINT_TYPE
    assert assignment_names(second) == ["bookstore-v1", "bookstore-v2"]
    assert h.stats.refusals == {}
    # a forbidden name still ends the stream
    await stream.send(
        sotw([*names, FORBIDDEN], type_url=ENDPOINT_TYPE, nonce=second.nonce, version="x")
    )
    assert (await stream.error()).code() == grpc.StatusCode.PERMISSION_DENIED


async def test_ads_delta_sends_unknown_names_once_they_exist_and_removes_them(
    eds: tuple[SdsHarness, EndpointSource],
) -> None:
    h, endpoints = eds
    stub = h.ads_stub(h.mtls_channel(BUYER))
    stream = await open_delta(stub, delta(["bookstore-v1", "bookstore-v2"], type_url=ENDPOINT_TYPE))
    first = await stream.recv()
    assert assignment_names(first) == ["bookstore-v1"] and not first.removed_resources
    await stream.send(delta(type_url=ENDPOINT_TYPE, nonce=first.nonce))
    endpoints.set(["bookstore-v2"])
    second = await stream.recv()
    assert assignment_names(second) == ["bookstore-v2"]
    assert list(second.removed_resources) == ["bookstore-v1"]
    await stream.send(delta([FORBIDDEN], type_url=ENDPOINT_TYPE, nonce=second.nonce))
    assert (await stream.error()).code() == grpc.StatusCode.PERMISSION_DENIED


async def test_without_the_option_an_unknown_name_ends_the_stream(tmp_path: Path) -> None:
    async with sds_harness(tmp_path, ads_sources=[EndpointSource([])]) as h:
        stub = h.ads_stub(h.mtls_channel(BUYER))
        stream = await open_sotw(stub, sotw(["bookstore-v2"], type_url=ENDPOINT_TYPE))
        error = await stream.error()
        assert error.code() == grpc.StatusCode.NOT_FOUND and "bookstore-v2" in str(error.details())
