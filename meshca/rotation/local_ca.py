"""New signing CAs for the local backend, and keeping ``<data-dir>/ca/`` current.

A new signing CA under the same root needs the root key (``ca/root-key.pem``); when it
has been taken offline, that is refused with a clear message and nothing else changes.
A new root needs no old key: a self-signed root and a signing CA under it are created
(or, when the signer is the root itself, a new self-signed signer).

``ca/`` always holds the active signing CA and the whole trust bundle, so
``load_local_ca`` (``meshca issue``, ``meshca serve``) reads the current state without
knowing about rotation. It is rebuilt under a temporary name and swapped in with one
atomic exchange (Linux ``renameat2(RENAME_EXCHANGE)``), so a reader never sees a key
from one CA beside the certificate of another. Keys of roots that are in the bundle
but not the active one (during a root rotation, and to roll back) wait in
``rotation/root-keys/``; the active root's key lives only in ``ca/root-key.pem``.

A replica's own intermediate (``meshca init --from-cacerts DIR --own-intermediate``)
has no root key here: its parent is the CA in the cacerts directory every replica
shares, whose key is not kept. Its successor is minted the same way, from that
directory (recorded in ``ca/meta.json``) when ``meshca serve`` can read the CA key
there; otherwise it is renewed by running that init step again. A new root never
comes from one replica: it is the shared directory's to change.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography import x509

from meshca.backends.local import (
    CA_CERT,
    CA_KEY,
    CERT_CHAIN,
    META,
    OWN_INTERMEDIATE,
    ROOT_CERT,
    ROOT_KEY,
    CaError,
    LocalCa,
    ca_directory,
    ca_files,
    load_local_ca,
    mint_own_intermediate,
    read_cacerts,
)
from meshca.issuer import IssuerError, KeyType, KeyTypeError, Signer, TrustBundle
from meshca.issuer.keys import (
    PrivateKey,
    generate_private_key,
    key_matches,
    key_type_of,
    load_private_key_pem,
    private_key_pem,
)
from meshca.issuer.policy import ca_lifetime
from meshca.issuer.profile import DEFAULT_SKEW, build_ca
from meshca.issuer.svid import fingerprint
from meshca.issuer.verify import self_check
from meshca.rotation.journal import (
    ROTATION_DIR,
    JournalStore,
    RotationError,
    SigningCa,
    cert_id,
)
from meshca.spiffe import TrustDomain
from meshca.util.files import (
    PRIVATE,
    atomic_write,
    ensure_private_dir,
    fsync_directory,
    loose_key_mode,
)
from meshca.util.logger import get_logger

log = get_logger("meshca.rotation")

ROOT_KEYS_DIR = "root-keys"
_STAGE_PREFIX = ".ca-rotate-"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


class RootKeyOfflineError(RotationError):
    """A signing CA under the current root needs the root key, which is not here."""


_REINIT = "meshca init --from-cacerts {dir} --own-intermediate --force"


class LocalCaSource:
    """Creates signing CAs from keys in the data directory; publishes to ``ca/``.

    New CAs get ``ca_ttl`` (default: the active CA's own lifetime) and new roots
    ``root_ttl`` (default: the active root's lifetime), with the active key type unless
    ``key_type`` says otherwise.
    """

    def __init__(
        self,
        data_dir: Path,
        trust_domain: TrustDomain,
        *,
        key_type: KeyType | None = None,
        ca_ttl: timedelta | None = None,
        root_ttl: timedelta | None = None,
        skew: timedelta = DEFAULT_SKEW,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.trust_domain = trust_domain
        self.key_type = key_type
        self.ca_ttl = ca_ttl
        self.root_ttl = root_ttl
        self.skew = skew
        self.ca_dir = ca_directory(self.data_dir)
        self.root_keys_dir = self.data_dir / ROTATION_DIR / ROOT_KEYS_DIR
        self._meta_cache: tuple[tuple[int, int, int], dict[str, Any]] | None = None

    # root keys ----------------------------------------------------------------------
    def _parked_key_path(self, root: x509.Certificate) -> Path:
        return self.root_keys_dir / f"{cert_id(root)}.pem"

    def _read_key(self, path: Path) -> PrivateKey | None:
        problem = loose_key_mode(path)
        if problem:
            raise CaError(problem)
        try:
            return load_private_key_pem(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, KeyTypeError) as exc:
            raise CaError(f"cannot read {path}: {exc}") from None

    def root_key(self, root: x509.Certificate) -> PrivateKey | None:
        """The key of ``root`` if this data directory holds it."""
        for path in (self.ca_dir / ROOT_KEY, self._parked_key_path(root)):
            key = self._read_key(path)
            if key is not None and key_matches(key, root):
                return key
        return None

    # where this CA came from (ca/meta.json) -------------------------------------------
    def _read_meta(self) -> dict[str, Any]:
        """``ca/meta.json`` ({} when absent or damaged), read again only when the file
        changes: one rotation check or status consults it several times. Returns a copy."""
        path = self.ca_dir / META
        try:
            stat = path.stat()
        except OSError:
            self._meta_cache = None
            return {}
        key = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if self._meta_cache is None or self._meta_cache[0] != key:
            try:
                meta = json.loads(path.read_bytes())
            except (OSError, ValueError):
                meta = {}
            self._meta_cache = (key, meta if isinstance(meta, dict) else {})
        return dict(self._meta_cache[1])

    def _meta_values(self) -> dict[str, str]:
        return {k: str(v) for k, v in self._read_meta().items()}

    @property
    def own_intermediate(self) -> bool:
        """Whether the signing CA is this replica's own, under a shared cacerts CA."""
        return self._meta_values().get("origin", "").startswith(OWN_INTERMEDIATE)

    @property
    def cacerts(self) -> Path | None:
        """The cacerts directory an own intermediate was minted from, if recorded."""
        recorded = self._meta_values().get("cacerts")
        return Path(recorded) if recorded else None

    def _reinit_step(self) -> str:
        return _REINIT.format(dir=self.cacerts or "DIR")

    def _cacerts_parent(self, active: SigningCa) -> tuple[Signer | None, str]:
        """The shared CA to mint this replica's next intermediate under, or None and why."""
        directory = self.cacerts
        if directory is None:
            return None, "meta.json does not record the cacerts directory"
        if not directory.is_dir():
            return None, f"{directory} is not present here"
        try:
            parent, roots, _ = read_cacerts(directory, self.trust_domain)
        except IssuerError as exc:
            return None, str(exc)
        if active.root not in roots:
            return None, f"the CA in {directory} chains to another root"
        return parent, ""

    def describe(self, active: SigningCa) -> str:
        """How this data directory's signing CA is renewed (``meshca ca status``)."""
        if self.own_intermediate:
            parent, _ = self._cacerts_parent(active)
            if parent is not None:
                return (
                    "this replica's own intermediate: each successor is minted under the CA "
                    f"in {self.cacerts}, whose key meshca can read there"
                )
            return (
                "this replica's own intermediate, minted under a shared CA whose key meshca "
                f"does not keep: renew it by running '{self._reinit_step()}' again (in "
                "Kubernetes, restart the pod: its init container does)"
            )
        if active.is_self_signed:
            return "the signing CA is the root itself: a successor is a new root"
        if self.root_key(active.root) is not None:
            return f"new signing CAs are signed with the root key in {self.ca_dir / ROOT_KEY}"
        return f"new signing CAs need the root key in {self.ca_dir / ROOT_KEY}, which is absent"

    def _own_problem(self, active: SigningCa, *, new_root: bool) -> str | None:
        if new_root:
            return (
                "this replica's root comes from the cacerts directory every replica shares: "
                "a new root is made there, not by one replica; put the new root beside the "
                f"old one there and run '{self._reinit_step()}' on every replica"
            )
        parent, why = self._cacerts_parent(active)
        if parent is not None:
            return None
        return (
            "this replica's signing CA is its own intermediate under the CA in "
            f"{self.cacerts or 'the cacerts directory'}, whose key meshca cannot read there "
            f"({why}); it is renewed by running '{self._reinit_step()}' again before it "
            "expires (in Kubernetes, restart the pod: its init container does)"
        )

    # CaSource -------------------------------------------------------------------------
    def problem(self, active: SigningCa, *, new_root: bool) -> str | None:
        if self.own_intermediate:
            return self._own_problem(active, new_root=new_root)
        if new_root:
            return None
        if active.is_self_signed:
            return (
                "the signing CA is the root itself, so a new signing CA means a new root: "
                "use 'meshca ca rotate-root'"
            )
        if self.root_key(active.root) is None:
            if self._meta_values().get("origin", "").startswith("imported"):
                return (
                    "this signing CA was imported ('meshca init --from-cacerts') without its "
                    f"root key, so meshca cannot sign its successor under root "
                    f"{fingerprint(active.root)}: import the successor with 'meshca init "
                    "--from-cacerts DIR --force' before it expires, or replace the root with "
                    "'meshca ca rotate-root'"
                )
            return (
                f"the root key is offline: {self.ca_dir / ROOT_KEY} is missing or belongs to "
                f"another root, and a signing CA under root {fingerprint(active.root)} needs "
                "it; put the key back, or replace the root with 'meshca ca rotate-root'"
            )
        return None

    def create(self, active: SigningCa, *, new_root: bool) -> SigningCa:
        problem = self.problem(active, new_root=new_root)
        if problem is not None:
            raise RootKeyOfflineError(problem)
        key_type = self.key_type or key_type_of(active.signer.key)
        ca_ttl = self.ca_ttl or ca_lifetime(active.signer.certificate, self.skew)
        td = self.trust_domain
        if self.own_intermediate:
            parent, why = self._cacerts_parent(active)
            if parent is None:
                raise RootKeyOfflineError(why)
            bundle = TrustBundle.of(td, [active.root])
            try:
                signer = mint_own_intermediate(parent, bundle, ca_ttl, key_type)
            except IssuerError as exc:
                raise RotationError(f"cannot mint the next own intermediate: {exc}") from None
            return self._checked(SigningCa(signer, active.root))
        if new_root and active.is_self_signed:
            key = generate_private_key(key_type)
            cert = build_ca(td, key, ca_ttl, role="root", skew=self.skew)
            self._park_key(cert, key)
            return self._checked(SigningCa(Signer(key, cert), cert))
        if new_root:
            root_key = generate_private_key(key_type)
            root_ttl = self.root_ttl or ca_lifetime(active.root, self.skew)
            root = build_ca(td, root_key, root_ttl, role="root", skew=self.skew)
            self._park_key(root, root_key)
        else:
            root = active.root
            found = self.root_key(root)
            assert found is not None  # problem() said so
            root_key = found
        key = generate_private_key(key_type)
        cert = build_ca(
            td,
            key,
            ca_ttl,
            parent=Signer(root_key, root),
            role="intermediate",
            path_length=0,
            skew=self.skew,
        )
        return self._checked(SigningCa(Signer(key, cert), root))

    def _checked(self, ca: SigningCa) -> SigningCa:
        self_check(ca.signer, TrustBundle.of(self.trust_domain, [ca.root]))
        return ca

    def _park_key(self, root: x509.Certificate, key: PrivateKey) -> None:
        ensure_private_dir(self.root_keys_dir)
        atomic_write(self._parked_key_path(root), private_key_pem(key), PRIVATE)

    def publish(self, active: SigningCa, bundle: TrustBundle) -> None:
        """Rebuild ``ca/`` for ``active`` and ``bundle`` (if it differs) and tidy root keys."""
        self._remove_stale_stages()
        current_root_key = self._read_key(self.ca_dir / ROOT_KEY)
        if current_root_key is not None:
            # Keep the key of a root that is still trusted before ca/ drops it.
            for root in bundle:
                if (
                    root != active.root
                    and key_matches(current_root_key, root)
                    and not self._parked_key_path(root).exists()
                ):
                    self._park_key(root, current_root_key)
        files = self._files(active, bundle)
        if files != self._current_files():
            self._install(files)
            log.info(
                "published signing CA %s to %s", fingerprint(active.signer.certificate), self.ca_dir
            )
        # The active root's key now lives only in ca/; keys of roots that left go away.
        keep = {f"{cert_id(root)}.pem" for root in bundle if root != active.root}
        if self.root_keys_dir.exists():
            for path in self.root_keys_dir.iterdir():
                if path.name not in keep:
                    path.unlink()

    # ca/ ---------------------------------------------------------------------------------
    def _files(self, active: SigningCa, bundle: TrustBundle) -> dict[str, tuple[bytes, int]]:
        meta = self._read_meta()  # kept as it is; ca_files records the new key type
        meta.setdefault("trust_domain", self.trust_domain.name)
        meta.setdefault("origin", "generated")
        return ca_files(active.signer, bundle, self.root_key(active.root), meta)

    def _current_files(self) -> dict[str, tuple[bytes, int]]:
        found: dict[str, tuple[bytes, int]] = {}
        if not self.ca_dir.is_dir():
            return found
        for path in self.ca_dir.iterdir():
            if path.is_file():
                found[path.name] = (path.read_bytes(), path.stat().st_mode & 0o777)
        return found

    def _install(self, files: dict[str, tuple[bytes, int]]) -> None:
        staged = Path(tempfile.mkdtemp(prefix=_STAGE_PREFIX, dir=self.data_dir))
        try:
            for name, (data, mode) in files.items():
                atomic_write(staged / name, data, mode)
            if self.ca_dir.exists() and _exchange(staged, self.ca_dir):
                fsync_directory(self.data_dir)
                return
            if not self.ca_dir.exists():
                os.rename(staged, self.ca_dir)
                fsync_directory(self.data_dir)
                return
            # No atomic exchange on this filesystem: write file by file, key and chain
            # last; a crash in between is repaired from the journal on the next start.
            for name in (META, ROOT_CERT, ROOT_KEY, CA_CERT, CA_KEY, CERT_CHAIN):
                if name in files:
                    data, mode = files[name]
                    atomic_write(self.ca_dir / name, data, mode)
            if ROOT_KEY not in files:
                (self.ca_dir / ROOT_KEY).unlink(missing_ok=True)
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    def _remove_stale_stages(self) -> None:
        for entry in self.data_dir.glob(_STAGE_PREFIX + "*"):
            shutil.rmtree(entry, ignore_errors=True)


def _exchange(first: Path, second: Path) -> bool:
    """Atomically swap two directories; False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    result = renameat2(
        _AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE
    )
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def open_local_ca(data_dir: Path) -> LocalCa:
    """``load_local_ca``, after repairing ``ca/`` from the rotation journal if a crash
    left it half-written (only possible where the atomic exchange is unavailable)."""
    try:
        return load_local_ca(data_dir)
    except CaError:
        journals = JournalStore(data_dir)
        journal = journals.load()
        if journal is None:
            raise
        active = journals.load_slot(journal.active)
        LocalCaSource(data_dir, journal.trust_domain).publish(active, journal.bundle)
        log.warning("repaired %s from the rotation journal", ca_directory(data_dir))
        return load_local_ca(data_dir)
