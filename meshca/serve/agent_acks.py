"""An :class:`~meshca.rotation.acks.AckTracker` over the attested agents (``meshca
agent``), so neither a root rotation nor a JWT key activation strands one.

An agent holds no xDS stream: it polls the CSR API. What it has acknowledged is what the
CSR API saw (:class:`meshca.ca_api.sightings.AgentSightings`): the trust-bundle roots
and the JWT key ids it reported holding (applied and pushed to its streams), and the
agent SVID it presented on its last call (it renews that SVID as soon as the signing CA
changes). Every attested agent is waited for, connected or not: one that is stopped
cannot have applied the new root or key, and after step 5 its SVID, under the old root,
would no longer open a connection to meshca. Such an agent is named ``(no ACK on
record)`` or with the age of its last call; one that never reported its roots (an agent
older than the server) holds none of them, and is named so. Evict it (``meshca
agent-admin evict``), upgrade it, or go on with ``--force-unacked``. The sightings
survive a restart (the server saves them), so an agent that acknowledged before it is
not waited for again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from cryptography import x509

from meshca.attest.records import AgentRecords
from meshca.ca_api.sightings import AgentSightings, Sighting
from meshca.issuer import TrustBundle
from meshca.rotation.acks import AckedSecret, SecretPredicate, issued_by
from meshca.spiffe import SpiffeId

# An agent that called within this many seconds counts as connected (agents poll every
# --poll-interval, 5 s by default).
CONNECTED_WINDOW = 60.0

SigningChains = Callable[[], Sequence[tuple[x509.Certificate, ...]]]


class AgentAcks:
    def __init__(
        self,
        records: AgentRecords,
        sightings: AgentSightings,
        signing_chains: SigningChains,
        *,
        window: float = CONNECTED_WINDOW,
    ) -> None:
        self.records = records
        self.sightings = sightings
        self.signing_chains = signing_chains  # every signing CA's chain (CA first)
        self.window = window

    def _attested(self) -> list[str]:
        now = datetime.now(UTC)
        current = sorted(k for k, r in self.records.all().items() if r.reattest_by > now)
        self.sightings.keep_only(set(current))
        return current

    def _chain(self, leaf: x509.Certificate) -> tuple[x509.Certificate, ...]:
        """The presented leaf with the signing CA chain it was issued under, when meshca
        still knows that CA (otherwise the leaf alone, which chains to no root)."""
        for chain in self.signing_chains():
            if chain and issued_by(leaf, chain[0]):
                return (leaf, *chain)
        return (leaf,)

    def _name(self, agent_id: str, sighting: Sighting | None) -> str:
        if sighting is None or sighting.presented is None:
            return f"agent {agent_id} (no ACK on record)"
        notes = []
        age = time.time() - sighting.last_call
        if age > self.window:
            notes.append(f"last call {age:.0f}s ago")
        if sighting.bundle is None:
            notes.append("reports no trust bundle: an agent older than the server?")
        return f"agent {agent_id}" + (f" ({'; '.join(notes)})" if notes else "")

    def unacked(self, predicate: SecretPredicate) -> list[str]:
        waiting = []
        for agent_id in self._attested():
            sighting = self.sightings.get(agent_id)
            if sighting is None or sighting.presented is None:
                waiting.append(self._name(agent_id, sighting))
                continue
            # An agent that never reported its roots holds none of them.
            roots = sighting.bundle or TrustBundle(SpiffeId.parse(agent_id).trust_domain, ())
            held = (
                AckedSecret("trust bundle", bundle=roots),
                AckedSecret("agent SVID", chain=self._chain(sighting.presented)),
                # An agent that never reported its JWT key set holds none of the keys.
                AckedSecret("JWT authorities", jwt_kids=sighting.jwt_kids or frozenset()),
            )
            if not all(predicate(secret) for secret in held):
                waiting.append(self._name(agent_id, sighting))
        return waiting

    def refusing(self) -> list[str]:
        return []  # an agent never refuses a bundle: it takes what it fetches

    async def pushed(self, timeout: float) -> None:
        return None  # agents fetch at their next poll: nothing is pushed to them

    def connected(self) -> dict[str, int]:
        now = time.time()
        connected = {}
        for agent_id in self._attested():
            sighting = self.sightings.get(agent_id)
            if sighting is not None and now - sighting.last_call <= self.window:
                connected[f"agent {agent_id}"] = 1
        return connected
