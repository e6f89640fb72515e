"""The trust domain's JWT authority key, kept in ``<data dir>/jwt/jwt-key.pem`` (0600).

Created by the first ``meshca serve`` that needs it (create-if-absent through a hard
link, so two servers sharing a data directory end up with the same key); read by
``meshca bundle`` to publish its public half. It is not rotated through the CA's
journaled slots yet: replacing it means replacing this file and restarting meshca,
which invalidates JWT-SVIDs signed with the old key at once.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshca.issuer.errors import IssuerError
from meshca.issuer.jwt_svid import JwtSigner
from meshca.issuer.keys import private_key_pem
from meshca.util.files import PRIVATE, atomic_create, ensure_private_dir

JWT_DIR = "jwt"
KEY_FILE = "jwt-key.pem"


def jwt_key_path(data_dir: Path) -> Path:
    return Path(data_dir) / JWT_DIR / KEY_FILE


def _load(path: Path) -> JwtSigner:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except ValueError:
        raise IssuerError(f"{path}: not a readable PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise IssuerError(f"{path}: the JWT signing key must be EC P-256")
    return JwtSigner(key)


def load_jwt_signer(data_dir: Path) -> JwtSigner | None:
    path = jwt_key_path(data_dir)
    return _load(path) if path.exists() else None


def load_or_create_jwt_signer(data_dir: Path) -> JwtSigner:
    path = jwt_key_path(data_dir)
    if path.exists():
        return _load(path)
    ensure_private_dir(path.parent)
    data = private_key_pem(ec.generate_private_key(ec.SECP256R1()))
    atomic_create(path, data, PRIVATE)  # another server may have made it first: theirs stays
    return _load(path)
