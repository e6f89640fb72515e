"""Chain verification against a trust bundle, and the self-check every new CA passes."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from meshca.issuer.bundle import TrustBundle
from meshca.issuer.errors import ChainError, SignerError
from meshca.issuer.keys import generate_private_key, key_type_of
from meshca.issuer.profile import Signer, build_leaf, utcnow
from meshca.issuer.svid import spiffe_id_of
from meshca.spiffe import SpiffeId
from meshca.util.formats import name_text

MAX_CHAIN = 8


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def verify_chain(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    bundle: TrustBundle,
    *,
    now: datetime | None = None,
) -> list[x509.Certificate]:
    """Walk from ``leaf`` through ``intermediates`` to a root of ``bundle``.

    Checks signatures, validity periods and that every issuer is a CA. Returns the
    path (leaf first, root last).
    """
    now = now or utcnow()
    path = [leaf]
    current = leaf
    pool = list(intermediates)
    for _ in range(MAX_CHAIN):
        if not (current.not_valid_before_utc <= now <= current.not_valid_after_utc):
            raise ChainError(
                f"certificate {name_text(current.subject) or '(empty subject)'} "
                f"is outside its validity period"
            )
        for root in bundle:
            if root.subject == current.issuer and _issued_by(current, root):
                if not (root.not_valid_before_utc <= now <= root.not_valid_after_utc):
                    raise ChainError("the root certificate is outside its validity period")
                if current is not root:
                    path.append(root)
                return path
        parent = next(
            (
                c
                for c in pool
                if c.subject == current.issuer and _is_ca(c) and _issued_by(current, c)
            ),
            None,
        )
        if parent is None:
            raise ChainError("the chain does not lead to a root of the trust bundle")
        pool.remove(parent)
        path.append(parent)
        current = parent
    raise ChainError(f"the chain is longer than {MAX_CHAIN} certificates")


SELF_CHECK_ID = "/meshca/self-check"


def self_check(signer: Signer, bundle: TrustBundle) -> None:
    """Sign a throwaway SVID with ``signer`` and verify it against ``bundle``.

    Run before a new CA signs anything: a CA whose key does not match its certificate,
    or whose chain does not reach the bundle, is caught here, not by a proxy.
    """
    key_type_of(signer.key)
    throwaway = SpiffeId(bundle.trust_domain, SELF_CHECK_ID)
    key = generate_private_key()
    now = utcnow()
    try:
        leaf = build_leaf(signer, key.public_key(), throwaway, timedelta(minutes=1), now=now)
        verify_chain(leaf, signer.chain, bundle, now=now)
        if spiffe_id_of(leaf) != throwaway:
            raise ChainError("the throwaway SVID carries the wrong ID")
    except (ChainError, ValueError) as exc:
        raise SignerError(f"the signing CA failed its self-check: {exc}") from None
