"""The JWT-SVID signing key's slots: prepare, activate, retire, in the rotation journal.

A JWT-SVID names the key that signed it (``kid``) and is checked against the keys the
trust domain publishes (the JWKS), so a new key must be published before it signs, and
an old one may leave only when no token it signed can still be valid:

* **prepare** creates the next key and publishes it beside the signing one;
* **activate** makes it sign, once every attested agent has acknowledged a key set
  holding it (the :class:`~meshca.rotation.acks.AckTracker`, :func:`jwks_holds`): a
  token it signs must validate at every agent's Workload API from the first moment. The
  schedule retries until then; an operator may go on without them (``force``). The
  previous key becomes ``old`` with a ``retire_at`` one longest JWT-SVID lifetime (plus
  the validation leeway) later;
* **retire** removes old keys past their ``retire_at`` from the JWKS and the disk.

Every change is written to the journal before it is applied (the key file first, then
the record, then the published files and the in-memory :class:`JwtAuthorities`), so a
crash at any point is repaired by the next :meth:`JwtKeySlots.open`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from meshca.backends.jwt_key import (
    jwt_key_path,
    load_jwt_key_pem,
    new_jwt_key_pem,
    publish_jwt_keys,
)
from meshca.issuer import IssuerError
from meshca.issuer.jwt_svid import LEEWAY, MAX_JWT_TTL, JwtAuthorities, JwtSigner
from meshca.rotation.acks import jwks_holds, shown
from meshca.rotation.journal import (
    Journal,
    JournalError,
    JwtKeyRecord,
    RotationError,
    SlotStatus,
)
from meshca.util.formats import rfc3339
from meshca.util.logger import get_logger

if TYPE_CHECKING:
    from meshca.rotation.manager import RotationManager

log = get_logger("meshca.rotation")

DEFAULT_JWT_KEY_TTL = timedelta(days=1)
MIN_JWT_KEY_TTL = timedelta(minutes=1)
# The longest a JWT-SVID signed by a key may still validate after that key stops signing.
JWT_RETIRE_DELAY = MAX_JWT_TTL + LEEWAY
STATUS_LISTED = 100  # agents a status names; its count says how many in all


class JwtKeyUnacked(RotationError):
    """The prepared key is not yet in the key set of every attested agent: activating it
    now would sign tokens their Workload API clients cannot validate."""

    def __init__(self, record: JwtKeyRecord, waiting: list[str], waited: float = 0.0) -> None:
        after = f" after {waited:g}s" if waited else ""
        super().__init__(
            f"JWT key {record.id} (kid {record.kid}) is not activated: {len(waiting)} "
            f"agent(s) have not fetched a key set holding it{after}: {shown(waiting)} "
            "(it stays prepared; run activate again once they have polled, evict a "
            "stopped agent with 'meshca agent-admin evict', or add --force-unacked: "
            "tokens it signs would not validate at those agents)"
        )
        self.record = record
        self.waiting = waiting


@dataclass(frozen=True)
class JwtSchedule:
    """When the signing key's successor is prepared and activated (wall clock)."""

    prepare_at: datetime
    activate_at: datetime

    @classmethod
    def of(
        cls, record: JwtKeyRecord, ttl: timedelta, prepare: float, activate: float
    ) -> JwtSchedule:
        start = record.activated or record.created
        return cls(start + ttl * prepare, start + ttl * activate)


class JwtKeySlots:
    """The JWT key half of a :class:`RotationManager` (its journal, lock and clock)."""

    def __init__(self, manager: RotationManager) -> None:
        self.manager = manager
        self.authorities = JwtAuthorities()
        self._signers: dict[str, JwtSigner] = {}
        self._held: str | None = None  # the prepared key the schedule said it holds

    @property
    def journal(self) -> Journal:
        return self.manager.journal

    def schedule(self) -> JwtSchedule:
        policy = self.manager.policy
        return JwtSchedule.of(
            self.active,
            policy.jwt_key_ttl,
            policy.prepare_fraction,
            policy.activate_fraction,
        )

    @property
    def active(self) -> JwtKeyRecord:
        active = self.journal.jwt_with_status(SlotStatus.ACTIVE)
        if len(active) != 1:
            raise JournalError(f"the journal has {len(active)} active JWT keys; one expected")
        return active[0]

    @property
    def prepared(self) -> JwtKeyRecord | None:
        prepared = self.journal.jwt_with_status(SlotStatus.PREPARED)
        return prepared[0] if prepared else None

    @property
    def old(self) -> list[JwtKeyRecord]:
        return self.journal.jwt_with_status(SlotStatus.OLD)

    # opening -----------------------------------------------------------------------------
    def open(self, journal: Journal) -> Journal:
        """Load the recorded keys (adopting ``jwt/jwt-key.pem``, or making a key, on first
        use), drop key files no record names, and publish. Returns the journal."""
        journals = self.manager.journals
        self._signers.clear()
        if not journal.jwt_keys:
            journal = self._adopt(journal)
        for record in journal.jwt_keys:
            data = journals.read_jwt_key(record.id)
            try:
                signer = load_jwt_key_pem(data, str(journals.jwt_key_path(record.id)))
            except IssuerError as exc:
                raise JournalError(str(exc)) from None
            if signer.kid != record.kid:
                raise JournalError(
                    f"JWT key {record.id} holds a key other than the journal records"
                )
            self._signers[record.id] = signer
        for name in journals.remove_unrecorded_jwt_keys(journal):
            log.info("removed leftover JWT key file %s", name)
        return journal

    def _adopt(self, journal: Journal) -> Journal:
        """First use: the key a server made before rotation knew of JWT keys, if any."""
        existing = jwt_key_path(self.manager.data_dir)
        try:
            pem = existing.read_bytes()
            how = f"adopted {existing}"
        except FileNotFoundError:
            pem = new_jwt_key_pem()
            how = "a new key"
        try:
            signer = load_jwt_key_pem(pem, str(existing))
        except IssuerError as exc:
            raise JournalError(str(exc)) from None
        journal, key_id = journal.allocate_jwt_key_id()
        self.manager.journals.write_jwt_key(key_id, pem)
        now = self.manager.clock()
        record = JwtKeyRecord(key_id, SlotStatus.ACTIVE, signer.kid, now, activated=now)
        journal = self.manager.journals.save(journal.with_jwt_key(record))
        log.info("JWT keys: %s signs JWT-SVIDs (%s, kid %s)", key_id, how, signer.kid)
        return journal

    def apply(self) -> None:
        """Make the published files and the in-memory authorities match the journal."""
        records = sorted(self.journal.jwt_keys, key=lambda r: r.id)
        signer = self._signers[self.active.id]
        published = [self._signers[r.id].key.public_key() for r in records]
        publish_jwt_keys(self.manager.data_dir, signer, published)
        self.authorities.update(signer, published)

    # changes (callers hold the manager's lock) -------------------------------------------
    def prepare(self) -> JwtKeyRecord:
        """Create the next key and publish it beside the signing one (no-op if prepared)."""
        existing = self.prepared
        if existing is not None:
            return existing
        journal, key_id = self.journal.allocate_jwt_key_id()
        pem = new_jwt_key_pem()
        self.manager.journals.write_jwt_key(key_id, pem)  # before the record: see open()
        signer = load_jwt_key_pem(pem, key_id)
        record = JwtKeyRecord(key_id, SlotStatus.PREPARED, signer.kid, self.manager.clock())
        self._signers[key_id] = signer
        self.manager.save_journal(journal.with_jwt_key(record))
        self.apply()
        log.info(
            "JWT keys: prepared %s (kid %s), published beside the signing key", key_id, record.kid
        )
        return record

    def waiting(self) -> list[str]:
        """The attested agents whose key set does not hold the prepared key yet (none
        when no key is prepared)."""
        prepared = self.prepared
        if prepared is None:
            return []
        return self.manager.unacked(jwks_holds(prepared.kid))

    def activate(self, *, force: bool = False) -> JwtKeyRecord:
        """The prepared key signs from now on; the previous one is kept published until
        every token it signed has expired. Refused (:class:`JwtKeyUnacked`, nothing
        changed) while an attested agent has not fetched it, unless ``force``."""
        prepared = self.prepared
        if prepared is None:
            raise RotationError("no prepared JWT key to activate: prepare one first")
        waiting = self.waiting()
        if waiting:
            if not force:
                raise JwtKeyUnacked(prepared, waiting)
            log.warning(
                "JWT keys: activating %s without %d agent(s) that have not fetched it "
                "(--force-unacked): %s",
                prepared.id,
                len(waiting),
                shown(waiting),
            )
        now = self.manager.clock()
        previous = self.active
        retire_at = now + JWT_RETIRE_DELAY
        journal = self.journal.with_jwt_key(
            replace(previous, status=SlotStatus.OLD, retire_at=retire_at)
        )
        journal = journal.with_jwt_key(replace(prepared, status=SlotStatus.ACTIVE, activated=now))
        self.manager.save_journal(journal)
        self.apply()
        log.info(
            "JWT keys: %s signs now; %s stays published until %s",
            prepared.id,
            previous.id,
            rfc3339(retire_at),
        )
        return self.journal.jwt_key(prepared.id)

    def retire(self, *, force: bool = False, now: datetime | None = None) -> list[str]:
        """Remove old keys past their ``retire_at`` from the JWKS (with ``force``, every
        old key: tokens they signed stop validating at once). Returns the keys removed."""
        now = now or self.manager.clock()
        old = self.old
        due = [r for r in old if force or (r.retire_at is not None and now >= r.retire_at)]
        if not due:
            if old:
                first = min(old, key=lambda r: r.retire_at or now)
                raise RotationError(
                    f"JWT key {first.id} may still have signed valid tokens until "
                    f"{rfc3339(first.retire_at or now)}: it stays published until then "
                    "(--force removes it now, and its tokens stop validating)"
                )
            return []
        journal = self.journal
        for record in due:
            journal = journal.without_jwt_key(record.id)
        self.manager.save_journal(journal)
        self.apply()
        for record in due:
            self.manager.journals.remove_jwt_key(record.id)
            self._signers.pop(record.id, None)
            log.info("JWT keys: %s (kid %s) left the JWKS", record.id, record.kid)
        return [record.id for record in due]

    # the schedule (the rotator's tick, under the manager's lock) -------------------------
    def tick(self, now: datetime) -> list[datetime]:
        """Do what is due at ``now``; return when to look again."""
        schedule = self.schedule()
        due: list[datetime] = []
        if self.prepared is None:
            if now >= schedule.prepare_at:
                self.prepare()
            else:
                due.append(schedule.prepare_at)
        prepared = self.prepared
        if prepared is not None:
            if now < schedule.activate_at:
                due.append(schedule.activate_at)
            elif self._activate_when_acked(prepared):
                due.append(self.schedule().prepare_at)
            else:
                due.append(now + self.manager.policy.retry_interval)
        retire = [r.retire_at for r in self.old if r.retire_at is not None]
        if any(now >= moment for moment in retire):
            self.retire(now=now)
        due.extend(moment for moment in retire if moment > now)
        return due

    def _activate_when_acked(self, prepared: JwtKeyRecord) -> bool:
        """The schedule's activation: held (one log line per key) while an agent has not
        fetched the key; whether it was activated."""
        try:
            self.activate()
        except JwtKeyUnacked as exc:
            if self._held != prepared.id:
                self._held = prepared.id
                log.info(
                    "JWT keys: %s is due to sign but waits for %d agent(s) to fetch it "
                    "(retrying every %gs): %s",
                    prepared.id,
                    len(exc.waiting),
                    self.manager.policy.retry_interval.total_seconds(),
                    shown(exc.waiting),
                )
            return False
        self._held = None
        return True

    def status(self) -> dict[str, object]:
        schedule = self.schedule()
        waiting = self.waiting()
        return {
            "keys": [
                {
                    "id": r.id,
                    "status": r.status.value,
                    "kid": r.kid,
                    "created": rfc3339(r.created),
                    "activated": rfc3339(r.activated) if r.activated else None,
                    "retire_at": rfc3339(r.retire_at) if r.retire_at else None,
                }
                for r in sorted(self.journal.jwt_keys, key=lambda r: r.id)
            ],
            "schedule": {
                "prepare_at": rfc3339(schedule.prepare_at),
                "activate_at": rfc3339(schedule.activate_at),
            },
            # The agents the prepared key's activation waits for (bounded), and how many.
            "waiting_on": waiting[:STATUS_LISTED],
            "waiting_count": len(waiting),
        }
