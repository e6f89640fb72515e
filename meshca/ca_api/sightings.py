"""What each attested agent last showed the CSR API: when it called, the agent SVID it
presented, the trust bundle it was sent, and the JWT authorities it reported holding.

An agent does not hold an xDS stream to meshca serve, so rotation cannot read its ACKs
from the xDS engine; instead, an agent that fetched a bundle (``GetBundle``, every
``--poll-interval``, or any answer carrying the bundle) holds it, the certificate it
presents on its next call says under which root its own SVID is, and each ``GetBundle``
names the JWT key ids it holds (applied and pushed to its Workload API streams). Root
rotation and JWT key activation ask these
(:class:`meshca.serve.agent_acks.AgentAcks`) before each wait ends, so a step that
would strand an agent waits for it.

One entry per attested agent that has called (bounded by the agent records; an evicted
agent's entry is dropped with its record). The server saves them in the data directory
(:mod:`meshca.ca_api.sightings_file`) so a restart keeps them; each records the content
it acknowledged (roots, key ids), never a version number, so an old sighting cannot
count for a newer bundle or key set.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from cryptography import x509

from meshca.issuer import TrustBundle
from meshca.spiffe import SpiffeId

MAX_REPORTED_KIDS = 64  # key ids an agent's report may name (a JWKS holds a few)


@dataclass(frozen=True)
class Sighting:
    last_call: float  # time.time() of its last authenticated call
    presented: x509.Certificate | None = None  # the agent SVID's leaf on that call
    bundle: TrustBundle | None = None  # the last trust bundle sent to it
    jwt_kids: frozenset[str] | None = None  # the JWT authorities it reported holding


class AgentSightings:
    """Thread-safe. A call's sighting is cheap (the CSR API notes one per call): the time
    of the last call is kept apart, and the presented certificate and bundle are replaced
    only when they are not the objects already held."""

    def __init__(self) -> None:
        self._seen: dict[str, Sighting] = {}
        self._last_call: dict[str, float] = {}
        self._lock = threading.Lock()
        # Counters for the saver: ``changes`` when what an agent acknowledged changed
        # (saved soon), ``calls`` when only a call's time did (saved now and then).
        self.changes = 0
        self.calls = 0

    def called(self, agent_id: SpiffeId, presented: x509.Certificate) -> None:
        key = str(agent_id)
        with self._lock:
            self._last_call[key] = time.time()
            self.calls += 1
            previous = self._seen.get(key)
            if previous is None or previous.presented is not presented:
                if previous is None or previous.presented != presented:
                    self.changes += 1
                self._seen[key] = replace(previous or Sighting(0.0), presented=presented)

    def sent_bundle(self, agent_id: SpiffeId, bundle: TrustBundle) -> None:
        key = str(agent_id)
        with self._lock:
            previous = self._seen.get(key)
            if previous is None or previous.bundle is not bundle:
                if previous is None or previous.bundle != bundle:
                    self.changes += 1
                self._seen[key] = replace(previous or Sighting(0.0), bundle=bundle)
            self._last_call.setdefault(key, time.time())

    def held_jwt(self, agent_id: SpiffeId, kids: Iterable[str], published: Iterable[str]) -> None:
        """The agent reports the JWT authorities it holds; only key ids meshca publishes
        count (a report cannot make the server hold more than its own key set)."""
        reported = set(list(kids)[:MAX_REPORTED_KIDS])
        held = frozenset(kid for kid in published if kid in reported)
        key = str(agent_id)
        with self._lock:
            previous = self._seen.get(key)
            if previous is None or previous.jwt_kids != held:
                self.changes += 1
                self._seen[key] = replace(previous or Sighting(0.0), jwt_kids=held)
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
            gone = set(self._seen) - agent_ids
            for agent_id in gone:
                del self._seen[agent_id]
            for agent_id in set(self._last_call) - agent_ids:
                del self._last_call[agent_id]
            if gone:
                self.changes += 1

    def snapshot(self) -> dict[str, Sighting]:
        """Every sighting, with its last call's time (for the saver)."""
        with self._lock:
            return {
                key: replace(seen, last_call=self._last_call.get(key, 0.0))
                for key, seen in self._seen.items()
            }

    def restore(self, sightings: Mapping[str, Sighting]) -> None:
        """Start from saved sightings (at start-up, before any call is served)."""
        with self._lock:
            self._seen = dict(sightings)
            self._last_call = {key: seen.last_call for key, seen in sightings.items()}
