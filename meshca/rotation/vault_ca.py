"""New signing CAs from Vault's PKI engine: the Vault ``intermediate`` mode under the
signing-CA rotation machinery.

The manager prepares the next intermediate at ``prepare_fraction`` of the active one's
life and activates it at ``activate_fraction``, journaled like the local CA's. Here a
new CA is a fresh key whose CSR Vault signs (``<mount>/root/sign-intermediate``, or the
configured issuer's), and publishing keeps ``<data-dir>/vault/`` current so a restart
(even during a Vault outage) reloads the active one.

Roots belong to Vault: meshca cannot create one there. A root rotated in inside Vault
(a new issuer) reaches the bundle through the server's poll
(:meth:`RotationManager.follow_roots`); once Vault signs under it (it became the
default issuer, or ``--vault-issuer`` names it), the next intermediate chains to it and
the manager treats it as a CA under a new root: it activates only once connected
proxies have ACKed that root.
"""

from __future__ import annotations

from datetime import timedelta

from meshca.backends.opened import IntermediateCa
from meshca.issuer import IssuerError, TrustBundle
from meshca.issuer.svid import fingerprint
from meshca.issuer.verify import self_check
from meshca.rotation.journal import RotationError, SigningCa
from meshca.rotation.manager import root_of
from meshca.util.logger import get_logger

log = get_logger("meshca.rotation")


class VaultCaSource:
    """A :class:`~meshca.rotation.manager.CaSource` over Vault's PKI engine.

    New intermediates live ``ca_ttl`` (default: the backend's configured intermediate
    TTL). A failure to reach Vault is a :class:`RotationError`, so the manager logs it
    once and retries on its schedule.
    """

    def __init__(self, backend: IntermediateCa, *, ca_ttl: timedelta | None = None) -> None:
        self.backend = backend
        self.ca_ttl = ca_ttl

    def _newer_root(self, active: SigningCa) -> bool:
        """Whether Vault holds a root that outlives the active one (as last polled)."""
        return any(
            root != active.root and root.not_valid_after_utc > active.root.not_valid_after_utc
            for root in self.backend.active_signer.bundle()
        )

    def describe(self, active: SigningCa) -> str:
        return f"each new intermediate is signed by Vault ({self.backend.describe()})"

    def problem(self, active: SigningCa, *, new_root: bool) -> str | None:
        if not new_root or self._newer_root(active):
            return None
        return (
            f"a new root comes from Vault, not from meshca: create it in Vault "
            f"({self.backend.describe()}: 'root/rotate/internal' adds an issuer) and make it "
            "the default issuer (or name it with --vault-issuer); meshca adds its root to the "
            "trust bundle at its next poll"
        )

    def create(self, active: SigningCa, *, new_root: bool) -> SigningCa:
        try:
            bundle = self.backend.roots()
            signer = self.backend.obtain_intermediate(self.ca_ttl)
        except IssuerError as exc:
            # During an outage, the outage's cause (one message while it lasts, so the
            # manager logs it once), not this attempt's "failing fast" detail.
            detail = exc if self.backend.healthy else self.backend.last_error or exc
            raise RotationError(f"cannot obtain the next intermediate: {detail}") from None
        ca = SigningCa(signer, root_of((signer.certificate, *signer.intermediates), bundle))
        if new_root and ca.root == active.root:
            raise RotationError(
                f"Vault signed the next intermediate under the current root "
                f"{fingerprint(active.root)}: make the new root's issuer the default in "
                f"Vault ({self.backend.describe()}), or name it with --vault-issuer, first"
            )
        try:
            self_check(ca.signer, TrustBundle.of(bundle.trust_domain, [ca.root]))
        except IssuerError as exc:
            raise RotationError(
                f"the intermediate Vault signed fails its self-check: {exc}"
            ) from None
        return ca

    def publish(self, active: SigningCa, bundle: TrustBundle) -> None:
        self.backend.save_state(active.signer, bundle)
