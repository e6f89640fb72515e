"""Calls per second from several client threads at once: each thread repeats its own
call until the deadline; all start together (a barrier), so the rate is the clients'
combined throughput, the figure both meshca's and SPIRE's signing benches report."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence


def concurrent_rate(calls: Sequence[Callable[[], object]], seconds: float) -> float:
    """Total completed calls per second over ``seconds``, one thread per entry of
    ``calls`` (each already connected and warmed up by the caller)."""
    counts = [0] * len(calls)
    start = threading.Barrier(len(calls) + 1)
    deadline = [0.0]

    def hammer(index: int) -> None:
        call = calls[index]
        start.wait()
        while time.perf_counter() < deadline[0]:
            call()
            counts[index] += 1

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    began = time.perf_counter()
    deadline[0] = began + seconds
    start.wait()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.perf_counter() - began)
