"""What each attested agent last showed the CSR API: when it called, the agent SVID it
presented, and what it reported holding: the trust-bundle roots and the JWT authorities.

An agent does not hold an xDS stream to meshca serve, so rotation cannot read its ACKs
from the xDS engine; instead, each ``GetBundle`` poll names the roots (their SHA-256)
and the JWT key ids the agent holds, applied and pushed to its SDS and Workload API
streams, and the certificate it presents says under which root its own SVID is. Being
*sent* a bundle is not an ACK: an agent may fail to apply it, or stop before it does.
Root rotation and JWT key activation ask these
(:class:`meshca.serve.agent_acks.AgentAcks`) before each wait ends, so a step that
would strand an agent waits for it.

One entry per attested agent that has called (bounded by the agent records; an evicted
agent's entry is dropped with its record). The server saves them in the data directory
(:mod:`meshca.ca_api.sightings_file`) so a restart keeps them; each records the content
it acknowledged (roots, key ids), never a version number, so an old sighting cannot
count for a newer bundle or key set.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshca.issuer import TrustBundle
from meshca.spiffe import SpiffeId

MAX_REPORTED_KIDS = 64  # key ids an agent's report may name (a JWKS holds a few)
MAX_REPORTED_ROOTS = 64  # root fingerprints a report may name (a bundle holds a few)
_HELD_CACHE = 64  # the held subsets of one published bundle remembered (agents share them)


def root_sha256(root: x509.Certificate) -> bytes:
    """How a ``GetBundle`` report names a root it holds: the SHA-256 of its DER."""
    return hashlib.sha256(root.public_bytes(serialization.Encoding.DER)).digest()


@dataclass(frozen=True)
class Sighting:
    last_call: float  # time.time() of its last authenticated call
    presented: x509.Certificate | None = None  # the agent SVID's leaf on that call
    # The roots it reported holding (of those meshca publishes); None: it never reported.
    bundle: TrustBundle | None = None
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
        # The published bundle's root fingerprints, and the held subsets built from it.
        self._published: TrustBundle | None = None
        self._fingerprints: tuple[tuple[bytes, x509.Certificate], ...] = ()
        self._held: dict[frozenset[bytes], TrustBundle] = {}

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

    def held_roots(
        self, agent_id: SpiffeId, reported: Iterable[bytes], published: TrustBundle
    ) -> None:
        """The agent reports the SHA-256 of each trust-bundle root it holds; only roots
        meshca publishes count (a report cannot make the server hold more than its own
        bundle). An empty report is no report: an agent always holds a root (an older
        agent sends none), so it stays unacknowledged rather than holding nothing."""
        wanted = set(itertools.islice(reported, MAX_REPORTED_ROOTS))
        key = str(agent_id)
        with self._lock:
            held = self._held_bundle(wanted, published) if wanted else None
            previous = self._seen.get(key)
            if previous is None or previous.bundle is not held:
                if previous is None or previous.bundle != held:
                    self.changes += 1
                self._seen[key] = replace(previous or Sighting(0.0), bundle=held)
            self._last_call.setdefault(key, time.time())

    def _held_bundle(self, wanted: set[bytes], published: TrustBundle) -> TrustBundle:
        """The published roots in ``wanted``, as one object shared by every agent that
        holds the same ones (cheap to compare and saved once). Under the lock."""
        if self._published is not published:
            self._published = published
            self._fingerprints = tuple((root_sha256(root), root) for root in published)
            self._held = {}
        held = frozenset(digest for digest, _ in self._fingerprints if digest in wanted)
        if len(held) == len(self._fingerprints):
            return published
        bundle = self._held.get(held)
        if bundle is None:
            if len(self._held) >= _HELD_CACHE:
                self._held.clear()
            roots = tuple(root for digest, root in self._fingerprints if digest in held)
            bundle = self._held[held] = TrustBundle(published.trust_domain, roots)
        return bundle

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
