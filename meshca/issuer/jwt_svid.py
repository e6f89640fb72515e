"""JWT-SVIDs (the SPIFFE JWT-SVID spec): ES256 tokens whose ``sub`` is a SPIFFE ID.

Signed and checked here with ``cryptography`` alone; only ES256 is produced and only
ES256 is accepted, with a ``kid`` naming a key of the trust domain's JWT authorities,
so no algorithm confusion is possible. The authorities are published in the SPIFFE
bundle as JWKs with ``use: jwt-svid``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from meshca.issuer.errors import IssuerError
from meshca.spiffe import SpiffeId, SpiffeIdError, TrustDomain

ALGORITHM = "ES256"
DEFAULT_JWT_TTL = timedelta(minutes=5)
MAX_JWT_TTL = timedelta(hours=24)
MAX_TOKEN_BYTES = 16 * 1024
MAX_AUDIENCES = 32
LEEWAY = timedelta(seconds=30)


class JwtError(IssuerError):
    """A JWT-SVID that cannot be issued or does not validate; the message says why."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError):
        raise JwtError("JWT-SVID refused: not base64url") from None


def key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """A stable ``kid``: the SHA-256 of the public key's SubjectPublicKeyInfo."""
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return _b64(hashlib.sha256(spki).digest())[:32]


def jwt_authority_jwk(public_key: ec.EllipticCurvePublicKey) -> dict[str, Any]:
    numbers = public_key.public_numbers()
    return {
        "use": "jwt-svid",
        "kty": "EC",
        "crv": "P-256",
        "kid": key_id(public_key),
        "x": _b64(numbers.x.to_bytes(32, "big")),
        "y": _b64(numbers.y.to_bytes(32, "big")),
    }


def jwt_bundle_json(keys: Sequence[ec.EllipticCurvePublicKey]) -> bytes:
    """A JWK Set of JWT authorities (what the Workload API's FetchJWTBundles sends)."""
    return json.dumps({"keys": [jwt_authority_jwk(k) for k in keys]}, sort_keys=True).encode()


def parse_jwt_bundle(data: bytes) -> dict[str, ec.EllipticCurvePublicKey]:
    """``kid -> key`` of the P-256 JWT authorities in a JWK Set; others are skipped."""
    try:
        document = json.loads(data)
        found: dict[str, ec.EllipticCurvePublicKey] = {}
        for jwk in document.get("keys", []):
            if jwk.get("kty") != "EC" or jwk.get("crv") != "P-256" or not jwk.get("kid"):
                continue
            if jwk.get("use", "jwt-svid") != "jwt-svid":
                continue
            x = int.from_bytes(_unb64(jwk["x"]), "big")
            y = int.from_bytes(_unb64(jwk["y"]), "big")
            found[str(jwk["kid"])] = ec.EllipticCurvePublicNumbers(
                x, y, ec.SECP256R1()
            ).public_key()
        return found
    except (ValueError, KeyError, TypeError, AttributeError):
        raise JwtError("the JWT bundle is not a JWK Set meshca can read") from None


def _checked_audience(audience: Sequence[str]) -> list[str]:
    values = [a for a in audience if a]
    if not values:
        raise JwtError("a JWT-SVID needs at least one audience")
    if len(values) > MAX_AUDIENCES or any(len(a) > 512 for a in values):
        raise JwtError(f"at most {MAX_AUDIENCES} audiences of at most 512 characters")
    return values


@dataclass(frozen=True)
class JwtSigner:
    """The trust domain's JWT authority: an ES256 key held by meshca serve."""

    key: ec.EllipticCurvePrivateKey

    def __post_init__(self) -> None:
        if not isinstance(self.key.curve, ec.SECP256R1):
            raise JwtError("the JWT signing key must be EC P-256 (ES256)")

    @property
    def kid(self) -> str:
        return key_id(self.key.public_key())

    def sign(
        self,
        spiffe_id: SpiffeId,
        audience: Sequence[str],
        ttl: timedelta = DEFAULT_JWT_TTL,
        now: datetime | None = None,
    ) -> tuple[str, datetime]:
        """The token and its expiry."""
        if not timedelta(0) < ttl <= MAX_JWT_TTL:
            raise JwtError(f"a JWT-SVID lives more than 0 and at most {MAX_JWT_TTL}")
        now = now or datetime.now(UTC)
        expires = now + ttl
        header = {"alg": ALGORITHM, "kid": self.kid, "typ": "JWT"}
        exp = int(expires.timestamp())
        claims = {
            "sub": str(spiffe_id),
            "aud": _checked_audience(audience),
            "exp": exp,
            "iat": int(now.timestamp()),
            "jti": secrets.token_hex(16),
        }
        signing_input = (
            _b64(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + _b64(json.dumps(claims, separators=(",", ":")).encode())
        )
        der = self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return f"{signing_input}.{_b64(signature)}", datetime.fromtimestamp(exp, UTC)


class JwtAuthorities:
    """The JWT signing key in use and every key published beside it (a prepared successor
    before it signs, retired ones while tokens they signed may still be valid). Shared
    by the CSR API, which reads it on every call, and whoever rotates the key."""

    def __init__(
        self,
        signer: JwtSigner | None = None,
        published: Sequence[ec.EllipticCurvePublicKey] = (),
    ) -> None:
        self.signer = signer
        self.published: tuple[ec.EllipticCurvePublicKey, ...] = ()
        self._kids: list[str] = []
        self._bundle = b""
        self.update(signer, published)

    def update(
        self, signer: JwtSigner | None, published: Sequence[ec.EllipticCurvePublicKey]
    ) -> None:
        """Sign with ``signer`` from now on and publish ``published`` (plus the signer's
        own key, which is always published)."""
        keys = list(published)
        if signer is not None and all(key_id(k) != signer.kid for k in keys):
            keys.insert(0, signer.key.public_key())
        self.signer = signer
        self.published = tuple(keys)
        self._kids = [key_id(k) for k in keys]
        self._bundle = jwt_bundle_json(keys)

    def current(self) -> JwtSigner | None:
        """The key to sign with now."""
        return self.signer

    @property
    def kids(self) -> list[str]:
        """The published keys' ids (computed once per change: read at every agent poll)."""
        return list(self._kids)

    def bundle_json(self) -> bytes:
        """The JWK Set of every published key (computed once per change)."""
        return self._bundle


def validate_jwt_svid(
    token: str,
    audience: str,
    authorities: Mapping[str, ec.EllipticCurvePublicKey],
    trust_domain: TrustDomain,
    now: datetime | None = None,
) -> tuple[SpiffeId, dict[str, Any]]:
    """The token's SPIFFE ID and claims when it is a valid JWT-SVID of ``trust_domain``
    for ``audience``; JwtError otherwise."""
    if not audience:
        raise JwtError("an audience is required to validate a JWT-SVID")
    if len(token) > MAX_TOKEN_BYTES or token.count(".") != 2:
        raise JwtError("JWT-SVID refused: not a compact JWS")
    head, body, signature = token.split(".")
    try:
        header = json.loads(_unb64(head))
        claims = json.loads(_unb64(body))
    except ValueError:
        raise JwtError("JWT-SVID refused: header or claims are not JSON") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise JwtError("JWT-SVID refused: header or claims are not JSON objects")
    if header.get("alg") != ALGORITHM:
        raise JwtError(f"JWT-SVID refused: algorithm {str(header.get('alg'))[:20]!r} not ES256")
    key = authorities.get(str(header.get("kid", "")))
    if key is None:
        raise JwtError("JWT-SVID refused: signed by no JWT authority of this trust domain")
    raw = _unb64(signature)
    if len(raw) != 64:
        raise JwtError("JWT-SVID refused: malformed signature")
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    try:
        key.verify(der, f"{head}.{body}".encode(), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise JwtError("JWT-SVID refused: the signature does not verify") from None
    now = now or datetime.now(UTC)
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or now - LEEWAY >= datetime.fromtimestamp(exp, UTC):
        raise JwtError("JWT-SVID refused: expired or without exp")
    aud = claims.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if audience not in audiences:
        raise JwtError("JWT-SVID refused: not for this audience")
    try:
        spiffe_id = SpiffeId.parse(str(claims.get("sub", "")))
    except SpiffeIdError:
        raise JwtError("JWT-SVID refused: its sub is not a SPIFFE ID") from None
    if spiffe_id.trust_domain != trust_domain:
        raise JwtError(f"JWT-SVID refused: {spiffe_id} is outside {trust_domain}")
    return spiffe_id, claims
