"""The certificate profiles: the X.509-SVID leaf and meshca's CA certificates (docs/design.md).

Everything here is decided by meshca, never copied from a request: the identity is
what the caller asked for and was allowed, and nothing in a CSR but its public key is
used.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshca.issuer.errors import IssuerError, SignerError
from meshca.issuer.keys import PrivateKey, PublicKey
from meshca.issuer.leaf_template import LeafTemplate
from meshca.spiffe import SpiffeId, TrustDomain
from meshca.util.formats import rfc3339

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


_DNS_NAME = re.compile(
    r"(\*\.)?[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*"
)


def check_dns_names(names: Sequence[str]) -> tuple[str, ...]:
    """ASCII host names (IDNA-encoded; an optional leading ``*.``), at most 253 characters."""
    for name in names:
        if not isinstance(name, str) or len(name) > 253 or not _DNS_NAME.fullmatch(name):
            raise IssuerError(f"{name!r} is not a DNS name (use ASCII labels, IDNA-encoded)")
    return tuple(names)


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

    The AKI, the DER template of its leaves, the chain that follows them and the
    validity window are computed once, because every leaf needs them.
    """

    key: PrivateKey
    certificate: x509.Certificate
    intermediates: tuple[x509.Certificate, ...] = ()
    _aki: x509.AuthorityKeyIdentifier = field(init=False, repr=False, compare=False)
    _leaf_template: LeafTemplate | None = field(init=False, repr=False, compare=False)
    _chain: tuple[x509.Certificate, ...] = field(init=False, repr=False, compare=False)
    _validity: tuple[datetime, datetime] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            ski = self.certificate.extensions.get_extension_for_class(
                x509.SubjectKeyIdentifier
            ).value
            aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        except x509.ExtensionNotFound:
            aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(self.certificate.public_key())  # type: ignore[arg-type]
        object.__setattr__(self, "_aki", aki)
        try:
            template = _leaf_template_for(self.key, self.certificate, aki)
        except TypeError:  # a key type meshca does not sign with: refused when used
            template = None
        object.__setattr__(self, "_leaf_template", template)
        cert = self.certificate
        chain = () if cert.issuer == cert.subject else (cert, *self.intermediates)
        object.__setattr__(self, "_chain", chain)
        object.__setattr__(self, "_validity", (cert.not_valid_before_utc, cert.not_valid_after_utc))

    @property
    def authority_key_identifier(self) -> x509.AuthorityKeyIdentifier:
        return self._aki

    @property
    def leaf_template(self) -> LeafTemplate:
        if self._leaf_template is None:
            raise SignerError(
                f"the signing CA's key ({type(self.key).__name__}) cannot sign: use EC or RSA"
            )
        return self._leaf_template

    @property
    def not_before(self) -> datetime:
        return self._validity[0]

    @property
    def not_after(self) -> datetime:
        return self._validity[1]

    @property
    def is_self_signed(self) -> bool:
        return self.certificate.issuer == self.certificate.subject

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """What follows a leaf in ``cert.pem``: this CA and intermediates, never the root."""
        return self._chain

    def check_can_sign(self, now: datetime) -> None:
        not_before, not_after = self._validity
        if now >= not_after:
            raise SignerError(f"the signing CA expired at {rfc3339(not_after)}; it signs nothing")
        if now < not_before:
            raise SignerError(f"the signing CA is not valid before {rfc3339(not_before)}")


def _leaf_template_for(
    key: PrivateKey, certificate: x509.Certificate, aki: x509.AuthorityKeyIdentifier
) -> LeafTemplate:
    """The leaf profile's constant part for one signer (the order of build_leaf's extensions)."""
    fixed_ec = (
        x509.Extension(_BASIC_LEAF.oid, True, _BASIC_LEAF),
        x509.Extension(_KU_EC_LEAF.oid, True, _KU_EC_LEAF),
        x509.Extension(_EKU.oid, False, _EKU),
    )
    fixed_rsa = (fixed_ec[0], x509.Extension(_KU_RSA_LEAF.oid, True, _KU_RSA_LEAF), fixed_ec[2])
    return LeafTemplate(
        key,
        hash_for(key),
        certificate.subject,
        between_san_and_ski={False: fixed_ec, True: fixed_rsa},
        after_ski=(x509.Extension(aki.oid, False, aki),),
    )


def utcnow() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def validity_under(
    signer: Signer, ttl: timedelta, now: datetime, skew: timedelta = DEFAULT_SKEW
) -> tuple[datetime, datetime]:
    """(NotBefore, NotAfter) of a certificate ``signer`` signs now: backdated by ``skew``,
    within the signer's own validity; SignerError when the signer cannot sign now."""
    signer.check_can_sign(now)
    not_before = max(now - skew, signer.not_before)
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
    """Sign an X.509-SVID for ``spiffe_id`` over ``public_key`` (the profile of docs/design.md).

    Extensions, in order: SAN (critical: the subject is empty), BasicConstraints CA=false
    (critical), KeyUsage (critical; digitalSignature, + keyEncipherment for RSA keys),
    ExtendedKeyUsage serverAuth + clientAuth, SKI, AKI. Assembled from the signer's
    template; equal in its TBS to the same certificate made with CertificateBuilder.
    """
    now = now or utcnow()
    not_before, not_after = validity_under(signer, ttl, now, skew)
    template = signer.leaf_template
    tbs = template.tbs(
        public_key, str(spiffe_id), dns_names, random_serial(), not_before, not_after
    )
    return template.certificate(tbs)


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
    ski = x509.SubjectKeyIdentifier.from_public_key(public_key)
    if parent is None:
        not_before, not_after = now - skew, now + ttl
        issuer, signing_key = subject, key
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    else:
        not_before, not_after = validity_under(parent, ttl, now, skew)
        issuer, signing_key = parent.certificate.subject, parent.key
        aki = parent.authority_key_identifier
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
