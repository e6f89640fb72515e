"""Rotation's start-up checks: refuse a lifetime configured for new signing CAs that
cannot cover the leaf schedule, and warn early about anything that would let a served
certificate expire unrenewed.

The active signing CA itself is checked once, by ``meshca serve`` for every backend,
with :func:`meshca.issuer.policy.check_signing_ca`."""

from __future__ import annotations

from datetime import datetime, timedelta

from meshca.issuer import Signer, TrustBundle, TtlError
from meshca.issuer.policy import CA_TO_LEAF_TTL_RATIO, check_ca_covers_leaves
from meshca.issuer.profile import utcnow
from meshca.issuer.svid import fingerprint
from meshca.rotation.journal import SlotKind
from meshca.rotation.manager import RotationManager
from meshca.util.durations import format_duration
from meshca.util.formats import rfc3339
from meshca.util.logger import get_logger

log = get_logger("meshca.rotation")

ROOT_EXPIRY_NOTICE = timedelta(days=30)


def check_new_ca_ttl(ca_ttl: timedelta, leaf_ttl: timedelta) -> None:
    """Refuse (TtlError) a lifetime configured for new signing CAs (``--rotation-ca-ttl``)
    shorter than 6 leaf lifetimes: a configured TTL, not a certificate, so it is not
    the start-up rule's question."""
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
    """Check the configured lifetime of new CAs and return (and log) the warnings about
    the open manager's active CA and roots."""
    active = manager.active
    if ca_ttl is not None:
        check_new_ca_ttl(ca_ttl, leaf_ttl)
    problem = manager.source.problem(active, new_root=manager.next_kind() is SlotKind.ROOT)
    warnings = expiry_warnings(
        active.signer, manager.journal.bundle, leaf_ttl, replacement_problem=problem
    )
    for warning in warnings:
        log.warning("%s", warning)
    return warnings
