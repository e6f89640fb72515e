"""What one caller can make ``meshca serve`` hold is bounded (issue 11, item 3).

A workload that asked for thousands of distinct ``root-cert-for-mtls-inbound:<any>/<any>``
names on a few streams grew the server by gigabytes. Here the attacker is a mapped
workload on the Unix socket; the server is a real ``meshca serve`` process whose
resident memory is read from /proc.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from envoy.service.secret.v3 import sds_pb2_grpc

from tests.sds_harness import Stream, delta, sotw
from tests.serve_harness import (
    ServeProcess,
    fetch,
    kube_id,
    make_data_dir,
    serving,
    short_tempdir,
)

pytestmark = pytest.mark.timeout(180)

A = kube_id("shop", "web")
NAMES_PER_CALLER = 2000
STREAMS_PER_CALLER = 8


@pytest.fixture
def server() -> Iterator[ServeProcess]:
    with short_tempdir() as root:
        data = make_data_dir(root)
        with serving(
            root,
            data,
            *("--uds-identity", f"{os.getuid()}={A}"),
            *("--max-names-per-caller", str(NAMES_PER_CALLER)),
            *("--max-streams-per-caller", str(STREAMS_PER_CALLER)),
        ) as process:
            yield process


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def inbound_names(batch: int, count: int) -> list[str]:
    return [f"root-cert-for-mtls-inbound:n{batch}/sa{i}" for i in range(count)]


async def test_one_caller_cannot_grow_the_server_by_asking_for_names(
    server: ServeProcess,
) -> None:
    async with grpc.aio.insecure_channel(f"unix:{server.uds}") as channel:
        stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
        assert await fetch(channel, ["ROOTCA"])
        # the caller's whole budget on one stream: served
        first = Stream(stub.StreamSecrets())
        await first.send(sotw(inbound_names(0, NAMES_PER_CALLER)))
        assert len((await first.recv()).resources) == NAMES_PER_CALLER
        baseline = rss_kib(server.process.pid)

        # then 40 more streams (SotW and Delta), each asking for 2,000 new distinct names
        held: list[Stream] = []
        refusals: list[grpc.aio.AioRpcError] = []
        for batch in range(1, 41):
            stream = Stream(stub.StreamSecrets() if batch % 2 else stub.DeltaSecrets())
            names = inbound_names(batch, NAMES_PER_CALLER)
            await stream.send(sotw(names) if batch % 2 else delta(names))
            refusals.append(await stream.error(timeout=30))
            held.append(stream)
        grown = rss_kib(server.process.pid) - baseline
        for stream in held:
            stream.cancel()
        first.cancel()

    codes = {error.code() for error in refusals}
    assert codes == {grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert all("max_names_per_caller" in (e.details() or "") for e in refusals)
    # 80,000 distinct names were asked for; the server held none of them
    print(f"asked for 80,000 more names: the server grew by {grown} KiB")
    assert grown < 40 * 1024, f"the server grew by {grown} KiB"


async def test_one_request_naming_too_many_resources_is_refused(server: ServeProcess) -> None:
    async with grpc.aio.insecure_channel(f"unix:{server.uds}") as channel:
        stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.FetchSecrets(sotw(inbound_names(0, NAMES_PER_CALLER + 1)), timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"at most {NAMES_PER_CALLER}" in (refused.value.details() or "")


async def test_streams_beyond_the_per_caller_limit_are_refused_and_room_returns(
    server: ServeProcess,
) -> None:
    async with grpc.aio.insecure_channel(f"unix:{server.uds}") as channel:
        stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
        streams = []
        for _ in range(STREAMS_PER_CALLER):
            stream = Stream(stub.StreamSecrets())
            await stream.send(sotw(["ROOTCA"]))
            await stream.recv()
            streams.append(stream)
        # refused before its first request is read: nothing is sent on it (a write racing
        # the refusal can fail in the client's own gRPC as INTERNAL, hiding the status)
        extra = Stream(stub.StreamSecrets())
        error = await extra.error()
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_streams_per_caller" in (error.details() or "")
        streams.pop().cancel()
        for _ in range(50):  # the server sees the cancellation, then there is room again
            again = Stream(stub.StreamSecrets())
            try:
                await again.send(sotw(["ROOTCA"]))
                await again.recv(timeout=10)
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.1)
        else:
            raise AssertionError("no room after a stream ended")
        for stream in [*streams, again]:
            stream.cancel()
