"""CPU seconds a process has used (user + system, all its threads), read from
``/proc/PID/stat``: a bench reads it before and after a measure to report a rate per
server CPU-second next to the wall-clock rate. On 2 shared cores the wall figure also
pays for the client threads and for whatever else runs; the CPU figure is the server's
own cost per call, comparable between two servers measured in the same run."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` so far, in seconds."""
    with open(f"/proc/{pid}/stat") as stat:
        # The command name (field 2) may hold spaces: count fields after its ')'.
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def with_cpu(pid: int, measure: Callable[[], T]) -> tuple[T, float]:
    """``measure()``'s result and the CPU seconds ``pid`` used while it ran."""
    before = cpu_seconds(pid)
    result = measure()
    return result, cpu_seconds(pid) - before
