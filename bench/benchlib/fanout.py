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
