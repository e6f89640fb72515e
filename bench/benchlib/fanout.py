"""Opening many streams, and the fan-out baseline every fan-out bench measures against."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from grpc_health.v1 import health_pb2, health_pb2_grpc


async def bounded(coroutines: list[Any], limit: int) -> None:
    """Run ``coroutines`` with at most ``limit`` in flight (0: all at once)."""
    if limit <= 0:
        await asyncio.gather(*coroutines)
        return
    semaphore = asyncio.Semaphore(limit)

    async def run(coroutine: Any) -> None:
        async with semaphore:
            await coroutine

    await asyncio.gather(*(run(c) for c in coroutines))


async def health_fanout(
    ask: Callable[[str], Awaitable[dict[str, Any]]],
    service: str,
    streams: int,
    channels: list[Any],
    *,
    max_opening: int,
    timeout: float,
) -> float:
    """The baseline: gRPC's health service pushing one status change to ``streams``
    watchers. ``ask("health")`` makes the server under test flip ``service``'s status and
    answers ``{"changed_at": monotonic time}``; returns the seconds to the last arrival."""
    stubs = [health_pb2_grpc.HealthStub(c) for c in channels]
    calls: list[Any] = []
    request = health_pb2.HealthCheckRequest(service=service)

    async def first(stub: Any) -> None:
        call = stub.Watch(request)  # created when admitted, like the streams under test
        calls.append(call)
        await call.read()

    await bounded([first(stubs[i % len(stubs)]) for i in range(streams)], max_opening)
    arrivals: list[float] = []

    async def next_status(call: Any) -> None:
        await call.read()
        arrivals.append(time.monotonic())

    waiting = [asyncio.ensure_future(next_status(c)) for c in calls]
    await asyncio.sleep(0.2)
    change = await ask("health")
    await asyncio.wait_for(asyncio.gather(*waiting), timeout)
    for call in calls:
        call.cancel()
    return max(arrivals) - change["changed_at"]


async def workload_api_fanout(
    streams: int,
    channels: list[Any],
    rss: Callable[[], Awaitable[int]],
    change: Callable[[], Awaitable[float]],
) -> dict[str, Any]:
    """``streams`` FetchX509SVID streams on ``channels`` (to meshca's agent or spire-agent
    alike), then ``change`` (which returns when it made the change, ``time.monotonic``):
    how long until every stream has the one new SVID, the spread of arrivals, and the
    agent's memory (``rss``) before and with the streams open. RuntimeError when the
    streams do not all end on the same new SVID."""
    from spiffe._proto import workload_pb2, workload_pb2_grpc

    metadata = (("workload.spiffe.io", "true"),)
    stubs = [workload_pb2_grpc.SpiffeWorkloadAPIStub(c) for c in channels]
    before = await rss()
    calls: list[Any] = []
    first: set[bytes] = set()

    async def open_stream(stub: Any) -> None:
        call = stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=metadata)
        calls.append(call)
        first.add((await call.read()).svids[0].x509_svid)

    await bounded([open_stream(stubs[i % len(stubs)]) for i in range(streams)], 500)
    await asyncio.sleep(0.5)
    during = await rss()
    arrivals: list[float] = []
    received: set[bytes] = set()

    async def next_svid(call: Any) -> None:
        while True:  # an update may arrive that does not change this SVID (a bundle)
            response = await call.read()
            if response.svids[0].x509_svid not in first:
                break
        arrivals.append(time.monotonic())
        received.add(response.svids[0].x509_svid)

    waiting = [asyncio.ensure_future(next_svid(c)) for c in calls]
    await asyncio.sleep(0.2)
    changed_at = await change()
    try:
        await asyncio.wait_for(asyncio.gather(*waiting), 300)
    finally:
        for call in calls:
            call.cancel()
    if len(first) != 1 or len(received) != 1:
        raise RuntimeError("the streams did not all receive the same, renewed SVID")
    return {
        "from_change_s": round(max(arrivals) - changed_at, 4),
        "spread_s": round(max(arrivals) - min(arrivals), 4),
        "rss_before_mb": round(before / 2**20, 1),
        "rss_streams_mb": round(during / 2**20, 1),
        "bytes_per_stream": round((during - before) / streams),
    }
