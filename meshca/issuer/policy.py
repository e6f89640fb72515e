"""Lifetime policy for leaves and the renewal schedule derived from it."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509

from meshca.issuer.errors import TtlError
from meshca.issuer.profile import DEFAULT_SKEW
from meshca.util.durations import format_duration

DEFAULT_LEAF_TTL = timedelta(hours=24)
DEFAULT_MAX_LEAF_TTL = timedelta(days=90)
DEFAULT_ROOT_TTL = timedelta(days=3650)
DEFAULT_INTERMEDIATE_TTL = timedelta(days=365)
RENEW_FRACTION = 0.5
RENEW_JITTER = 0.05
CA_TO_LEAF_TTL_RATIO = 6


@dataclass(frozen=True)
class TtlPolicy:
    default: timedelta = DEFAULT_LEAF_TTL
    maximum: timedelta = DEFAULT_MAX_LEAF_TTL
    skew: timedelta = DEFAULT_SKEW

    def __post_init__(self) -> None:
        if self.default <= timedelta(0) or self.maximum <= timedelta(0):
            raise TtlError("TTLs must be greater than zero")
        if self.default > self.maximum:
            raise TtlError(
                f"default TTL {format_duration(self.default)} exceeds the maximum "
                f"{format_duration(self.maximum)}"
            )

    def resolve(self, requested: timedelta | None) -> timedelta:
        """The TTL to issue with: the default when none is asked; refused over the maximum."""
        if requested is None:
            return self.default
        if requested <= timedelta(0):
            raise TtlError("TTL must be greater than zero")
        if requested > self.maximum:
            raise TtlError(
                f"TTL {format_duration(requested)} refused: the maximum is "
                f"{format_duration(self.maximum)}"
            )
        return requested


def check_ca_covers_leaves(ca_ttl: timedelta, leaf_ttl: timedelta) -> None:
    """SPIRE's rule: a CA must live at least 6 leaf lifetimes, or leaves get truncated."""
    if ca_ttl < CA_TO_LEAF_TTL_RATIO * leaf_ttl:
        raise TtlError(
            f"CA lifetime {format_duration(ca_ttl)} cannot cover the leaf rotation schedule: "
            f"it must be at least {CA_TO_LEAF_TTL_RATIO} x the leaf TTL "
            f"({format_duration(CA_TO_LEAF_TTL_RATIO * leaf_ttl)})"
        )


def issued_at(
    not_before: datetime,
    not_after: datetime,
    *,
    requested: datetime | None = None,
    skew: timedelta = DEFAULT_SKEW,
) -> datetime:
    """When a certificate's life began: the start of what renewal and health divide.

    The wall-clock moment it was ``requested`` when known (backends backdate NotBefore
    differently: meshca by its skew, a Vault role by its ``not_before_duration``), else
    NotBefore plus meshca's backdating ``skew``; clamped to the certificate's validity.
    """
    start = requested if requested is not None else not_before + skew
    return max(not_before, min(start, not_after))


def ca_lifetime(cert: x509.Certificate, skew: timedelta = DEFAULT_SKEW) -> timedelta:
    """A CA certificate's lifetime from issuance (NotBefore is backdated by the skew): the
    one measure the CA-lifetime rule is applied to."""
    not_after = cert.not_valid_after_utc
    return not_after - issued_at(cert.not_valid_before_utc, not_after, skew=skew)


def check_signing_ca(cert: x509.Certificate, leaf_ttl: timedelta) -> None:
    """The start-up rule: the signing CA ``cert`` must live 6 leaf lifetimes (TtlError).
    ``meshca serve`` applies it once, for every backend whose CA signs in process;
    ``meshca init --own-intermediate`` warns with it about what serve would refuse."""
    check_ca_covers_leaves(ca_lifetime(cert), leaf_ttl)


def renewal_time(
    issued: datetime,
    not_after: datetime,
    *,
    fraction: float = RENEW_FRACTION,
    jitter: float = RENEW_JITTER,
    rng: random.Random | None = None,
) -> datetime:
    """When to renew a certificate issued at ``issued`` (see :func:`issued_at`): at
    ``fraction`` of its life, +/- ``jitter`` of the life.

    Wall-clock datetimes from the certificate itself, never a monotonic clock, so a
    suspended or restarted process still renews on time.
    """
    life = not_after - issued
    spread = (rng or random).uniform(-jitter, jitter)
    return issued + life * max(0.0, min(1.0, fraction + spread))
