"""One change pushed to many streams (a trust bundle to every proxy): the engine lets the
woken streams run a batch at a time, serializes a response the streams share once, and
keeps who is connected without recounting every stream. Each stream must still get the
change, with nonces fresh to it, and rotation must see every woken stream at once."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from meshca.issuer import ActiveSigner
from meshca.issuer.keys import generate_private_key
from meshca.issuer.profile import build_ca
from meshca.serve.engine_acks import EngineAcks
from meshca.util import gc_pause
from meshca.xds import engine as engine_module
from tests.sds_harness import (
    TRUST_DOMAIN,
    SdsHarness,
    Stream,
    k8s,
    open_sotw,
    sds_harness,
    sotw,
    wait_until,
)

BUYER = k8s("bookbuyer", "bookbuyer")
STORE = k8s("bookstore", "bookstore-v1")


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[SdsHarness]:
    async with sds_harness(tmp_path) as harness:
        yield harness


def change_bundle(h: SdsHarness, add_root: bool) -> None:
    """A new root joins the bundle (or the bundle goes back to the CA's own roots)."""
    authority = h.issuer.authority
    assert isinstance(authority, ActiveSigner)
    bundle = h.ca.bundle
    if add_root:
        key = generate_private_key()
        bundle = bundle.with_root(build_ca(TRUST_DOMAIN, key, timedelta(days=30)))
    authority.activate(authority.signer, bundle)
    assert h.store.refresh_bundle()


async def ack(stream: Stream, response: object) -> None:
    await stream.send(
        sotw(["ROOTCA"], nonce=response.nonce, version=response.version_info)  # type: ignore[attr-defined]
    )


async def test_a_change_reaches_streams_woken_a_batch_at_a_time(
    h: SdsHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_module, "WAKE_BATCH", 2)
    engine = h.servicer.engine
    stub = h.stub(h.mtls_channel(BUYER))
    streams = [await open_sotw(stub, sotw(["ROOTCA"])) for _ in range(7)]
    for stream in streams:
        await ack(stream, await stream.recv())
    assert await engine.wait_settled(timeout=10) == []

    change_bundle(h, add_root=True)
    # Rotation asks at once who has not acknowledged: every woken stream, including
    # those whose turn to run has not come yet.
    assert len(engine.unsettled()) == 7
    await engine.wait_pushed(timeout=10)
    pushed = [await stream.recv() for stream in streams]
    assert len({response.version_info for response in pushed}) == 1
    for stream, response in zip(streams, pushed, strict=True):
        await ack(stream, response)
    assert await engine.wait_settled(timeout=10) == []


async def test_streams_sent_one_change_share_it_and_each_sees_only_fresh_nonces(
    h: SdsHarness,
) -> None:
    stub = h.stub(h.mtls_channel(BUYER))
    one, two = await open_sotw(stub, sotw(["ROOTCA"])), await open_sotw(stub, sotw(["ROOTCA"]))
    seen: dict[Stream, list[str]] = {one: [], two: []}
    versions = []
    for add_root in (None, True, False, True):  # first answer, a new root, rollback, again
        if add_root is not None:
            change_bundle(h, add_root)
        responses = [await one.recv(), await two.recv()]
        # the same content: one response, serialized once, sent on both streams
        assert responses[0].SerializeToString() == responses[1].SerializeToString()
        versions.append(responses[0].version_info)
        for stream, response in zip((one, two), responses, strict=True):
            assert response.nonce not in seen[stream]
            seen[stream].append(response.nonce)
            await ack(stream, response)
        assert await h.servicer.engine.wait_settled(timeout=10) == []
    assert versions[0] == versions[2] != versions[1]  # the rollback is the first content
    assert sum(h.stats.acks.values()) == 8 and sum(h.stats.stale_nonces.values()) == 0

    # a late ACK of the first response (same content as now) is stale, not an ACK
    await one.send(sotw(["ROOTCA"], nonce=seen[one][0], version=versions[0]))
    await wait_until(lambda: sum(h.stats.stale_nonces.values()) == 1, what="the stale ACK")


async def test_a_shared_response_is_never_another_identitys_even_if_set_hashes_collide(
    h: SdsHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shared serialization is reused only for exactly the same resources: were two
    identities' secret sets ever to hash alike, each stream still gets its own secret."""
    monkeypatch.setattr(engine_module, "set_version", lambda versions: "collided")
    for caller in (BUYER, STORE):
        stream = await open_sotw(h.stub(h.mtls_channel(caller)), sotw([str(caller)]))
        response = await stream.recv()
        secrets = [secret_pb2.Secret.FromString(r.value) for r in response.resources]
        assert [secret.name for secret in secrets] == [str(caller)]


async def test_connected_proxies_follow_streams_that_open_name_their_node_and_close(
    h: SdsHarness,
) -> None:
    acks = EngineAcks(h.servicer.engine, h.store)
    stub = h.stub(h.mtls_channel(BUYER))
    assert acks.connected() == {}
    first = await open_sotw(stub, sotw(["ROOTCA"], node_id="node-a"))
    await first.recv()
    assert acks.connected() == acks.connected() == {f"node-a ({BUYER})": 1}
    second = await open_sotw(stub, sotw(["ROOTCA"], node_id="node-b"))
    await second.recv()
    assert acks.connected() == {f"node-a ({BUYER})": 1, f"node-b ({BUYER})": 1}
    first.cancel()
    await wait_until(lambda: h.stats.active_streams == 1, what="the first stream to end")
    assert acks.connected() == {f"node-b ({BUYER})": 1}


@pytest.fixture
def fan_out_pause(monkeypatch: pytest.MonkeyPatch) -> Iterator[gc_pause.FanOutPause]:
    """The pause as ``meshca serve`` turns it on, on this process's collector."""
    pause = gc_pause.FanOutPause()
    pause.enabled = True
    monkeypatch.setattr(gc_pause, "fan_out", pause)
    was_enabled = gc.isenabled()
    gc.enable()
    yield pause
    pause._resume()
    if not was_enabled:
        gc.disable()


async def test_no_cyclic_gc_while_a_change_fans_out_and_collection_resumes_after(
    h: SdsHarness, monkeypatch: pytest.MonkeyPatch, fan_out_pause: gc_pause.FanOutPause
) -> None:
    """Every woken stream holds its push in flight until written: a collection then walks
    them all and frees nothing, so collection waits until the change is out."""
    monkeypatch.setattr(engine_module, "WAKE_BATCH", 2)
    monkeypatch.setattr(engine_module, "GC_PAUSE_AT", 5)
    engine = h.servicer.engine
    stub = h.stub(h.mtls_channel(BUYER))
    few = await open_sotw(stub, sotw(["ROOTCA"]))
    await ack(few, await few.recv())
    change_bundle(h, add_root=True)  # a change to fewer streams than GC_PAUSE_AT: no pause
    assert gc.isenabled() and fan_out_pause.pauses == 0
    await ack(few, await few.recv())
    streams = [few, *[await open_sotw(stub, sotw(["ROOTCA"])) for _ in range(4)]]
    for stream in streams[1:]:
        await ack(stream, await stream.recv())
    assert await engine.wait_settled(timeout=10) == []
    assert gc.isenabled()

    change_bundle(h, add_root=False)
    assert not gc.isenabled() and fan_out_pause.pauses == 1
    await engine.wait_pushed(timeout=10)
    assert gc.isenabled()  # every stream has written its push: collection is back
    for stream in streams:  # and every stream got the change
        await ack(stream, await stream.recv())
    assert await engine.wait_settled(timeout=10) == []


async def test_a_fan_out_pause_is_bounded_whatever_the_streams_do(
    monkeypatch: pytest.MonkeyPatch, fan_out_pause: gc_pause.FanOutPause
) -> None:
    """A stream that never writes its push (a proxy that does not read) cannot keep the
    collector off: the pause ends after LONGEST seconds. A process that did not opt in is
    never paused."""
    monkeypatch.setattr(gc_pause, "LONGEST", 0.05)
    fan_out_pause.begin()
    assert not gc.isenabled()
    await wait_until(gc.isenabled, what="the pause to run out")
    fan_out_pause.end()
    assert gc.isenabled()

    other = gc_pause.FanOutPause()  # enabled is False unless the server opts in
    other.begin()
    assert gc.isenabled() and other.pauses == 0
    other.end()


async def test_rotation_reads_who_has_not_acked_without_a_status_of_each_stream(
    h: SdsHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rotation polls who has not acknowledged while every stream pushes: it is answered
    from the streams' cached names, not a status object per stream per poll (at 50,000
    streams those were hundreds of thousands of objects per poll for the GC to walk)."""
    acks = EngineAcks(h.servicer.engine, h.store)
    streams = [
        await open_sotw(h.stub(h.mtls_channel(BUYER)), sotw(["ROOTCA"], node_id=f"n{i}"))
        for i in range(3)
    ]
    responses = [await stream.recv() for stream in streams]

    def no_status(self: object) -> None:
        raise AssertionError("a status built for a poll")

    monkeypatch.setattr(engine_module._Stream, "status", no_status)

    def nodes(names: list[str]) -> list[str]:  # each named "node (caller and its peer)"
        assert all(f"({BUYER} " in name for name in names)
        return [name.split(" ")[0] for name in names]

    assert nodes(acks.unacked(lambda secret: True)) == ["n0", "n1", "n2"]
    await streams[1].send(sotw(["ROOTCA"], nonce=responses[1].nonce, error="bad bundle"))
    await wait_until(lambda: nodes(acks.refusing()) == ["n1"], what="the NACK")
    await ack(streams[0], responses[0])
    await wait_until(
        lambda: nodes(acks.unacked(lambda secret: True)) == ["n1", "n2"], what="the first ACK"
    )
