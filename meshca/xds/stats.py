"""Counters of the xDS engine: plain numbers a metrics exporter (or a test) can read.

Counting costs a dict update; nothing here locks or allocates per stream, so it stays
cheap with thousands of streams on one event loop.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

LATENCY_SAMPLES = 4096


@dataclass
class LatencyRecorder:
    """Push-to-ACK latencies: a count, a sum, a maximum and the most recent samples."""

    count: int = 0
    total: float = 0.0
    maximum: float = 0.0
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))
    observers: list[Callable[[float], None]] = field(default_factory=list)  # e.g. a histogram

    def record(self, seconds: float) -> None:
        self.count += 1
        self.total += seconds
        self.maximum = max(self.maximum, seconds)
        self.recent.append(seconds)
        for observe in self.observers:
            observe(seconds)

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile (0..1) of the recent samples; None before the first one."""
        if not self.recent:
            return None
        ordered = sorted(self.recent)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None


@dataclass
class XdsStats:
    """Per-server counters; the keyed ones are keyed by type URL or by refusal status."""

    streams_opened: int = 0
    streams_closed: int = 0
    requests: int = 0
    responses: Counter[str] = field(default_factory=Counter)
    acks: Counter[str] = field(default_factory=Counter)
    nacks: Counter[str] = field(default_factory=Counter)
    stale_nonces: Counter[str] = field(default_factory=Counter)
    refusals: Counter[str] = field(default_factory=Counter)
    auth_failures: int = 0
    fetches: int = 0
    ack_latency: LatencyRecorder = field(default_factory=LatencyRecorder)

    @property
    def active_streams(self) -> int:
        return self.streams_opened - self.streams_closed

    def snapshot(self) -> dict[str, float]:
        """Flat ``name -> value`` view (``responses{type}`` style keys) for an exporter."""
        flat: dict[str, float] = {
            "streams_opened": self.streams_opened,
            "streams_closed": self.streams_closed,
            "active_streams": self.active_streams,
            "requests": self.requests,
            "auth_failures": self.auth_failures,
            "fetches": self.fetches,
            "ack_latency_count": self.ack_latency.count,
            "ack_latency_sum_seconds": self.ack_latency.total,
            "ack_latency_max_seconds": self.ack_latency.maximum,
        }
        for name in ("responses", "acks", "nacks", "stale_nonces", "refusals"):
            counter: Counter[str] = getattr(self, name)
            for key, value in counter.items():
                flat[f"{name}{{{key}}}"] = value
        return flat
