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
    def __init__(self) -> None:
        self._seen: dict[str, Sighting] = {}
        self._lock = threading.Lock()

    def called(self, agent_id: SpiffeId, presented: x509.Certificate) -> None:
        with self._lock:
            previous = self._seen.get(str(agent_id))
            base = previous or Sighting(0.0)
            self._seen[str(agent_id)] = replace(base, last_call=time.time(), presented=presented)

    def sent_bundle(self, agent_id: SpiffeId, bundle: TrustBundle) -> None:
        with self._lock:
            base = self._seen.get(str(agent_id)) or Sighting(time.time())
            self._seen[str(agent_id)] = replace(base, bundle=bundle)

    def get(self, agent_id: str) -> Sighting | None:
        with self._lock:
            return self._seen.get(agent_id)

    def keep_only(self, agent_ids: set[str]) -> None:
        """Forget agents no longer attested (evicted, or past their maximum age)."""
        with self._lock:
            for gone in set(self._seen) - agent_ids:
                del self._seen[gone]
