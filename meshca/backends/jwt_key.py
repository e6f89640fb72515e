"""The trust domain's JWT authority as its readers see it in ``<data dir>/jwt/``.

``jwt-key.pem`` (0600) is the key that signs now; ``jwks.json`` the public keys
published (the signing key, a prepared successor, retired keys still inside the longest
JWT-SVID lifetime). Rotation (``meshca.rotation``) keeps the keys in its journal and
publishes them here, as it publishes the signing CA to ``ca/``; ``meshca bundle`` reads
``jwks.json``. Without rotation (Vault's per-workload mode) the key is created by the
first ``meshca serve`` that needs it (create-if-absent through a hard link, so two
servers sharing a data directory end up with the same key).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshca.issuer.errors import IssuerError
from meshca.issuer.jwt_svid import JwtAuthorities, JwtError, JwtSigner, parse_jwt_bundle
from meshca.issuer.keys import private_key_pem
from meshca.util.files import PRIVATE, PUBLIC, atomic_create, atomic_write, ensure_private_dir

JWT_DIR = "jwt"
KEY_FILE = "jwt-key.pem"
JWKS_FILE = "jwks.json"


def jwt_key_path(data_dir: Path) -> Path:
    return Path(data_dir) / JWT_DIR / KEY_FILE


def jwks_path(data_dir: Path) -> Path:
    return Path(data_dir) / JWT_DIR / JWKS_FILE


def load_jwt_key_pem(data: bytes, where: str) -> JwtSigner:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except ValueError:
        raise IssuerError(f"{where}: not a readable PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise IssuerError(f"{where}: the JWT signing key must be EC P-256")
    try:
        return JwtSigner(key)
    except JwtError as exc:
        raise IssuerError(f"{where}: {exc}") from None


def new_jwt_key_pem() -> bytes:
    return private_key_pem(ec.generate_private_key(ec.SECP256R1()))


def _load(path: Path) -> JwtSigner:
    return load_jwt_key_pem(path.read_bytes(), str(path))


def load_jwt_signer(data_dir: Path) -> JwtSigner | None:
    path = jwt_key_path(data_dir)
    return _load(path) if path.exists() else None


def load_or_create_jwt_signer(data_dir: Path) -> JwtSigner:
    path = jwt_key_path(data_dir)
    if path.exists():
        return _load(path)
    ensure_private_dir(path.parent)
    atomic_create(path, new_jwt_key_pem(), PRIVATE)  # another server's key, if first, stays
    return _load(path)


def publish_jwt_keys(
    data_dir: Path, signer: JwtSigner, published: Sequence[ec.EllipticCurvePublicKey]
) -> None:
    """Write the signing key and the published JWK Set, each only when it changed."""
    key_path, set_path = jwt_key_path(data_dir), jwks_path(data_dir)
    ensure_private_dir(key_path.parent)
    pem = private_key_pem(signer.key)
    if not key_path.exists() or key_path.read_bytes() != pem:
        atomic_write(key_path, pem, PRIVATE)
    document = JwtAuthorities(signer, published).bundle_json()
    if not set_path.exists() or set_path.read_bytes() != document:
        atomic_write(set_path, document, PUBLIC)


class PublishedJwtAuthorities(JwtAuthorities):
    """The JWT keys as the data directory publishes them, for a server that does not hold
    the rotation journal (a replica beside the one that rotates, or Vault's per-workload
    mode): the signing key (created if absent) and ``jwks.json``, read again whenever
    either file changes, so a rotation made by the other process is followed."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self._stamp: tuple[int, ...] | None = None
        super().__init__()
        self.refresh()

    def _files_stamp(self) -> tuple[int, ...]:
        stamp: list[int] = []
        for path in (jwt_key_path(self.data_dir), jwks_path(self.data_dir)):
            try:
                st = os.stat(path)
                stamp += [st.st_mtime_ns, st.st_ino]
            except FileNotFoundError:
                stamp += [0, 0]
        return tuple(stamp)

    def refresh(self) -> None:
        stamp = self._files_stamp()
        if stamp == self._stamp:
            return
        self.update(load_or_create_jwt_signer(self.data_dir), _published(self.data_dir))
        self._stamp = self._files_stamp()

    def current(self) -> JwtSigner | None:
        self.refresh()
        return self.signer

    def bundle_json(self) -> bytes:
        self.refresh()
        return super().bundle_json()


def published_jwt_keys(data_dir: Path) -> list[ec.EllipticCurvePublicKey]:
    """The public keys to show in a bundle (``meshca bundle``): ``jwks.json``, or the
    signing key alone where no rotation has published a set; none before either exists."""
    published = _published(data_dir)
    if published:
        return published
    signer = load_jwt_signer(data_dir)
    return [signer.key.public_key()] if signer is not None else []


def _published(data_dir: Path) -> list[ec.EllipticCurvePublicKey]:
    path = jwks_path(data_dir)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    try:
        return list(parse_jwt_bundle(data).values())
    except JwtError:
        raise IssuerError(f"{path}: not a JWK Set meshca can read") from None
