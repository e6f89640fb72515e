"""The CA manager: the signing-CA slots (SPIRE's manager) and their journal.

The next CA is created in the ``prepared`` slot; when it comes with a new root, that
root enters the trust bundle at once, so proxies have the rest of the old CA's life to
pick it up. Activating makes the prepared CA sign and the previous one ``old``. Because
a CA lives at least 6 leaf lifetimes, the last 1/6 of the old CA still covers every
leaf it signed, so no leaf is cut short. An old slot is retired once nothing served
chains to it, then its root (if it had its own) leaves the bundle.

*When* each of these happens is the :class:`~meshca.rotation.rotator.Rotator`'s
business (its :class:`Schedule` is computed here, from the active slot); where a new CA
comes from is the :class:`CaSource`'s (the local root key, Vault). This module performs
the slot operations and keeps the journal. A backend that holds
roots of its own (Vault's issuers) reports them through :meth:`RotationManager.follow_roots`:
they join the bundle, and stay in it while the backend has them.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

from cryptography import x509

from meshca.issuer import ActiveSigner, TrustBundle
from meshca.issuer.policy import CA_TO_LEAF_TTL_RATIO, DEFAULT_LEAF_TTL
from meshca.issuer.profile import DEFAULT_SKEW
from meshca.issuer.svid import fingerprint
from meshca.issuer.verify import self_check
from meshca.rotation.acks import (
    AckTracker,
    NoProxies,
    SecretPredicate,
    chains_to,
    issued_by,
)
from meshca.rotation.journal import (
    Journal,
    JournalStore,
    PendingCa,
    RootRotationState,
    RotationError,
    SigningCa,
    SlotKind,
    SlotRecord,
    SlotStatus,
    cert_id,
    slot_record,
)
from meshca.rotation.jwt_keys import DEFAULT_JWT_KEY_TTL, MIN_JWT_KEY_TTL, JwtKeySlots
from meshca.store import SecretStore
from meshca.util.formats import rfc3339
from meshca.util.logger import get_logger

log = get_logger("meshca.rotation")

DEFAULT_PREPARE_FRACTION = 0.5
DEFAULT_ACTIVATE_FRACTION = 5 / 6


class CaSource(Protocol):
    """Where new signing CAs come from (the local root key, Vault's PKI engine, ...).

    ``create`` may block (key generation, a network call): the manager runs it in a
    thread. It must return a CA that has passed its self-check against its root.
    """

    def problem(self, active: SigningCa, *, new_root: bool) -> str | None:
        """Why a CA of this kind cannot be created now (e.g. the root key is offline)."""
        ...

    def create(self, active: SigningCa, *, new_root: bool) -> SigningCa:
        """A new signing CA under ``active.root``, or under a new root when ``new_root``."""
        ...

    def publish(self, active: SigningCa, bundle: TrustBundle) -> None:
        """Make ``active`` and ``bundle`` what the backend's own readers see (the local CA
        directory), and drop material of roots that left the bundle."""
        ...

    def describe(self, active: SigningCa) -> str:
        """How this source renews the signing CA, for ``meshca ca status``."""
        ...


@dataclass(frozen=True)
class RotationPolicy:
    prepare_fraction: float = DEFAULT_PREPARE_FRACTION
    activate_fraction: float = DEFAULT_ACTIVATE_FRACTION
    leaf_ttl: timedelta = DEFAULT_LEAF_TTL
    skew: timedelta = DEFAULT_SKEW
    retry_interval: timedelta = timedelta(seconds=5)
    jwt_key_ttl: timedelta = DEFAULT_JWT_KEY_TTL  # how long a JWT key signs before its successor

    def __post_init__(self) -> None:
        if not 0 < self.prepare_fraction < self.activate_fraction < 1:
            raise RotationError(
                "rotation fractions must satisfy 0 < prepare < activate < 1 "
                f"(got prepare {self.prepare_fraction:g}, activate {self.activate_fraction:g})"
            )
        if self.jwt_key_ttl < MIN_JWT_KEY_TTL:
            raise RotationError(f"the JWT key lifetime must be at least {MIN_JWT_KEY_TTL}")


@dataclass(frozen=True)
class Schedule:
    """When the active CA's successor is prepared and activated (wall clock)."""

    issued: datetime
    prepare_at: datetime
    activate_at: datetime
    not_after: datetime

    @classmethod
    def of(cls, record: SlotRecord, policy: RotationPolicy) -> Schedule:
        # Life starts at issuance (NotBefore is backdated by the skew), as for leaves.
        issued = min(record.not_before + policy.skew, record.not_after)
        life = record.not_after - issued
        return cls(
            issued,
            issued + life * policy.prepare_fraction,
            issued + life * policy.activate_fraction,
            record.not_after,
        )

    @property
    def force_at(self) -> datetime:
        """A CA under a new root is activated here even if some proxies never ACKed it:
        waiting longer would let the old CA cut leaves short."""
        return self.activate_at + (self.not_after - self.activate_at) / 2


def root_of(signer_chain: tuple[x509.Certificate, ...], bundle: TrustBundle) -> x509.Certificate:
    """The bundle root a signing CA's chain (CA first, root excluded or not) ends at."""
    top = signer_chain[-1]
    for root in bundle:
        if top == root or issued_by(top, root):
            return root
    raise RotationError("the signing CA does not chain to any root of the trust bundle")


class RotationManager:
    """Owns the journal for one data directory and drives the authority and the store.

    Call :meth:`open` once (it takes the journal lock and resumes an interrupted step);
    a :class:`~meshca.rotation.rotator.Rotator` runs the automatic schedule. Every change is
    written to the journal before it is applied, and applying is idempotent, so a crash
    at any point resumes cleanly.
    """

    def __init__(
        self,
        data_dir: Path,
        authority: ActiveSigner,
        source: CaSource,
        *,
        store: SecretStore | None = None,
        acks: AckTracker | None = None,
        policy: RotationPolicy | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.authority = authority
        self.source = source
        self.store = store
        self.acks: AckTracker = acks or NoProxies()
        self.policy = policy or RotationPolicy()
        self.clock = clock or (lambda: datetime.now(UTC))
        self.journals = JournalStore(self.data_dir)
        # Roots the backend itself holds (Vault's issuers): kept in the bundle even when
        # no slot chains to them. Empty for the local CA.
        self.external_roots: tuple[x509.Certificate, ...] = ()
        self.lock = asyncio.Lock()  # one change at a time (schedule, operators, root rotation)
        self._journal: Journal | None = None
        self._cas: dict[str, SigningCa] = {}
        self._lock_fd: int | None = None
        self.jwt = JwtKeySlots(self)  # the JWT-SVID signing key's slots, same journal

    # opening and resuming ----------------------------------------------------------
    @property
    def journal(self) -> Journal:
        if self._journal is None:
            raise RotationError("the rotation manager is not open")
        return self._journal

    def open(self) -> Journal:
        """Take the journal lock, adopt the authority's CA on first use, finish a CA whose
        creation a crash interrupted, and make authority, store and backend match the
        journal."""
        if self._journal is not None:
            return self._journal
        self._lock_fd = self.journals.acquire()
        try:
            journal = self.journals.load()
            if journal is not None and not self._knows_authority_ca(journal):
                backup = self.journals.archive()
                log.warning(
                    "the CA was replaced outside rotation (e.g. 'meshca init --force'); "
                    "the previous rotation journal was moved to %s",
                    backup,
                )
                journal = None
            if journal is None:
                journal = self._adopt()
            for record in journal.slots:
                self._cas[record.id] = self.journals.load_slot(record)
            if journal.pending is not None:
                journal = self._finish_pending(journal)
            journal = self.jwt.open(journal)
            for name in self.journals.remove_unrecorded(journal):
                log.info("removed leftover slot directory %s", name)
            self._journal = journal
            self._apply()
        except BaseException:
            self.close()
            raise
        return journal

    def close(self) -> None:
        """Release the journal (the rotator, if one runs, is stopped first)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self._journal = None
        self._cas.clear()

    def _knows_authority_ca(self, journal: Journal) -> bool:
        """Whether the authority's CA is one of the journal's slots. A CA the journal never
        saw was put there deliberately, and wins; a known one means the backend's files
        lag behind the journal (a crash while publishing), and the journal wins."""
        ca = cert_id(self.authority.signer.certificate)
        return any(record.ca == ca for record in journal.slots)

    def _adopt(self) -> Journal:
        """First use: the authority's current CA becomes the active slot."""
        signer = self.authority.signer
        bundle = self.authority.bundle()
        root = root_of((signer.certificate, *signer.intermediates), bundle)
        ca = SigningCa(signer, root)
        journal, slot_id = Journal(bundle.trust_domain, (), bundle).allocate_slot_id()
        self.journals.write_slot(slot_id, ca)
        kind = SlotKind.ROOT if ca.is_self_signed else SlotKind.INTERMEDIATE
        record = slot_record(slot_id, SlotStatus.ACTIVE, kind, ca, self.clock())
        self._cas[slot_id] = ca
        journal = self.journals.save(journal.with_slot(record))
        log.info("rotation journal started with %s as the active signing CA", slot_id)
        return journal

    def _finish_pending(self, journal: Journal) -> Journal:
        """Complete the CA creation a crash interrupted: adopt its files when written,
        otherwise create it now (it never existed, so nothing is created twice)."""
        pending = journal.pending
        assert pending is not None
        if self.journals.slot_exists(pending.slot):
            ca = self.journals.read_slot(pending.slot)
            log.info("resuming: adopting slot %s written before a restart", pending.slot)
        else:
            active = self._cas[journal.active.id]
            try:
                ca = self.source.create(active, new_root=pending.kind is SlotKind.ROOT)
            except RotationError as exc:
                # It was never created; the schedule (or the operator) prepares one later.
                log.warning(
                    "resuming: slot %s, whose creation was interrupted, cannot be created "
                    "now (%s); it is dropped",
                    pending.slot,
                    exc,
                )
                return self.journals.save(replace(journal, pending=None))
            self.journals.write_slot(pending.slot, ca)
            log.info("resuming: created slot %s whose creation was interrupted", pending.slot)
        return self.journals.save(self._prepared(journal, pending, ca))

    def _prepared(self, journal: Journal, pending: PendingCa, ca: SigningCa) -> Journal:
        """``journal`` with ``ca`` recorded in the prepared slot ``pending`` reserved (not
        saved yet)."""
        # The kind follows the CA that was made: a backend holding the roots (Vault) may
        # sign under a root other than the active one even when none was asked for.
        active_root = journal.active.root
        kind = SlotKind.INTERMEDIATE if cert_id(ca.root) == active_root else SlotKind.ROOT
        if kind is not pending.kind:
            log.info(
                "slot %s: the CA the backend made chains to %s",
                pending.slot,
                f"a new root {fingerprint(ca.root)}" if kind is SlotKind.ROOT else "the same root",
            )
        record = slot_record(pending.slot, SlotStatus.PREPARED, kind, ca, self.clock())
        journal = journal.with_slot(record)
        if kind is SlotKind.ROOT:
            journal = replace(journal, bundle=journal.bundle.with_root(ca.root))
        self._cas[pending.slot] = ca
        return replace(journal, pending=None)

    def _save(self, journal: Journal) -> Journal:
        self._journal = self.journals.save(journal)
        return self._journal

    async def _save_off_loop(self, journal: Journal) -> Journal:
        """:meth:`_save`, the write and its fsyncs in a thread: the event loop keeps
        serving streams meanwhile. Callers still await it before applying the change,
        so the journal holds every change before anything acts on it."""
        self._journal = await asyncio.to_thread(self.journals.save, journal)
        return self._journal

    def save_journal(self, journal: Journal) -> Journal:
        """Write ``journal`` and make it the current one (for the JWT key slots)."""
        return self._save(journal)

    def _apply(self) -> None:
        """Make the authority, the store and the backend's files match the journal."""
        active = self._apply_in_memory()
        self.source.publish(active, self.journal.bundle)
        self.jwt.apply()  # its own changes apply themselves; here for open()'s repair

    async def _apply_off_loop(self) -> None:
        """:meth:`_apply` with the backend's files (``ca/``) written in a thread, after
        the streams were told: their pushes do not wait for the disk. The journal already
        holds the change, so a crash before the files are written is repaired when the
        manager opens again (the journal wins, and :meth:`open` publishes it)."""
        active = self._apply_in_memory()
        await asyncio.to_thread(self.source.publish, active, self.journal.bundle)

    def _apply_in_memory(self) -> SigningCa:
        """Make the authority and the store match the journal (the store's listeners wake
        the streams a changed bundle concerns); returns the active CA."""
        journal = self.journal
        active = self._cas[journal.active.id]
        if (
            self.authority.signer.certificate != active.signer.certificate
            or self.authority.bundle() != journal.bundle
        ):
            self.authority.activate(active.signer, journal.bundle)
        if self.store is not None:
            self.store.refresh_bundle()
        return active

    # reads ----------------------------------------------------------------------------
    def ca(self, slot_id: str) -> SigningCa:
        return self._cas[slot_id]

    @property
    def active(self) -> SigningCa:
        return self._cas[self.journal.active.id]

    def schedule(self) -> Schedule:
        return Schedule.of(self.journal.active, self.policy)

    def next_kind(self, now: datetime | None = None) -> SlotKind:
        """A new root when the signer is the root itself, or when the root would cut the
        next CA short; otherwise a new signing CA under the same root."""
        now = now or self.clock()
        active = self.active
        if active.is_self_signed:
            return SlotKind.ROOT
        life = self.journal.active.not_after - self.journal.active.not_before
        wanted = max(life / 2, CA_TO_LEAF_TTL_RATIO * self.policy.leaf_ttl)
        if active.root.not_valid_after_utc - now < wanted:
            return SlotKind.ROOT
        return SlotKind.INTERMEDIATE

    def served_under(self, root: x509.Certificate) -> list[str]:
        """Identities whose current SVID in the store chains to ``root``."""
        if self.store is None:
            return []
        found = []
        for spiffe_id in self.store.identities():
            svid = self.store.cached(spiffe_id)
            if svid is not None and chains_to(svid.chain, root):
                found.append(str(spiffe_id))
        return found

    def unacked(self, predicate: SecretPredicate) -> list[str]:
        return sorted(set(self.acks.unacked(predicate)))

    # changes (callers hold self.lock) --------------------------------------------------
    async def prepare(self, kind: SlotKind | None = None) -> SlotRecord:
        """Create the next CA in the prepared slot (a root kind enters the bundle and is
        pushed at once). Returns the prepared slot, existing or new."""
        journal = self.journal
        kind = kind or self.next_kind()
        existing = journal.prepared
        if existing is not None:
            if existing.kind is kind:
                return existing
            raise RotationError(
                f"slot {existing.id} already holds a prepared {existing.kind} CA; "
                f"a {kind} CA cannot be prepared beside it"
            )
        active = self.active
        problem = self.source.problem(active, new_root=kind is SlotKind.ROOT)
        if problem is not None:
            raise RotationError(problem)
        journal, slot_id = journal.allocate_slot_id()
        pending = PendingCa(slot_id, kind)
        journal = await self._save_off_loop(replace(journal, pending=pending))
        new_root = kind is SlotKind.ROOT

        def create() -> SigningCa:
            ca = self.source.create(active, new_root=new_root)
            self.journals.write_slot(slot_id, ca)
            return ca

        try:
            ca = await asyncio.to_thread(create)
        except RotationError:
            # The source refused (e.g. Vault unreachable): nothing was made, no intent is
            # left for a restart to finish. Any other failure leaves the intent in place.
            if not self.journals.slot_exists(slot_id):
                await self._save_off_loop(replace(self.journal, pending=None))
            raise
        await self._save_off_loop(self._prepared(journal, pending, ca))
        await self._apply_off_loop()
        record = self.journal.slot(slot_id)
        if record.kind is SlotKind.ROOT:
            log.info(
                "prepared a signing CA under a new root in slot %s (the signing CA ends %s); "
                "root %s (ends %s) added to the trust bundle",
                slot_id,
                rfc3339(ca.signer.not_after),
                fingerprint(ca.root),
                rfc3339(ca.root.not_valid_after_utc),
            )
        else:
            log.info(
                "prepared a new signing CA under the same root in slot %s (it ends %s)",
                slot_id,
                rfc3339(ca.signer.not_after),
            )
        return record

    async def activate(self, slot_id: str | None = None, *, renew: bool = False) -> SlotRecord:
        """Make the prepared slot (or ``slot_id``, prepared or old) the signer; the previous
        active slot becomes old. With ``renew``, every SVID in the store is re-issued now."""
        journal = self.journal
        target = journal.slot(slot_id) if slot_id else journal.prepared
        if target is None:
            raise RotationError("no prepared signing CA to activate")
        if target.status is not SlotStatus.ACTIVE:
            # Refused before anything is written: an expired or broken CA never signs.
            self_check(self._cas[target.id].signer, journal.bundle)
            previous = journal.active
            demoted = SlotStatus.PREPARED if target.status is SlotStatus.OLD else SlotStatus.OLD
            journal = journal.set_status(previous.id, demoted)
            journal = journal.set_status(target.id, SlotStatus.ACTIVE)
            await self._save_off_loop(journal)
            log.info("slot %s now signs (slot %s is %s)", target.id, previous.id, demoted)
        await self._apply_off_loop()
        if renew and self.store is not None:
            await self.store.renew_all()
            log.info("re-issued %d SVIDs under slot %s", len(self.store.identities()), target.id)
        return self.journal.slot(target.id)

    async def discard_prepared(self) -> SlotRecord | None:
        """Drop the prepared slot (it signed nothing); its new root leaves the bundle."""
        journal = self.journal
        prepared = journal.prepared
        if prepared is None:
            return None
        journal = journal.without_slot(prepared.id)
        journal = self._without_unused_root(journal, self._cas[prepared.id].root)
        await self._save_off_loop(journal)
        await self._apply_off_loop()
        await asyncio.to_thread(self.journals.remove_slot, prepared.id)
        self._cas.pop(prepared.id, None)
        log.info("discarded prepared slot %s", prepared.id)
        return prepared

    async def retire(self, slot_id: str) -> None:
        """Drop an old slot; its root leaves the bundle if no remaining slot uses it."""
        journal = self.journal
        record = journal.slot(slot_id)
        if record.status is not SlotStatus.OLD:
            raise RotationError(f"slot {slot_id} is {record.status}, not old")
        journal = self._without_unused_root(journal.without_slot(slot_id), self._cas[slot_id].root)
        await self._save_off_loop(journal)
        await self._apply_off_loop()
        await asyncio.to_thread(self.journals.remove_slot, slot_id)
        self._cas.pop(slot_id, None)
        log.info("retired slot %s", slot_id)

    def _without_unused_root(self, journal: Journal, root: x509.Certificate) -> Journal:
        root_id = cert_id(root)
        if any(record.root == root_id for record in journal.slots):
            return journal
        if root in self.external_roots:
            log.info(
                "root %s stays in the trust bundle: the backend still holds it",
                fingerprint(root),
            )
            return journal
        log.info("root %s leaves the trust bundle", fingerprint(root))
        return replace(journal, bundle=journal.bundle.without_root(root))

    # roots the backend holds (Vault's issuers) ----------------------------------------
    async def follow_roots(self, roots: TrustBundle) -> bool:
        """Make the bundle hold exactly the backend's ``roots`` plus the roots of every
        slot (a root still signing, or still chained to by served certificates, stays).
        A new root is pushed at once; returns whether the bundle changed."""
        async with self.lock:
            return self.follow_roots_now(roots)

    def follow_roots_now(self, roots: TrustBundle) -> bool:
        """:meth:`follow_roots` for callers that hold the lock or run before the schedule
        starts."""
        self.external_roots = tuple(roots)
        journal = self.journal
        in_use = {record.root for record in journal.slots}
        kept = [r for r in journal.bundle if r in roots or cert_id(r) in in_use]
        bundle = TrustBundle.of(journal.trust_domain, [*kept, *roots])
        if bundle == journal.bundle:
            return False
        for root in bundle:
            if root not in journal.bundle:
                log.info("root %s (the backend's) joins the trust bundle", fingerprint(root))
        for root in journal.bundle:
            if root not in bundle:
                log.info("root %s left the backend: it leaves the trust bundle", fingerprint(root))
        self._save(replace(journal, bundle=bundle))
        self._apply()
        return True

    async def set_root_rotation(self, state: RootRotationState | None) -> None:
        """Record the root rotation's stage (nothing is written when it is unchanged)."""
        current = self.journal.root_rotation
        if state is None and current is None:
            return
        if state is not None:
            if current is not None and replace(state, updated=current.updated) == current:
                return
            state = replace(state, updated=datetime.now(UTC))
        await self._save_off_loop(replace(self.journal, root_rotation=state))

    # operator: rotate the signing CA now ----------------------------------------------
    async def rotate_now(self) -> SlotRecord:
        """A new signing CA under the same root, signing at once; every SVID re-issued."""
        async with self.lock:
            journal = self.journal
            if journal.root_rotation is not None:
                raise RotationError(
                    "a root rotation is in progress; finish it or roll it back first "
                    "('meshca ca rotate-root' / 'meshca ca rotate-root --rollback')"
                )
            if self.active.is_self_signed:
                raise RotationError(
                    "the signing CA is the root itself: replace it with 'meshca ca rotate-root'"
                )
            prepared = journal.prepared
            if prepared is not None and prepared.kind is SlotKind.ROOT:
                raise RotationError(
                    f"slot {prepared.id} holds a CA under a new root, waiting for proxies to "
                    "ACK it; it activates on schedule (or use 'meshca ca rotate-root')"
                )
            record = await self.prepare(SlotKind.INTERMEDIATE)
            if record.kind is SlotKind.ROOT:
                # The backend signed under a root of its own (Vault's default issuer
                # changed): proxies must trust that root before it signs anything.
                raise RotationError(
                    f"the new signing CA in slot {record.id} chains to another root "
                    f"({fingerprint(self.ca(record.id).root)}), the backend's new one; it "
                    "activates on schedule once every proxy has ACKed that root (or use "
                    "'meshca ca rotate-root' to switch now, step by step)"
                )
            return await self.activate(record.id, renew=True)
