"""The local backend: a root and an intermediate signing CA kept in the data directory.

Layout of ``<data-dir>/ca/`` (Istio's ``cacerts`` names, so operators recognise it):

``root-cert.pem``   the self-signed root (the trust bundle)
``root-key.pem``    the root key, 0600; may be moved offline once the intermediate exists
``ca-cert.pem``     the signing (intermediate) CA
``ca-key.pem``      its key, 0600
``cert-chain.pem``  the signing CA and any intermediates above it, root excluded
``meta.json``       trust domain, origin, creation time (and, for a replica's own
                    intermediate, the cacerts directory it was minted from)

The whole directory is built under a temporary name and renamed into place, so a
crash never leaves half a CA. An existing CA is never replaced unless forced, and then
it is moved to ``<data-dir>/backup/ca-<timestamp>/`` first.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509

from meshca.issuer import (
    ChainError,
    IssuerError,
    KeyType,
    KeyTypeError,
    Signer,
    SvidError,
    TrustBundle,
)
from meshca.issuer.keys import (
    PrivateKey,
    generate_private_key,
    key_matches,
    key_type_of,
    load_private_key_pem,
    private_key_pem,
)
from meshca.issuer.policy import DEFAULT_INTERMEDIATE_TTL, DEFAULT_ROOT_TTL
from meshca.issuer.profile import build_ca, utcnow
from meshca.issuer.svid import certificates_pem, load_certificates_pem
from meshca.issuer.verify import self_check, verify_chain
from meshca.spiffe import TrustDomain
from meshca.util.files import (
    PRIVATE,
    PUBLIC,
    atomic_write,
    ensure_private_dir,
    fsync_directory,
    loose_key_mode,
)
from meshca.util.formats import name_text, rfc3339

if TYPE_CHECKING:  # loaded by the commands that sign, not by bundle or inspect
    from meshca.backends.opened import OpenedBackend
    from meshca.issuer import ActiveSigner

CA_DIR = "ca"
BACKUP_DIR = "backup"
ROOT_CERT = "root-cert.pem"
ROOT_KEY = "root-key.pem"
CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
CERT_CHAIN = "cert-chain.pem"
META = "meta.json"
OWN_INTERMEDIATE = "own intermediate"  # how an own intermediate's origin starts


class CaError(IssuerError):
    """The data directory's CA is missing, already present, or unusable."""


class CaExistsError(CaError):
    pass


class CaMissingError(CaError):
    pass


LOCAL = "local"  # the backend's name (a metrics label)


@dataclass(frozen=True)
class LocalCa:
    """A CA loaded from (or just written to) the data directory."""

    directory: Path
    trust_domain: TrustDomain
    signer: Signer
    bundle: TrustBundle
    origin: str

    def authority(self) -> ActiveSigner:
        from meshca.issuer import ActiveSigner

        return ActiveSigner(self.signer, self.bundle)

    def opened(self) -> OpenedBackend:
        """The local backend: this CA signs in process (self-checked here), and rotation
        renews it from the data directory's keys."""
        from meshca.backends.opened import LocalCaRotation, OpenedBackend

        authority = self.authority()
        rotation = LocalCaRotation(self.directory.parent, authority)
        return OpenedBackend(LOCAL, authority, signer=authority, rotation=rotation)


def ca_directory(data_dir: Path) -> Path:
    return Path(data_dir) / CA_DIR


def ca_exists(data_dir: Path) -> bool:
    return (ca_directory(data_dir) / CA_CERT).exists()


def ca_files(
    signer: Signer,
    bundle: TrustBundle,
    root_key: PrivateKey | None,
    meta: Mapping[str, object],
) -> dict[str, tuple[bytes, int]]:
    """The files of ``ca/`` (name: bytes and mode) for ``signer`` under ``bundle``, with
    the root key when it is kept here; ``meta.json`` holds ``meta`` and the key type."""
    meta_json = json.dumps({**meta, "key_type": key_type_of(signer.key).value}, indent=2)
    files = {
        ROOT_CERT: (bundle.pem(), PUBLIC),
        CA_CERT: (certificates_pem([signer.certificate]), PUBLIC),
        CA_KEY: (private_key_pem(signer.key), PRIVATE),
        CERT_CHAIN: (certificates_pem([signer.certificate, *signer.intermediates]), PUBLIC),
        META: ((meta_json + "\n").encode(), PUBLIC),
    }
    if root_key is not None:
        files[ROOT_KEY] = (private_key_pem(root_key), PRIVATE)
    return files


def _new_meta(trust_domain: TrustDomain, origin: str) -> dict[str, str]:
    return {"trust_domain": trust_domain.name, "origin": origin, "created": utcnow().isoformat()}


def _exists_error(target: Path) -> CaExistsError:
    return CaExistsError(
        f"a CA already exists in {target}; it was left unchanged "
        "(use --force to replace it; the old one is kept in a backup)"
    )


def _check_not_present(data_dir: Path, force: bool) -> None:
    if ca_exists(data_dir) and not force:
        raise _exists_error(ca_directory(data_dir))


def _install(data_dir: Path, files: dict[str, tuple[bytes, int]], force: bool) -> LocalCa:
    """Write ``files`` into a staging directory and rename it into place, backing up any
    existing CA when forced; returns the CA as loaded back."""
    import shutil  # with tempfile, only for writing a CA: the commands that load one start
    import tempfile  # faster without them (and the archive modules shutil pulls in)

    ensure_private_dir(Path(data_dir))
    staged = Path(tempfile.mkdtemp(prefix=".ca-new-", dir=data_dir))
    try:
        for name, (data, mode) in files.items():
            atomic_write(staged / name, data, mode)
        target = ca_directory(data_dir)
        if target.exists():
            if not force:
                raise _exists_error(target)
            backups = ensure_private_dir(Path(data_dir) / BACKUP_DIR)
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
            os.rename(target, backups / f"ca-{stamp}")
            fsync_directory(backups)
        os.rename(staged, target)
        fsync_directory(Path(data_dir))
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return load_local_ca(data_dir)


def init_local_ca(
    data_dir: Path,
    trust_domain: TrustDomain,
    *,
    key_type: KeyType = KeyType.EC_P256,
    root_ttl: timedelta = DEFAULT_ROOT_TTL,
    intermediate_ttl: timedelta | None = None,
    force: bool = False,
    path_length: int = 0,
) -> LocalCa:
    """Create a self-signed root and an intermediate signing CA under it. ``path_length``
    1 lets that CA sign one level of CAs (replicas' own intermediates), not only SVIDs."""
    _check_not_present(data_dir, force)
    root_key = generate_private_key(key_type)
    root = build_ca(trust_domain, root_key, root_ttl, role="root")
    root_signer = Signer(root_key, root)
    ca_key = generate_private_key(key_type)
    ca_ttl = intermediate_ttl or min(DEFAULT_INTERMEDIATE_TTL, root_ttl)
    ca_cert = build_ca(
        trust_domain,
        ca_key,
        ca_ttl,
        parent=root_signer,
        role="intermediate",
        path_length=path_length,
    )
    signer = Signer(ca_key, ca_cert)
    bundle = TrustBundle.of(trust_domain, [root])
    self_check(signer, bundle)
    files = ca_files(signer, bundle, root_key, _new_meta(trust_domain, "generated"))
    return _install(data_dir, files, force)


# Plugged-in CAs: Istio's cacerts layout and the kubernetes.io/tls layout.
_LAYOUTS = (
    ("istio", "ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem"),
    ("kubernetes.io/tls", "tls.crt", "tls.key", "ca.crt", None),
)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CaError(f"cannot read {path}: {exc.strerror}") from None


def _is_ca_cert(cert: x509.Certificate) -> bool:
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return bool(basic.ca and usage.key_cert_sign)


def read_cacerts(source: Path, trust_domain: TrustDomain) -> tuple[Signer, TrustBundle, str]:
    """The CA in a cacerts directory (Istio ``cacerts`` or ``kubernetes.io/tls`` layout),
    checked: its key matches, it is a CA valid now, it chains to the roots beside it.
    Returns it, those roots and the layout's name."""
    source = Path(source)
    if not source.is_dir():
        raise CaError(f"{source} is not a directory")
    layout = next((lay for lay in _LAYOUTS if (source / lay[1]).exists()), None)
    if layout is None:
        raise CaError(
            f"{source} holds neither Istio's layout (ca-cert.pem, ca-key.pem, root-cert.pem, "
            "cert-chain.pem) nor kubernetes.io/tls (tls.crt, tls.key, ca.crt)"
        )
    name, cert_file, key_file, root_file, chain_file = layout
    try:
        certs = load_certificates_pem(_read(source / cert_file), cert_file)
        key = load_private_key_pem(_read(source / key_file))
        roots = load_certificates_pem(_read(source / root_file), root_file)
        chain_extra: list[x509.Certificate] = []
        if chain_file and (source / chain_file).exists():
            chain_extra = load_certificates_pem(_read(source / chain_file), chain_file)
    except (SvidError, KeyTypeError) as exc:
        raise CaError(f"{name} layout in {source}: {exc}") from None
    ca_cert = certs[0]
    if not key_matches(key, ca_cert):
        raise CaError(f"{key_file} does not match the certificate in {cert_file}")
    if not _is_ca_cert(ca_cert):
        raise CaError(f"{cert_file} is not a CA certificate (needs CA=true and keyCertSign)")
    now = utcnow()
    if now >= ca_cert.not_valid_after_utc:
        raise CaError(f"{cert_file} expired at {rfc3339(ca_cert.not_valid_after_utc)}")
    if now < ca_cert.not_valid_before_utc:
        raise CaError(f"{cert_file} is not valid before {rfc3339(ca_cert.not_valid_before_utc)}")
    bundle = TrustBundle.of(trust_domain, roots)
    root_ders = set(bundle.roots)
    intermediates = tuple(
        c for c in [*certs[1:], *chain_extra] if c != ca_cert and c not in root_ders
    )
    try:
        verify_chain(ca_cert, intermediates, bundle, now=now)
    except ChainError as exc:
        raise CaError(f"{cert_file} does not chain to {root_file}: {exc}") from None
    signer = Signer(key, ca_cert, intermediates)
    self_check(signer, bundle)
    return signer, bundle, name


def import_cacerts(
    data_dir: Path,
    source: Path,
    trust_domain: TrustDomain,
    *,
    force: bool = False,
    own_intermediate_ttl: timedelta | None = None,
    own_key_type: KeyType = KeyType.EC_P256,
) -> LocalCa:
    """Adopt an existing signing CA (Istio ``cacerts`` or ``kubernetes.io/tls`` layout).

    With ``own_intermediate_ttl``, the adopted CA signs nothing but a new signing CA for
    this data directory alone (see :func:`mint_own_intermediate`); its key is not kept,
    and ``meta.json`` records ``source`` so its successor can be minted the same way.
    """
    _check_not_present(data_dir, force)
    signer, bundle, name = read_cacerts(source, trust_domain)
    meta = _new_meta(trust_domain, f"imported ({name})")
    if own_intermediate_ttl is not None:
        signer = mint_own_intermediate(signer, bundle, own_intermediate_ttl, own_key_type)
        meta["origin"] = f"{OWN_INTERMEDIATE} under a CA imported ({name})"
        meta["cacerts"] = str(Path(source).absolute())
    return _install(data_dir, ca_files(signer, bundle, None, meta), force)


def _path_length(cert: x509.Certificate) -> int | None:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length
    except x509.ExtensionNotFound:
        return None


def mint_own_intermediate(
    parent: Signer, bundle: TrustBundle, ttl: timedelta, key_type: KeyType = KeyType.EC_P256
) -> Signer:
    """A new signing CA under ``parent``: a fresh key, a unique subject, path length 0,
    never outliving ``parent``; self-checked against ``bundle``.

    Each replica of a highly available meshca mints its own, so no two replicas hold the
    same signing key while the bundle stays the same everywhere. ``parent`` must be
    allowed to sign CAs: every CA on its path to the root needs a path length (if it
    sets one) that leaves room for one more CA below ``parent``.
    """
    path = verify_chain(parent.certificate, parent.intermediates, bundle)
    for below, cert in enumerate(path, start=1):
        limit = _path_length(cert)
        if limit is not None and limit < below:
            what = (
                "the adopted CA"
                if cert is path[0]
                else f"the CA above it ({name_text(cert.subject)})"
            )
            raise CaError(
                f"{what} has path length {limit}: it may not sign this replica's own "
                f"signing CA; adopt a CA whose path length is at least {below} or unset "
                "(the root, or a CA from 'meshca init --path-length 1')"
            )
    key = generate_private_key(key_type)
    cert = build_ca(bundle.trust_domain, key, ttl, parent=parent, role="replica", path_length=0)
    signer = Signer(key, cert, parent.chain)
    self_check(signer, bundle)
    return signer


def load_local_ca(data_dir: Path) -> LocalCa:
    """Load the data directory's CA; checks the key matches its certificate and is 0600.

    The chain up to the root is verified by the self-check when :meth:`LocalCa.authority`
    is called, so an expired CA can still be loaded to be inspected or replaced.
    """
    directory = ca_directory(data_dir)
    if not (directory / CA_CERT).exists():
        raise CaMissingError(f"no CA in {directory}: run 'meshca init' first (or pass --data-dir)")
    try:
        meta = json.loads(_read(directory / META))
        trust_domain = TrustDomain.parse(meta["trust_domain"])
        origin = str(meta.get("origin", "unknown"))
    except (ValueError, KeyError, TypeError) as exc:
        raise CaError(f"{directory / META} is unreadable: {exc}") from None
    try:
        roots = load_certificates_pem(_read(directory / ROOT_CERT), ROOT_CERT)
        chain = load_certificates_pem(_read(directory / CERT_CHAIN), CERT_CHAIN)
        key = load_private_key_pem(_read(directory / CA_KEY))
    except (SvidError, KeyTypeError) as exc:
        raise CaError(f"CA in {directory}: {exc}") from None
    ca_cert = chain[0]
    if not key_matches(key, ca_cert):
        raise CaError(f"{directory / CA_KEY} does not match {directory / CERT_CHAIN}")
    signer = Signer(key, ca_cert, tuple(chain[1:]))
    bundle = TrustBundle.of(trust_domain, roots)
    for key_file in (CA_KEY, ROOT_KEY):
        problem = loose_key_mode(directory / key_file)
        if problem:
            raise CaError(problem)
    return LocalCa(directory, trust_domain, signer, bundle, origin)
