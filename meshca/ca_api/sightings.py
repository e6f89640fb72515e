"""What each attested agent last showed the CSR API: when it called, the agent SVID it
presented, and the trust bundle it was sent.

An agent does not hold an xDS stream to meshca serve, so a root rotation cannot read its
ACKs from the xDS engine; instead, an agent that fetched a bundle (``GetBundle``, every
``--poll-interval``, or any answer carrying the bundle) holds it, and the certificate it
presents on its next call says under which root its own SVID is. Root rotation asks
these (:class:`meshca.serve.agent_acks.AgentAcks`) before each wait ends, so a step
that would strand an agent (step 5 drops the root its SVID chains to) waits for it.

Kept in memory, one entry per attested agent that has called since the server started
(bounded by the agent records; an evicted agent's entry is dropped with its record).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace

from cryptography import x509

from meshca.issuer import TrustBundle
from meshca.spiffe import SpiffeId


@dataclass(frozen=True)
class Sighting:
    last_call: float  # time.time() of its last authenticated call
    presented: x509.Certificate | None = None  # the agent SVID's leaf on that call
    bundle: TrustBundle | None = None  # the last trust bundle sent to it


class AgentSightings:
    """Thread-safe. A call's sighting is cheap (the CSR API notes one per call): the time
    of the last call is kept apart, and the presented certificate and bundle are replaced
    only when they are not the objects already held."""

    def __init__(self) -> None:
        self._seen: dict[str, Sighting] = {}
        self._last_call: dict[str, float] = {}
        self._lock = threading.Lock()

    def called(self, agent_id: SpiffeId, presented: x509.Certificate) -> None:
        key = str(agent_id)
        with self._lock:
            self._last_call[key] = time.time()
            previous = self._seen.get(key)
            if previous is None or previous.presented is not presented:
                self._seen[key] = replace(previous or Sighting(0.0), presented=presented)

    def sent_bundle(self, agent_id: SpiffeId, bundle: TrustBundle) -> None:
        key = str(agent_id)
        with self._lock:
            previous = self._seen.get(key)
            if previous is None or previous.bundle is not bundle:
                self._seen[key] = replace(previous or Sighting(0.0), bundle=bundle)
            self._last_call.setdefault(key, time.time())

    def get(self, agent_id: str) -> Sighting | None:
        with self._lock:
            seen = self._seen.get(agent_id)
            if seen is None:
                return None
            return replace(seen, last_call=self._last_call.get(agent_id, 0.0))

    def keep_only(self, agent_ids: set[str]) -> None:
        """Forget agents no longer attested (evicted, or past their maximum age)."""
        with self._lock:
            for gone in set(self._seen) - agent_ids:
                del self._seen[gone]
            for gone in set(self._last_call) - agent_ids:
                del self._last_call[gone]
