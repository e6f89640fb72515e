"""What connected proxies have acknowledged: the interface rotation waits on.

Rotation moves on only when the proxies have *acknowledged* the change (an SDS ACK),
never after a fixed sleep: a new root must be in every proxy's bundle before anything
is signed under it, and the old root may leave the bundles only once no proxy still
presents a certificate that chains to it. The SDS layer implements :class:`AckTracker`;
rotation only asks it questions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from meshca.issuer import TrustBundle


@dataclass(frozen=True)
class AckedSecret:
    """The content a proxy last ACKed for one secret it watches: a trust bundle (a
    validation context), a certificate chain (a TLS certificate: leaf first, root
    excluded), or the key ids of the JWT authorities it holds (an agent's JWKS)."""

    name: str
    bundle: TrustBundle | None = None
    chain: tuple[x509.Certificate, ...] | None = None
    jwt_kids: frozenset[str] | None = None


SecretPredicate = Callable[[AckedSecret], bool]


class AckTracker(Protocol):
    """Implemented by the SDS layer over its per-stream ACK state."""

    def unacked(self, predicate: SecretPredicate) -> list[str]:
        """The connected proxies that watch a secret whose last ACKed content fails
        ``predicate``, or that they have not ACKed at all yet.

        Each proxy appears once, named so an operator can find it (node id and peer).
        An empty list means every connected proxy has acknowledged what ``predicate``
        asks for. Called from the event loop; must not block.
        """
        ...

    def refusing(self) -> list[str]:
        """The connected proxies that rejected (NACKed) the latest content pushed to them
        and have nothing newer on its way: they will not acknowledge it, however long a
        rotation waits."""
        ...

    def connected(self) -> dict[str, int]:
        """Every connected proxy, named the same way across its reconnections (node id
        and identities, no peer address), with how many streams it has open (Envoy opens
        one per secret): what a restart waits to see again."""
        ...

    async def pushed(self, timeout: float) -> None:
        """Return once every stream a change woke has sent its push (not yet ACKed), or
        after ``timeout`` seconds: a reply read from every stream waits for this, so
        composing it never holds the pushes up."""
        ...


class NoProxies:
    """The tracker when no server runs: nobody is connected, so nobody is waited for."""

    def unacked(self, predicate: SecretPredicate) -> list[str]:
        return []

    def refusing(self) -> list[str]:
        return []

    def connected(self) -> dict[str, int]:
        return {}

    async def pushed(self, timeout: float) -> None:
        return None


class Combined:
    """Several trackers seen as one: the proxies on the xDS streams and the agents on the
    CSR API are all waited for."""

    def __init__(self, *trackers: AckTracker) -> None:
        self.trackers = trackers

    def unacked(self, predicate: SecretPredicate) -> list[str]:
        return sorted({name for t in self.trackers for name in t.unacked(predicate)})

    def refusing(self) -> list[str]:
        return sorted({name for t in self.trackers for name in t.refusing()})

    def connected(self) -> dict[str, int]:
        merged: dict[str, int] = {}
        for tracker in self.trackers:
            merged.update(tracker.connected())
        return merged

    async def pushed(self, timeout: float) -> None:
        for tracker in self.trackers:
            await tracker.pushed(timeout)


def shown(names: list[str], limit: int = 20) -> str:
    """Up to ``limit`` names, then how many more: a reply stays short whatever the count."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    return cert.issuer == issuer.subject and _signed_by(cert, issuer)


@functools.lru_cache(maxsize=1024)
def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Signature check, remembered (certificates hash and compare by content): waits ask
    it of the same few CAs for every identity."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def chains_to(chain: Iterable[x509.Certificate], root: x509.Certificate) -> bool:
    """Whether a leaf-first chain (root excluded, or included) ends at ``root``."""
    certs = list(chain)
    if not certs:
        return False
    top = certs[-1]
    return top == root or issued_by(top, root)


def bundle_holds(root: x509.Certificate) -> SecretPredicate:
    """Validation contexts must carry ``root``; certificates are not concerned."""
    return lambda secret: secret.bundle is None or root in secret.bundle


def certificate_under(root: x509.Certificate) -> SecretPredicate:
    """Certificates must chain to ``root``; validation contexts are not concerned."""
    return lambda secret: secret.chain is None or chains_to(secret.chain, root)


def certificate_not_under(root: x509.Certificate) -> SecretPredicate:
    """No certificate may still chain to ``root`` (before it leaves the bundle)."""
    return lambda secret: secret.chain is None or not chains_to(secret.chain, root)


def jwks_holds(kid: str) -> SecretPredicate:
    """JWT key sets must hold ``kid``; bundles and certificates are not concerned."""
    return lambda secret: secret.jwt_kids is None or kid in secret.jwt_kids
