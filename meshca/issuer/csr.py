"""CSR intake: only the public key of a CSR is ever used, and only after checks."""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import SignatureAlgorithmOID

from meshca.issuer.errors import CsrError, KeyTypeError
from meshca.issuer.keys import PublicKey, key_type_of

MAX_CSR_BYTES = 64 * 1024

_ECDSA_HASHES: dict[x509.ObjectIdentifier, type[hashes.HashAlgorithm]] = {
    SignatureAlgorithmOID.ECDSA_WITH_SHA256: hashes.SHA256,
    SignatureAlgorithmOID.ECDSA_WITH_SHA384: hashes.SHA384,
    SignatureAlgorithmOID.ECDSA_WITH_SHA512: hashes.SHA512,
}


def load_csr(data: bytes) -> x509.CertificateSigningRequest:
    if len(data) > MAX_CSR_BYTES:
        raise CsrError(f"CSR refused: larger than {MAX_CSR_BYTES} bytes")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except (ValueError, UnsupportedAlgorithm, x509.InvalidVersion) as exc:
        raise CsrError(f"cannot read CSR: {exc}") from None


def csr_public_key(csr: x509.CertificateSigningRequest) -> PublicKey:
    """The CSR's key once its signature verifies and its type is allowed.

    Subject, SANs, extensions and CA flags of the CSR are ignored on purpose: the
    certificate carries the identity the caller was authorised for, nothing else.
    """
    try:
        key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CsrError(f"CSR refused: unsupported public key: {exc}") from None
    try:
        key_type_of(key)
    except KeyTypeError as exc:
        raise CsrError(f"CSR refused: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise CsrError(f"CSR refused: unsupported public key {type(key).__name__}")
    if not _signature_verifies(csr, key):
        raise CsrError("CSR refused: its signature does not verify (proof of possession failed)")
    return key


def _signature_verifies(csr: x509.CertificateSigningRequest, key: PublicKey) -> bool:
    """Proof of possession. An ECDSA-signed CSR is checked with the key already loaded
    (``is_signature_valid`` would load it a second time); any other algorithm goes
    through ``is_signature_valid``."""
    try:
        ecdsa_hash = _ECDSA_HASHES.get(csr.signature_algorithm_oid)
        if ecdsa_hash is None or not isinstance(key, ec.EllipticCurvePublicKey):
            return csr.is_signature_valid
        try:
            key.verify(csr.signature, csr.tbs_certrequest_bytes, ec.ECDSA(ecdsa_hash()))
        except InvalidSignature:
            return False
        return True
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CsrError(f"CSR refused: cannot check its signature: {exc}") from None


def check_csr_claims(csr: x509.CertificateSigningRequest, spiffe_id: str | None) -> None:
    """Refuse a CSR that asks for more than ``spiffe_id`` as a leaf (None: a CSR that
    must name nothing): another or an extra name, or CA:true. The certificate would not
    carry them anyway (only the key is used); refusing tells a confused or hostile
    requester so, instead of silently issuing something else than it asked for."""
    try:
        extensions = list(csr.extensions)
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise CsrError(f"CSR refused: malformed extensions: {exc}") from None
    for extension in extensions:
        value = extension.value
        if isinstance(value, x509.BasicConstraints) and value.ca:
            raise CsrError("CSR refused: it asks for CA:true; only leaf SVIDs are signed")
        if isinstance(value, x509.SubjectAlternativeName):
            names = [name.value for name in value]
            if any(name != spiffe_id for name in names) or len(names) > 1:
                shown = ", ".join(str(n) for n in names[:4])[:300]
                wanted = spiffe_id or "nothing (the agent's ID is assigned at attestation)"
                raise CsrError(
                    f"CSR refused: its subjectAltName ({shown}) names more than {wanted}"
                )
