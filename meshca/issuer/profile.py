"""The certificate profiles: the X.509-SVID leaf and meshca's CA certificates (DESIGN.md).

Everything here is decided by meshca, never copied from a request: the identity is
what the caller asked for and was allowed, and nothing in a CSR but its public key is
used.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshca.issuer.errors import SignerError
from meshca.issuer.keys import PrivateKey, PublicKey
from meshca.spiffe import SpiffeId, TrustDomain

DEFAULT_SKEW = timedelta(minutes=1)

_BASIC_LEAF = x509.BasicConstraints(ca=False, path_length=None)
_EKU = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])


def _key_usage(
    *, digital_signature: bool, key_encipherment: bool, cert_sign: bool
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


_KU_EC_LEAF = _key_usage(digital_signature=True, key_encipherment=False, cert_sign=False)
_KU_RSA_LEAF = _key_usage(digital_signature=True, key_encipherment=True, cert_sign=False)
_KU_CA = _key_usage(digital_signature=True, key_encipherment=False, cert_sign=True)


def random_serial() -> int:
    """A random positive 128-bit serial (never zero)."""
    while True:
        serial = secrets.randbits(128)
        if serial:
            return serial


def hash_for(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


@dataclass(frozen=True)
class Signer:
    """A CA that signs: its key, its certificate and the intermediates above it (root excluded).

    ``ski`` and ``aki`` are computed once, because every leaf needs the AKI.
    """

    key: PrivateKey
    certificate: x509.Certificate
    intermediates: tuple[x509.Certificate, ...] = ()
    _aki: x509.AuthorityKeyIdentifier = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            ski = self.certificate.extensions.get_extension_for_class(
                x509.SubjectKeyIdentifier
            ).value
            aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        except x509.ExtensionNotFound:
            aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(self.certificate.public_key())  # type: ignore[arg-type]
        object.__setattr__(self, "_aki", aki)

    @property
    def authority_key_identifier(self) -> x509.AuthorityKeyIdentifier:
        return self._aki

    @property
    def not_after(self) -> datetime:
        return self.certificate.not_valid_after_utc

    @property
    def is_self_signed(self) -> bool:
        return self.certificate.issuer == self.certificate.subject

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """What follows a leaf in ``cert.pem``: this CA and intermediates, never the root."""
        if self.is_self_signed:
            return ()
        return (self.certificate, *self.intermediates)

    def check_can_sign(self, now: datetime) -> None:
        cert = self.certificate
        if now >= cert.not_valid_after_utc:
            raise SignerError(
                f"the signing CA expired at {cert.not_valid_after_utc.isoformat()}; "
                "it signs nothing"
            )
        if now < cert.not_valid_before_utc:
            raise SignerError(
                f"the signing CA is not valid before {cert.not_valid_before_utc.isoformat()}"
            )


def utcnow() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def leaf_validity(
    signer: Signer, ttl: timedelta, now: datetime, skew: timedelta = DEFAULT_SKEW
) -> tuple[datetime, datetime]:
    """(NotBefore, NotAfter): backdated by ``skew``, never past the signer's NotAfter."""
    signer.check_can_sign(now)
    not_before = max(now - skew, signer.certificate.not_valid_before_utc)
    not_after = min(now + ttl, signer.not_after)
    return not_before, not_after


def build_leaf(
    signer: Signer,
    public_key: PublicKey,
    spiffe_id: SpiffeId,
    ttl: timedelta,
    *,
    dns_names: Sequence[str] = (),
    now: datetime | None = None,
    skew: timedelta = DEFAULT_SKEW,
) -> x509.Certificate:
    """Sign an X.509-SVID for ``spiffe_id`` over ``public_key`` (the profile of DESIGN.md)."""
    now = now or utcnow()
    not_before, not_after = leaf_validity(signer, ttl, now, skew)
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
    sans.extend(x509.DNSName(name) for name in dns_names)
    key_usage = _KU_RSA_LEAF if isinstance(public_key, rsa.RSAPublicKey) else _KU_EC_LEAF
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(signer.certificate.subject)
        .public_key(public_key)
        .serial_number(random_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(sans), critical=True)
        .add_extension(_BASIC_LEAF, critical=True)
        .add_extension(key_usage, critical=True)
        .add_extension(_EKU, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(signer.authority_key_identifier, critical=False)
    )
    return builder.sign(signer.key, hash_for(signer.key))


def ca_subject(trust_domain: TrustDomain, role: str) -> x509.Name:
    """A unique subject per CA: the serialNumber attribute is random."""
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshca"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, trust_domain.name),
            x509.NameAttribute(NameOID.COMMON_NAME, f"meshca {role} CA"),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, secrets.token_hex(16)),
        ]
    )


def build_ca(
    trust_domain: TrustDomain,
    key: PrivateKey,
    ttl: timedelta,
    *,
    parent: Signer | None = None,
    role: str = "root",
    path_length: int | None = None,
    now: datetime | None = None,
    skew: timedelta = DEFAULT_SKEW,
) -> x509.Certificate:
    """A CA certificate: self-signed when ``parent`` is None, else signed by ``parent``.

    A subordinate CA never outlives its parent (its NotAfter is clipped to the parent's).
    """
    now = now or utcnow()
    public_key = key.public_key()
    subject = ca_subject(trust_domain, role)
    not_before = now - skew
    not_after = now + ttl
    if parent is not None:
        parent.check_can_sign(now)
        not_after = min(not_after, parent.not_after)
        not_before = max(not_before, parent.certificate.not_valid_before_utc)
    issuer = parent.certificate.subject if parent is not None else subject
    signing_key = parent.key if parent is not None else key
    ski = x509.SubjectKeyIdentifier.from_public_key(public_key)
    aki = (
        parent.authority_key_identifier
        if parent is not None
        else x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(random_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_KU_CA, critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(trust_domain.id)]),
            critical=False,
        )
        .add_extension(ski, critical=False)
        .add_extension(aki, critical=False)
    )
    return builder.sign(signing_key, hash_for(signing_key))
