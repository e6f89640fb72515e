"""Start-up checks: refuse a CA that cannot cover the leaf schedule, and warn early about
anything that would let a served certificate expire unrenewed."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from cryptography import x509

from meshca.issuer import Signer, TrustBundle, TtlError
from meshca.issuer.policy import CA_TO_LEAF_TTL_RATIO, check_ca_covers_leaves, issued_at
from meshca.issuer.profile import DEFAULT_SKEW, utcnow
from meshca.issuer.svid import fingerprint
from meshca.rotation.journal import SlotKind
from meshca.rotation.manager import RotationManager
from meshca.util.durations import format_duration
from meshca.util.formats import rfc3339

log = logging.getLogger("meshca.rotation")

ROOT_EXPIRY_NOTICE = timedelta(days=30)


def ca_lifetime(cert: x509.Certificate, skew: timedelta = DEFAULT_SKEW) -> timedelta:
    """A CA certificate's lifetime from issuance (NotBefore is backdated by the skew)."""
    not_after = cert.not_valid_after_utc
    return not_after - issued_at(cert.not_valid_before_utc, not_after, skew=skew)


def check_lifetimes(
    signer: Signer, leaf_ttl: timedelta, *, ca_ttl: timedelta | None = None
) -> None:
    """Refuse (TtlError) when the active CA, or the lifetime configured for new CAs, is
    shorter than 6 leaf lifetimes: leaves would be cut short and rotation could not
    keep up."""
    try:
        check_ca_covers_leaves(ca_lifetime(signer.certificate), leaf_ttl)
    except TtlError as exc:
        raise TtlError(f"the active signing CA: {exc}") from None
    if ca_ttl is not None:
        try:
            check_ca_covers_leaves(ca_ttl, leaf_ttl)
        except TtlError as exc:
            raise TtlError(f"the lifetime configured for new signing CAs: {exc}") from None


def expiry_warnings(
    signer: Signer,
    bundle: TrustBundle,
    leaf_ttl: timedelta,
    *,
    replacement_problem: str | None,
    now: datetime | None = None,
) -> list[str]:
    """Reasons a certificate meshca serves could expire unrenewed (empty when none)."""
    now = now or utcnow()
    warnings = []
    expires = signer.not_after
    if replacement_problem is not None:
        warnings.append(
            f"the signing CA expires at {rfc3339(expires)} and no successor can be "
            f"prepared ({replacement_problem}); every certificate meshca serves expires "
            "unrenewed by then"
        )
    elif expires - now < leaf_ttl:
        warnings.append(
            f"the signing CA expires at {rfc3339(expires)}, within one leaf lifetime "
            f"({format_duration(leaf_ttl)}): new certificates are cut short to end with it"
        )
    notice = max(ROOT_EXPIRY_NOTICE, CA_TO_LEAF_TTL_RATIO * leaf_ttl)
    for root in bundle:
        if root.not_valid_after_utc - now < notice:
            warnings.append(
                f"root {fingerprint(root)} expires at {rfc3339(root.not_valid_after_utc)}: "
                "replace it before then ('meshca ca rotate-root')"
            )
    return warnings


def startup_checks(
    manager: RotationManager, leaf_ttl: timedelta, *, ca_ttl: timedelta | None = None
) -> list[str]:
    """Run both checks on an open manager; log and return the warnings."""
    active = manager.active
    check_lifetimes(active.signer, leaf_ttl, ca_ttl=ca_ttl)
    problem = manager.source.problem(active, new_root=manager.next_kind() is SlotKind.ROOT)
    warnings = expiry_warnings(
        active.signer, manager.journal.bundle, leaf_ttl, replacement_problem=problem
    )
    for warning in warnings:
        log.warning("%s", warning)
    return warnings
