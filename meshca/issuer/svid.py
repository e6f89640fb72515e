"""The X.509-SVID value object and the check that a certificate follows the leaf profile."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from meshca.issuer.errors import PemError, SvidError
from meshca.issuer.keys import PrivateKey, key_type_of, private_key_pem
from meshca.spiffe import SpiffeId, SpiffeIdError
from meshca.util.formats import rfc3339, serial_hex

# cryptography parses certificate fields lazily: a damaged field raises one of these
# when it is first read, long after the PEM loaded.
MALFORMED_CERTIFICATE = (
    ValueError,
    UnsupportedAlgorithm,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
)


def certificates_pem(certs: tuple[x509.Certificate, ...] | list[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


_INTERMEDIATES_PEM: dict[tuple[x509.Certificate, ...], bytes] = {}
_INTERMEDIATES_KEPT = 8  # a few signers at once: the active one, and during rotations two more
# The chain found last: every leaf of one signer ends with the very same certificate
# objects, which compare equal at once, where hashing them (their DER) to find the dict
# entry costs more.
_last_intermediates: tuple[tuple[x509.Certificate, ...], bytes] = ((), b"")


def intermediates_pem(certs: tuple[x509.Certificate, ...]) -> bytes:
    """The PEM of the CAs that follow a leaf, encoded once per signing chain: every
    certificate a signer issues ends with the same ones."""
    global _last_intermediates
    last, encoded = _last_intermediates
    if last == certs:  # a tuple compares its items by identity first
        return encoded
    found = _INTERMEDIATES_PEM.get(certs)
    if found is None:
        found = certificates_pem(certs)
        if len(_INTERMEDIATES_PEM) >= _INTERMEDIATES_KEPT:
            _INTERMEDIATES_PEM.clear()
        _INTERMEDIATES_PEM[certs] = found
    _last_intermediates = (certs, found)
    return found


_DER: dict[tuple[x509.Certificate, ...], tuple[bytes, ...]] = {}
_DER_KEPT = 16  # a few signing chains and bundles at once (during rotations, more)


def certificates_der(certs: tuple[x509.Certificate, ...]) -> list[bytes]:
    """The DER of each of ``certs`` (a signing chain's CAs, a bundle's roots), encoded
    once per chain or bundle: every answer of the CSR API carries the same ones."""
    encoded = _DER.get(certs)
    if encoded is None:
        encoded = tuple(c.public_bytes(serialization.Encoding.DER) for c in certs)
        if len(_DER) >= _DER_KEPT:
            _DER.clear()
        _DER[certs] = encoded
    return list(encoded)


def load_certificates_pem(data: bytes, what: str = "certificate file") -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except (ValueError, x509.InvalidVersion):
        raise PemError(f"cannot read {what}: it holds no readable PEM certificate") from None
    if not certs:
        raise PemError(f"cannot read {what}: it holds no certificate")
    return certs


def fingerprint(cert: x509.Certificate) -> str:
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2)).upper()


def spiffe_id_of(cert: x509.Certificate) -> SpiffeId:
    """The SPIFFE ID of a leaf that follows the X.509-SVID profile; SvidError otherwise."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        raise SvidError("san-missing", "no subjectAltName extension") from None
    except ValueError as exc:
        raise SvidError("extensions", f"malformed extensions: {exc}") from None
    uris = sans.value.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise SvidError("san-uri-count", f"exactly one URI SAN required, found {len(uris)}")
    if len(cert.subject) == 0 and not sans.critical:
        raise SvidError("san-critical", "the SAN must be critical when the subject is empty")
    try:
        spiffe_id = SpiffeId.parse(uris[0])
    except SpiffeIdError as exc:
        raise SvidError("spiffe-id", str(exc)) from None
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        raise SvidError("basic-constraints", "no basicConstraints extension") from None
    if basic.value.ca:
        raise SvidError("basic-constraints", "a leaf SVID must not be a CA (CA=true)")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    except x509.ExtensionNotFound:
        raise SvidError("key-usage", "no keyUsage extension") from None
    if not usage.critical:
        raise SvidError("key-usage", "keyUsage must be critical")
    if not usage.value.digital_signature:
        raise SvidError("key-usage", "keyUsage must include digitalSignature")
    if usage.value.key_cert_sign or usage.value.crl_sign:
        raise SvidError("key-usage", "a leaf must not have keyCertSign or cRLSign")
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if eku is not None and not {
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    } <= set(eku):
        raise SvidError(
            "extended-key-usage", "extendedKeyUsage must allow serverAuth and clientAuth"
        )
    return spiffe_id


@dataclass(frozen=True)
class X509Svid:
    """An issued SVID: its ID, the chain (leaf first, then intermediates; never the root),
    and the private key when meshca generated it (None when it signed a caller's CSR)."""

    spiffe_id: SpiffeId
    chain: tuple[x509.Certificate, ...]
    private_key: PrivateKey | None = None

    def __repr__(self) -> str:  # never show key material
        serial, not_after = serial_hex(self.serial), rfc3339(self.not_after)
        return f"X509Svid({self.spiffe_id}, serial={serial}, not_after={not_after})"

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def intermediates(self) -> tuple[x509.Certificate, ...]:
        return self.chain[1:]

    @property
    def serial(self) -> int:
        return self.leaf.serial_number

    @property
    def not_before(self) -> datetime:
        return self.leaf.not_valid_before_utc

    @property
    def not_after(self) -> datetime:
        return self.leaf.not_valid_after_utc

    def chain_pem(self) -> bytes:
        leaf = self.chain[0].public_bytes(serialization.Encoding.PEM)
        return leaf + intermediates_pem(self.chain[1:]) if len(self.chain) > 1 else leaf

    def private_key_pem(self) -> bytes:
        if self.private_key is None:
            raise ValueError("this SVID was signed from a CSR: meshca holds no private key for it")
        return private_key_pem(self.private_key)

    @property
    def key_type(self) -> str:
        return key_type_of(self.leaf.public_key()).value
