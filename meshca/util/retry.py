"""Exponential backoff with jitter, and a small circuit breaker built on it.

Jitter spreads the retries of many replicas (or many identities) so that a backend
coming back is not hit by all of them in the same instant. Used by the Vault client
(its breaker and outage probes) and by the secret store (renewal retries).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Delays ``initial * multiplier**attempt`` capped at ``maximum``; the top ``jitter``
    fraction of each delay is random ("equal jitter": never less than ``1 - jitter``)."""

    initial: float = 0.5
    maximum: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.initial <= 0 or self.maximum < self.initial:
            raise ValueError("backoff needs 0 < initial <= maximum")
        if self.multiplier < 1 or not 0 <= self.jitter <= 1:
            raise ValueError("backoff needs multiplier >= 1 and 0 <= jitter <= 1")

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """The wait before retry number ``attempt`` (0 for the first retry), in seconds."""
        exponent = min(max(attempt, 0), 64)
        base = min(self.maximum, self.initial * self.multiplier**exponent)
        fixed = base * (1 - self.jitter)
        return fixed + (rng or random).uniform(0, base - fixed)


class Breaker:
    """Tracks consecutive failures of one backend; while open, callers fail fast until
    the backoff delay has passed, then one call (or a probe) is let through to try again.

    Monotonic time on purpose: this measures waits, never certificate lifetimes.
    """

    def __init__(
        self,
        backoff: Backoff,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.backoff = backoff
        self._clock = clock
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self.failures = 0
        self.last_error: str | None = None
        self._retry_at = 0.0

    @property
    def healthy(self) -> bool:
        return self.failures == 0

    def seconds_until_retry(self) -> float:
        with self._lock:
            if self.failures == 0:
                return 0.0
            return max(0.0, self._retry_at - self._clock())

    def allows(self) -> bool:
        """Whether a call may go through now (always when healthy)."""
        return self.seconds_until_retry() == 0.0

    def record_failure(self, error: str) -> float:
        """Count a failure; returns the delay until the next attempt is allowed."""
        with self._lock:
            delay = self.backoff.delay(self.failures, self._rng)
            self.failures += 1
            self.last_error = error
            self._retry_at = self._clock() + delay
            return delay

    def record_success(self) -> bool:
        """Close the breaker; returns True when it was open (a recovery)."""
        with self._lock:
            recovered = self.failures > 0
            self.failures = 0
            self.last_error = None
            self._retry_at = 0.0
            return recovered
