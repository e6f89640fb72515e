"""The trust bundle: an ordered, de-duplicated set of root certificates."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from meshca.issuer.errors import IssuerError
from meshca.issuer.svid import certificates_pem, load_certificates_pem
from meshca.spiffe import TrustDomain

DEFAULT_REFRESH_HINT_SECONDS = 300


def _b64url_uint(value: int, size: int) -> str:
    return base64.urlsafe_b64encode(value.to_bytes(size, "big")).rstrip(b"=").decode()


_JWK_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}


def _jwk(cert: x509.Certificate) -> dict[str, Any]:
    key = cert.public_key()
    der = cert.public_bytes(serialization.Encoding.DER)
    jwk: dict[str, Any] = {"use": "x509-svid", "x5c": [base64.b64encode(der).decode()]}
    if isinstance(key, ec.EllipticCurvePublicKey):
        crv = _JWK_CURVES.get(key.curve.name)
        if crv is None:
            raise IssuerError(
                f"a root uses the curve {key.curve.name}, which a JWKS bundle cannot carry"
            )
        numbers = key.public_numbers()
        size = (key.curve.key_size + 7) // 8
        jwk.update(
            kty="EC", crv=crv, x=_b64url_uint(numbers.x, size), y=_b64url_uint(numbers.y, size)
        )
    elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        crv = "Ed25519" if isinstance(key, ed25519.Ed25519PublicKey) else "Ed448"
        jwk.update(kty="OKP", crv=crv, x=base64.urlsafe_b64encode(raw).rstrip(b"=").decode())
    elif isinstance(key, rsa.RSAPublicKey):
        numbers_rsa = key.public_numbers()
        jwk.update(
            kty="RSA",
            n=_b64url_uint(numbers_rsa.n, (numbers_rsa.n.bit_length() + 7) // 8),
            e=_b64url_uint(numbers_rsa.e, (numbers_rsa.e.bit_length() + 7) // 8),
        )
    else:
        raise IssuerError(f"a root uses a key ({type(key).__name__}) a JWKS bundle cannot carry")
    return jwk


@dataclass(frozen=True)
class TrustBundle:
    """Roots in a stable order (first seen first); equal bundles compare equal."""

    trust_domain: TrustDomain
    roots: tuple[x509.Certificate, ...]

    @classmethod
    def of(cls, trust_domain: TrustDomain, roots: Iterable[x509.Certificate]) -> TrustBundle:
        seen: set[bytes] = set()
        ordered: list[x509.Certificate] = []
        for cert in roots:
            der = cert.public_bytes(serialization.Encoding.DER)
            if der not in seen:
                seen.add(der)
                ordered.append(cert)
        return cls(trust_domain, tuple(ordered))

    @classmethod
    def from_pem(cls, trust_domain: TrustDomain, data: bytes) -> TrustBundle:
        return cls.of(trust_domain, load_certificates_pem(data, "trust bundle"))

    def __iter__(self) -> Iterator[x509.Certificate]:
        return iter(self.roots)

    def __len__(self) -> int:
        return len(self.roots)

    def __contains__(self, cert: object) -> bool:
        return isinstance(cert, x509.Certificate) and cert in self.roots

    def with_root(self, cert: x509.Certificate) -> TrustBundle:
        return TrustBundle.of(self.trust_domain, (*self.roots, cert))

    def without_root(self, cert: x509.Certificate) -> TrustBundle:
        return TrustBundle(self.trust_domain, tuple(r for r in self.roots if r != cert))

    def pem(self) -> bytes:
        return certificates_pem(self.roots)

    def jwks(
        self,
        sequence: int = 1,
        refresh_hint: int = DEFAULT_REFRESH_HINT_SECONDS,
        jwt_authorities: Sequence[dict[str, Any]] = (),
    ) -> dict[str, Any]:
        """The SPIFFE bundle format: a JWK Set with the ``x509-svid`` roots, then the
        ``jwt-svid`` authorities given."""
        return {
            "keys": [*(_jwk(cert) for cert in self.roots), *jwt_authorities],
            "spiffe_sequence": sequence,
            "spiffe_refresh_hint": refresh_hint,
        }

    def jwks_json(
        self,
        sequence: int = 1,
        refresh_hint: int = DEFAULT_REFRESH_HINT_SECONDS,
        jwt_authorities: Sequence[dict[str, Any]] = (),
    ) -> str:
        return json.dumps(self.jwks(sequence, refresh_hint, jwt_authorities), indent=2) + "\n"
