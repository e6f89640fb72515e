"""Calls per second from several client threads at once: each thread repeats its own
call until the deadline; all start together (a barrier), so the rate is the clients'
combined throughput, the figure both meshca's and SPIRE's signing benches report.

Given the server's PID, the same measure also counts the server's CPU seconds
(:mod:`benchlib.cpu`) and the client process's own, so a rate is reported both per
wall-clock second and per server CPU-second."""

from __future__ import annotations

import resource
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from benchlib.cpu import cpu_seconds


@dataclass(frozen=True)
class Rate:
    calls: int  # completed calls (for a batch call, what each call counts, e.g. CSRs)
    seconds: float  # wall-clock
    server_cpu_s: float | None  # the server process's user + system CPU over the measure
    client_cpu_s: float  # this (client) process's user + system CPU over the measure

    @property
    def per_s(self) -> float:
        return self.calls / self.seconds

    @property
    def per_server_cpu_s(self) -> float | None:
        if self.server_cpu_s is None:
            return None
        return self.calls / max(self.server_cpu_s, 0.01)  # /proc counts 10 ms ticks


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def concurrent_calls(
    calls: Sequence[Callable[[], object]],
    seconds: float,
    *,
    server_pid: int | None = None,
    weight: int = 1,
) -> Rate:
    """Completed calls over ``seconds``, one thread per entry of ``calls`` (each already
    connected and warmed up by the caller); each call counts ``weight`` (a batch's size).
    With ``server_pid``, also that process's CPU seconds over the same interval."""
    counts = [0] * len(calls)
    start = threading.Barrier(len(calls) + 1)
    deadline = [0.0]

    def hammer(index: int) -> None:
        call = calls[index]
        start.wait()
        while time.perf_counter() < deadline[0]:
            call()
            counts[index] += weight

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    server_before = None if server_pid is None else cpu_seconds(server_pid)
    client_before = _own_cpu()
    began = time.perf_counter()
    deadline[0] = began + seconds
    start.wait()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    server_cpu = None
    if server_pid is not None and server_before is not None:
        server_cpu = cpu_seconds(server_pid) - server_before
    return Rate(sum(counts), elapsed, server_cpu, _own_cpu() - client_before)


def concurrent_rate(calls: Sequence[Callable[[], object]], seconds: float) -> float:
    """Total completed calls per second (see :func:`concurrent_calls`)."""
    return concurrent_calls(calls, seconds).per_s
