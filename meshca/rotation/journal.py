"""The rotation journal: which signing CAs exist, which one signs, and how far a rotation got.

A restart must resume a rotation exactly where it stopped and never create a CA it
already has, so every decision is written down before it is acted on. Layout of
``<data-dir>/rotation/``:

``journal.json``        slots, the trust bundle, an intent to create a CA, the root-rotation stage
``slots/<id>/``         one signing CA per slot (``ca-cert.pem``, ``ca-key.pem`` 0600,
                        ``cert-chain.pem``, ``root-cert.pem``), written whole or not at all
``jwt-keys/<id>.pem``   the JWT-SVID signing keys (0600), one per JWT key slot
``lock``                held (flock) by the one process allowed to change the journal

The journal is rewritten atomically (temp file, fsync, rename). Slots follow SPIRE's CA
manager: at most one ``prepared`` slot (the next CA), one ``active`` slot (the signer),
and ``old`` slots kept until nothing served chains to them. The JWT-SVID signing key has
slots of its own with the same three states: a prepared key is published (in the JWKS)
before it signs, an old one stays published until every token it signed has expired.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshca.issuer import KeyTypeError, Signer, SvidError, TrustBundle
from meshca.issuer.keys import key_matches, load_private_key_pem, private_key_pem
from meshca.issuer.svid import certificates_pem, load_certificates_pem
from meshca.rotation.errors import RotationError as RotationError
from meshca.spiffe import SpiffeIdError, TrustDomain
from meshca.util.files import (
    PRIVATE,
    PUBLIC,
    atomic_write,
    ensure_private_dir,
    fsync_directory,
    loose_key_mode,
)

FORMAT = 1
ROTATION_DIR = "rotation"
JOURNAL = "journal.json"
SLOTS_DIR = "slots"
LOCK = "lock"
BACKUP_DIR = "backup"
CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
CERT_CHAIN = "cert-chain.pem"
ROOT_CERT = "root-cert.pem"
JWT_KEYS_DIR = "jwt-keys"


class JournalError(RotationError):
    """The journal or a slot's files are unreadable or contradict each other."""


class JournalLockedError(RotationError):
    """Another process holds the journal."""


class SlotStatus(enum.StrEnum):
    PREPARED = "prepared"
    ACTIVE = "active"
    OLD = "old"


class SlotKind(enum.StrEnum):
    INTERMEDIATE = "intermediate"  # a new signing CA under the same root: bundle unchanged
    ROOT = "root"  # a signing CA under a new root: the root enters the bundle when prepared


def cert_id(cert: x509.Certificate) -> str:
    """A certificate's SHA-256 in plain hex: how the journal names CAs and roots."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _time(value: datetime) -> str:
    return value.astimezone(UTC).isoformat()


def _parse_time(value: Any) -> datetime:
    parsed = datetime.fromisoformat(str(value))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@dataclass(frozen=True)
class SigningCa:
    """A signing CA with the root it chains to (for a self-signed signer, itself)."""

    signer: Signer
    root: x509.Certificate

    @property
    def is_self_signed(self) -> bool:
        return self.signer.is_self_signed


@dataclass(frozen=True)
class SlotRecord:
    id: str
    status: SlotStatus
    kind: SlotKind
    ca: str  # cert_id of the signing CA certificate
    root: str  # cert_id of the root it chains to
    not_before: datetime
    not_after: datetime
    created: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status.value,
            "kind": self.kind.value,
            "ca": self.ca,
            "root": self.root,
            "not_before": _time(self.not_before),
            "not_after": _time(self.not_after),
            "created": _time(self.created),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SlotRecord:
        return cls(
            id=str(data["id"]),
            status=SlotStatus(data["status"]),
            kind=SlotKind(data["kind"]),
            ca=str(data["ca"]),
            root=str(data["root"]),
            not_before=_parse_time(data["not_before"]),
            not_after=_parse_time(data["not_after"]),
            created=_parse_time(data["created"]),
        )


@dataclass(frozen=True)
class JwtKeyRecord:
    """One JWT-SVID signing key: ``prepared`` (published, not signing), ``active`` (signing)
    or ``old`` (published until ``retire_at``, when the last token it signed has expired)."""

    id: str
    status: SlotStatus
    kid: str
    created: datetime
    activated: datetime | None = None
    retire_at: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status.value,
            "kid": self.kid,
            "created": _time(self.created),
            "activated": _time(self.activated) if self.activated else None,
            "retire_at": _time(self.retire_at) if self.retire_at else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JwtKeyRecord:
        activated, retire_at = data.get("activated"), data.get("retire_at")
        return cls(
            id=str(data["id"]),
            status=SlotStatus(data["status"]),
            kid=str(data["kid"]),
            created=_parse_time(data["created"]),
            activated=_parse_time(activated) if activated else None,
            retire_at=_parse_time(retire_at) if retire_at else None,
        )


@dataclass(frozen=True)
class PendingCa:
    """Written before a CA is created: on restart, the slot is adopted if its files exist
    and created otherwise, so no CA is ever made twice."""

    slot: str
    kind: SlotKind

    def to_json(self) -> dict[str, Any]:
        return {"slot": self.slot, "kind": self.kind.value}


@dataclass(frozen=True)
class RootRotationState:
    """How far an operator's root rotation got. ``done`` is the last completed step (0-5);
    ``running`` the step started and not yet finished, ``target`` the step the operator
    asked to reach: a restart carries on from ``running`` up to ``target``."""

    new_slot: str | None
    old_slot: str
    done: int = 0
    running: int | None = None
    target: int = 0
    rolling_back: bool = False
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    updated: datetime = field(default_factory=lambda: datetime.now(UTC))

    def to_json(self) -> dict[str, Any]:
        return {
            "new_slot": self.new_slot,
            "old_slot": self.old_slot,
            "done": self.done,
            "running": self.running,
            "target": self.target,
            "rolling_back": self.rolling_back,
            "started": _time(self.started),
            "updated": _time(self.updated),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RootRotationState:
        running = data.get("running")
        new_slot = data.get("new_slot")
        return cls(
            new_slot=None if new_slot is None else str(new_slot),
            old_slot=str(data["old_slot"]),
            done=int(data["done"]),
            running=None if running is None else int(running),
            target=int(data.get("target", 0)),
            rolling_back=bool(data.get("rolling_back", False)),
            started=_parse_time(data["started"]),
            updated=_parse_time(data["updated"]),
        )


@dataclass(frozen=True)
class Journal:
    """The whole rotation state; immutable, replaced as a unit on every change."""

    trust_domain: TrustDomain
    slots: tuple[SlotRecord, ...]
    bundle: TrustBundle
    sequence: int = 1
    next_slot: int = 1
    pending: PendingCa | None = None
    root_rotation: RootRotationState | None = None
    jwt_keys: tuple[JwtKeyRecord, ...] = ()
    next_jwt_key: int = 1

    # queries ---------------------------------------------------------------
    def slot(self, slot_id: str) -> SlotRecord:
        for record in self.slots:
            if record.id == slot_id:
                return record
        raise JournalError(f"the journal names no slot {slot_id!r}")

    def with_status(self, status: SlotStatus) -> list[SlotRecord]:
        return [record for record in self.slots if record.status is status]

    @property
    def active(self) -> SlotRecord:
        active = self.with_status(SlotStatus.ACTIVE)
        if len(active) != 1:
            raise JournalError(f"the journal has {len(active)} active slots; exactly one expected")
        return active[0]

    @property
    def prepared(self) -> SlotRecord | None:
        prepared = self.with_status(SlotStatus.PREPARED)
        return prepared[0] if prepared else None

    @property
    def old(self) -> list[SlotRecord]:
        return self.with_status(SlotStatus.OLD)

    def jwt_key(self, key_id: str) -> JwtKeyRecord:
        for record in self.jwt_keys:
            if record.id == key_id:
                return record
        raise JournalError(f"the journal names no JWT key {key_id!r}")

    def jwt_with_status(self, status: SlotStatus) -> list[JwtKeyRecord]:
        return sorted((r for r in self.jwt_keys if r.status is status), key=lambda r: r.id)

    # changes (each returns a new journal; nothing is written until saved) ------
    def allocate_jwt_key_id(self) -> tuple[Journal, str]:
        key_id = f"jwt-{self.next_jwt_key:04d}"
        return replace(self, next_jwt_key=self.next_jwt_key + 1), key_id

    def with_jwt_key(self, record: JwtKeyRecord) -> Journal:
        others = tuple(r for r in self.jwt_keys if r.id != record.id)
        return replace(self, jwt_keys=(*others, record))

    def without_jwt_key(self, key_id: str) -> Journal:
        return replace(self, jwt_keys=tuple(r for r in self.jwt_keys if r.id != key_id))

    def allocate_slot_id(self) -> tuple[Journal, str]:
        slot_id = f"ca-{self.next_slot:04d}"
        return replace(self, next_slot=self.next_slot + 1), slot_id

    def with_slot(self, record: SlotRecord) -> Journal:
        others = tuple(r for r in self.slots if r.id != record.id)
        return replace(self, slots=(*others, record))

    def without_slot(self, slot_id: str) -> Journal:
        return replace(self, slots=tuple(r for r in self.slots if r.id != slot_id))

    def set_status(self, slot_id: str, status: SlotStatus) -> Journal:
        return self.with_slot(replace(self.slot(slot_id), status=status))

    # serialisation -----------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "trust_domain": self.trust_domain.name,
            "sequence": self.sequence,
            "next_slot": self.next_slot,
            "slots": [record.to_json() for record in self.slots],
            "bundle": [
                cert.public_bytes(serialization.Encoding.PEM).decode() for cert in self.bundle
            ],
            "pending": self.pending.to_json() if self.pending else None,
            "root_rotation": self.root_rotation.to_json() if self.root_rotation else None,
            "jwt_keys": [record.to_json() for record in self.jwt_keys],
            "next_jwt_key": self.next_jwt_key,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Journal:
        if data.get("format") != FORMAT:
            raise JournalError(f"unsupported journal format {data.get('format')!r}")
        trust_domain = TrustDomain.parse(str(data["trust_domain"]))
        roots = [
            x509.load_pem_x509_certificate(str(pem).encode()) for pem in data.get("bundle", [])
        ]
        pending = data.get("pending")
        rotation = data.get("root_rotation")
        return cls(
            trust_domain=trust_domain,
            slots=tuple(SlotRecord.from_json(item) for item in data["slots"]),
            bundle=TrustBundle.of(trust_domain, roots),
            sequence=int(data["sequence"]),
            next_slot=int(data["next_slot"]),
            pending=(
                PendingCa(str(pending["slot"]), SlotKind(pending["kind"])) if pending else None
            ),
            root_rotation=RootRotationState.from_json(rotation) if rotation else None,
            jwt_keys=tuple(JwtKeyRecord.from_json(item) for item in data.get("jwt_keys", [])),
            next_jwt_key=int(data.get("next_jwt_key", 1)),
        )


def slot_record(
    slot_id: str, status: SlotStatus, kind: SlotKind, ca: SigningCa, created: datetime
) -> SlotRecord:
    cert = ca.signer.certificate
    return SlotRecord(
        id=slot_id,
        status=status,
        kind=kind,
        ca=cert_id(cert),
        root=cert_id(ca.root),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        created=created,
    )


class JournalStore:
    """Reads and writes the journal and the slots' files under ``<data-dir>/rotation``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.directory = self.data_dir / ROTATION_DIR
        self.path = self.directory / JOURNAL
        self.slots_dir = self.directory / SLOTS_DIR
        self.jwt_keys_dir = self.directory / JWT_KEYS_DIR

    # the journal ---------------------------------------------------------------
    def exists(self) -> bool:
        return self.path.exists()

    def load(self) -> Journal | None:
        """The saved journal, or None when there is none yet."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise JournalError(f"cannot read {self.path}: {exc.strerror}") from None
        try:
            return Journal.from_json(json.loads(text))
        except (ValueError, KeyError, TypeError, SpiffeIdError) as exc:
            raise JournalError(f"{self.path} is unreadable: {exc}") from None

    def save(self, journal: Journal) -> Journal:
        """Write ``journal`` atomically (with the next sequence number) and return it."""
        saved = replace(journal, sequence=journal.sequence + 1)
        ensure_private_dir(self.directory)
        text = json.dumps(saved.to_json(), indent=2) + "\n"
        atomic_write(self.path, text.encode(), PUBLIC)
        return saved

    # slots -------------------------------------------------------------------------
    def slot_dir(self, slot_id: str) -> Path:
        return self.slots_dir / slot_id

    def slot_exists(self, slot_id: str) -> bool:
        return (self.slot_dir(slot_id) / CERT_CHAIN).exists()

    def write_slot(self, slot_id: str, ca: SigningCa) -> None:
        """Write a slot's files under a temporary name and rename the directory into place,
        so a slot directory is complete or absent. An existing slot is left alone."""
        target = self.slot_dir(slot_id)
        if target.exists():
            return
        ensure_private_dir(self.slots_dir)
        staged = Path(tempfile.mkdtemp(prefix=f".{slot_id}-", dir=self.slots_dir))
        try:
            signer = ca.signer
            atomic_write(staged / CA_CERT, certificates_pem([signer.certificate]), PUBLIC)
            atomic_write(staged / CA_KEY, private_key_pem(signer.key), PRIVATE)
            chain = [signer.certificate, *signer.intermediates]
            atomic_write(staged / CERT_CHAIN, certificates_pem(chain), PUBLIC)
            atomic_write(staged / ROOT_CERT, certificates_pem([ca.root]), PUBLIC)
            os.rename(staged, target)
            fsync_directory(self.slots_dir)
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    def load_slot(self, record: SlotRecord) -> SigningCa:
        """A slot's CA, checked against what the journal says it is."""
        ca = self.read_slot(record.id)
        if cert_id(ca.signer.certificate) != record.ca or cert_id(ca.root) != record.root:
            raise JournalError(f"slot {record.id} holds a CA other than the journal records")
        return ca

    def read_slot(self, slot_id: str) -> SigningCa:
        """A slot's CA as its files hold it (also one written just before a crash, whose
        journal entry was never saved)."""
        directory = self.slot_dir(slot_id)
        problem = loose_key_mode(directory / CA_KEY)
        if problem:
            raise JournalError(f"slot {slot_id}: {problem}")
        try:
            chain = load_certificates_pem((directory / CERT_CHAIN).read_bytes(), CERT_CHAIN)
            key = load_private_key_pem((directory / CA_KEY).read_bytes())
            root = load_certificates_pem((directory / ROOT_CERT).read_bytes(), ROOT_CERT)[0]
        except OSError as exc:
            raise JournalError(
                f"slot {slot_id} ({directory}) is unreadable: {exc.strerror}"
            ) from None
        except (SvidError, KeyTypeError) as exc:
            raise JournalError(f"slot {slot_id} ({directory}): {exc}") from None
        if not key_matches(key, chain[0]):
            raise JournalError(f"slot {slot_id}: {CA_KEY} does not match {CERT_CHAIN}")
        return SigningCa(Signer(key, chain[0], tuple(chain[1:])), root)

    def remove_slot(self, slot_id: str) -> None:
        shutil.rmtree(self.slot_dir(slot_id), ignore_errors=True)

    def remove_unrecorded(self, journal: Journal) -> list[str]:
        """Delete slot directories (and half-written staging directories) the journal does
        not name: leftovers of a crash or of retired slots. Returns their names."""
        if not self.slots_dir.exists():
            return []
        keep = {record.id for record in journal.slots}
        if journal.pending is not None:
            keep.add(journal.pending.slot)
        removed = []
        for entry in sorted(self.slots_dir.iterdir()):
            if entry.name not in keep:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry.name)
        return removed

    # JWT keys ---------------------------------------------------------------------------
    def jwt_key_path(self, key_id: str) -> Path:
        return self.jwt_keys_dir / f"{key_id}.pem"

    def write_jwt_key(self, key_id: str, pem: bytes) -> None:
        """Write a JWT key's file (0600, atomically) before the journal records it: a
        crash in between leaves a file no record names, removed at the next start."""
        ensure_private_dir(self.jwt_keys_dir)
        atomic_write(self.jwt_key_path(key_id), pem, PRIVATE)

    def read_jwt_key(self, key_id: str) -> bytes:
        path = self.jwt_key_path(key_id)
        problem = loose_key_mode(path)
        if problem:
            raise JournalError(f"JWT key {key_id}: {problem}")
        try:
            return path.read_bytes()
        except OSError as exc:
            raise JournalError(f"JWT key {key_id} ({path}) is unreadable: {exc.strerror}") from None

    def remove_jwt_key(self, key_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.jwt_key_path(key_id))

    def remove_unrecorded_jwt_keys(self, journal: Journal) -> list[str]:
        """Delete JWT key files the journal does not name (made just before a crash, or
        retired): they were never published, or are no longer."""
        if not self.jwt_keys_dir.exists():
            return []
        keep = {self.jwt_key_path(record.id).name for record in journal.jwt_keys}
        removed = []
        for entry in sorted(self.jwt_keys_dir.iterdir()):
            if entry.name not in keep:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
                removed.append(entry.name)
        return removed

    def archive(self) -> Path:
        """Move the journal, slots and everything else but the lock to
        ``<data-dir>/backup/rotation-<time>/`` (when the CA was replaced outside rotation)."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        target = ensure_private_dir(self.data_dir / BACKUP_DIR / f"rotation-{stamp}")
        for entry in sorted(self.directory.iterdir()):
            if entry.name != LOCK:
                os.rename(entry, target / entry.name)
        fsync_directory(self.directory)
        return target

    # exclusive access ------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the journal lock for the block; JournalLockedError if another process has it."""
        fd = self.acquire()
        try:
            yield
        finally:
            os.close(fd)

    def acquire(self) -> int:
        """Take the journal lock (non-blocking) and return its fd; close the fd to release."""
        ensure_private_dir(self.directory)
        fd = os.open(self.directory / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise JournalLockedError(
                f"another meshca process is changing the CA in {self.data_dir} "
                f"(it holds {self.directory / LOCK})"
            ) from None
        return fd
