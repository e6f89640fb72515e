"""Leaf certificates assembled from a per-signer DER template.

``CertificateBuilder`` re-encodes the issuer name, the constant extensions and the AKI
on every call, and that costs more than the ECDSA signature itself. Everything that
does not change between leaves of one signer is encoded here once; each leaf splices
in only its serial, validity, public key, SAN and SKI, signs the TBS bytes with the
signer's key and wraps them. The TBS is byte-for-byte what ``CertificateBuilder``
produces for the same inputs (the tests hold the builder as the reference).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtensionOID

from meshca.issuer import der
from meshca.issuer.keys import PrivateKey, PublicKey

_VERSION_3 = der.tlv(der.CONTEXT_0, der.integer(2))
_EMPTY_NAME = der.sequence()
_SAN_OID = der.object_identifier(ExtensionOID.SUBJECT_ALTERNATIVE_NAME.dotted_string)
# The SKI extension is fixed-size (a SHA-1 digest): everything before the digest is constant.
_SKI_PREFIX = der.sequence(
    der.object_identifier(ExtensionOID.SUBJECT_KEY_IDENTIFIER.dotted_string),
    der.tlv(der.OCTET_STRING, der.tlv(der.OCTET_STRING, bytes(20))),
)[:-20]
# The SAN extension's OID and critical flag, before its OCTET STRING.
_SAN_HEAD = _SAN_OID + der.BOOLEAN_TRUE
_URI_TAG = 0x86  # GeneralName uniformResourceIdentifier [6] IA5String
_DNS_TAG = 0x82  # GeneralName dNSName [2] IA5String

_SIGNATURE_OIDS = {
    ("ec", "sha256"): "1.2.840.10045.4.3.2",
    ("ec", "sha384"): "1.2.840.10045.4.3.3",
    ("rsa", "sha256"): "1.2.840.113549.1.1.11",
    ("rsa", "sha384"): "1.2.840.113549.1.1.12",
}


def encode_extension(extension: x509.Extension[Any]) -> bytes:
    """Extension ::= SEQUENCE { extnID, critical BOOLEAN DEFAULT FALSE, extnValue }."""
    return der.sequence(
        der.object_identifier(extension.oid.dotted_string),
        der.BOOLEAN_TRUE if extension.critical else b"",
        der.tlv(der.OCTET_STRING, extension.value.public_bytes()),
    )


def _signature_scheme(
    key: PrivateKey, algorithm: hashes.SHA256 | hashes.SHA384
) -> tuple[bytes, Callable[[bytes], bytes]]:
    """The AlgorithmIdentifier DER and the signing call for ``key`` with ``algorithm``."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        oid = _SIGNATURE_OIDS["ec", algorithm.name]
        ecdsa = ec.ECDSA(algorithm)
        return der.sequence(der.object_identifier(oid)), lambda tbs: key.sign(tbs, ecdsa)
    if isinstance(key, rsa.RSAPrivateKey):
        oid = _SIGNATURE_OIDS["rsa", algorithm.name]
        pkcs1 = padding.PKCS1v15()
        return (
            der.sequence(der.object_identifier(oid), der.NULL),
            lambda tbs: key.sign(tbs, pkcs1, algorithm),
        )
    raise TypeError(f"unsupported signing key {type(key).__name__}")


def subject_public_key_info(public_key: PublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# A P-256 SubjectPublicKeyInfo up to its point: every P-256 key's is the same (an
# uncompressed point, no unused bits), so its bits are found without reading the DER.
_P256_SPKI_HEAD = bytes.fromhex("3059301306072a8648ce3d020106082a8648ce3d030107034200")
_P256_SPKI_SIZE = len(_P256_SPKI_HEAD) + 65


def key_identifier(spki: bytes) -> bytes:
    """RFC 5280 4.2.1.2 method 1: SHA-1 of the subjectPublicKey BIT STRING's bits."""
    if len(spki) == _P256_SPKI_SIZE and spki.startswith(_P256_SPKI_HEAD):
        return hashlib.sha1(spki[len(_P256_SPKI_HEAD) :], usedforsecurity=False).digest()
    _, body, _ = der.read_tlv(spki)
    _, _, algorithm_end = der.read_tlv(spki, body)
    tag, bits, bits_end = der.read_tlv(spki, algorithm_end)
    if tag != der.BIT_STRING:
        raise ValueError("malformed SubjectPublicKeyInfo")
    return hashlib.sha1(spki[bits + 1 : bits_end], usedforsecurity=False).digest()


def _ia5(tag: int, value: str) -> bytes:
    try:
        return der.tlv(tag, value.encode("ascii"))
    except UnicodeEncodeError:
        raise ValueError(f"{value!r} is not ASCII (IA5String)") from None


class LeafTemplate:
    """The constant DER of one signer's leaves, and the call that completes and signs one.

    ``between_san_and_ski`` maps "is the leaf key RSA" to the extensions that follow the
    SAN (key usage differs for RSA keys); ``after_ski`` are the trailing extensions.
    """

    def __init__(
        self,
        signing_key: PrivateKey,
        algorithm: hashes.SHA256 | hashes.SHA384,
        issuer: x509.Name,
        *,
        between_san_and_ski: Mapping[bool, Sequence[x509.Extension[Any]]],
        after_ski: Sequence[x509.Extension[Any]],
    ) -> None:
        self._signature_algorithm, self._sign = _signature_scheme(signing_key, algorithm)
        self._after_serial = self._signature_algorithm + issuer.public_bytes()
        self._middle = {
            is_rsa: b"".join(encode_extension(ext) for ext in extensions)
            for is_rsa, extensions in between_san_and_ski.items()
        }
        self._tail = b"".join(encode_extension(ext) for ext in after_ski)
        self._last_validity: tuple[datetime | None, datetime | None, bytes] = (None, None, b"")

    def tbs(
        self,
        public_key: PublicKey,
        uri: str,
        dns_names: Sequence[str],
        serial: int,
        not_before: datetime,
        not_after: datetime,
    ) -> bytes:
        """The TBSCertificate DER: empty subject, one URI SAN (critical) then DNS SANs."""
        if not 0 < serial < 1 << 159:
            raise ValueError("the serial number must be positive and at most 159 bits")
        if not_after < not_before:
            raise ValueError("NotAfter must not be before NotBefore")
        for name in dns_names:
            x509.DNSName(name)  # the same validation the builder applies
        spki = subject_public_key_info(public_key)
        general_names = _ia5(_URI_TAG, uri)
        if dns_names:
            general_names += b"".join(_ia5(_DNS_TAG, n) for n in dns_names)
        san = _SAN_HEAD + der.tlv(der.OCTET_STRING, der.sequence(general_names))
        san = der.tlv(der.SEQUENCE, san)
        ski = _SKI_PREFIX + key_identifier(spki)
        extensions = san + self._middle[isinstance(public_key, rsa.RSAPublicKey)] + ski + self._tail
        return der.tlv(
            der.SEQUENCE,
            _VERSION_3
            + der.integer(serial)
            + self._after_serial
            + self._validity(not_before, not_after)
            + _EMPTY_NAME
            + spki
            + der.tlv(der.CONTEXT_3, der.tlv(der.SEQUENCE, extensions)),
        )

    def _validity(self, not_before: datetime, not_after: datetime) -> bytes:
        """The Validity DER; leaves signed within the same second share it, so the last
        one is kept."""
        last = self._last_validity
        if last[0] == not_before and last[1] == not_after:
            return last[2]
        encoded = der.sequence(der.time(not_before), der.time(not_after))
        self._last_validity = (not_before, not_after, encoded)
        return encoded

    def certificate(self, tbs: bytes) -> x509.Certificate:
        """Sign ``tbs`` and wrap it: Certificate ::= SEQUENCE { tbs, algorithm, signature }."""
        signature = der.tlv(der.BIT_STRING, b"\x00" + self._sign(tbs))
        return x509.load_der_x509_certificate(
            der.sequence(tbs, self._signature_algorithm, signature)
        )
