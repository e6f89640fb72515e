"""What ``meshca ca status`` reports of rotation: slots, the trust bundle's roots, the
schedule, why the next CA cannot be prepared (if so), and the JWT signing key's slots."""

from __future__ import annotations

from typing import Any

from meshca.issuer.svid import fingerprint
from meshca.rotation.journal import SigningCa, SlotKind
from meshca.rotation.manager import RotationManager
from meshca.util.formats import name_text, rfc3339


def slot_label(kind: SlotKind, ca: SigningCa) -> str:
    """What a slot holds, in words: its ``kind`` says whether it came with a new root, but
    what it holds is a signing CA (a root only when it signs itself)."""
    if ca.is_self_signed:
        return "root CA (signs itself)"
    if kind is SlotKind.ROOT:
        return "signing CA, new root"
    return "signing CA"


def rotation_status(manager: RotationManager, problem: str | None = None) -> dict[str, Any]:
    """The manager's state as JSON-ready data. ``problem`` is the rotator's last failure
    to prepare (None: the source is asked why it could not prepare now, if at all)."""
    journal = manager.journal
    schedule = manager.schedule()
    active = manager.active
    roots = [
        {
            "fingerprint": fingerprint(root),
            "subject": name_text(root.subject),
            "not_after": rfc3339(root.not_valid_after_utc),
            "served_under": len(manager.served_under(root)),
        }
        for root in journal.bundle
    ]
    slots = []
    for record in sorted(journal.slots, key=lambda r: r.id):
        ca = manager.ca(record.id)
        slots.append(
            {
                "id": record.id,
                "status": record.status.value,
                "kind": record.kind.value,
                "what": slot_label(record.kind, ca),
                "subject": name_text(ca.signer.certificate.subject),
                "root": fingerprint(ca.root),
                "not_before": rfc3339(record.not_before),
                "not_after": rfc3339(record.not_after),
            }
        )
    return {
        "trust_domain": journal.trust_domain.name,
        "sequence": journal.sequence,
        "slots": slots,
        "bundle": roots,
        "schedule": {
            "prepare_at": rfc3339(schedule.prepare_at),
            "activate_at": rfc3339(schedule.activate_at),
        },
        "pending": journal.pending.to_json() if journal.pending else None,
        "problem": problem
        or manager.source.problem(active, new_root=manager.next_kind() is SlotKind.ROOT),
        "renewal": manager.source.describe(active),
        "jwt_keys": manager.jwt.status(),
    }
