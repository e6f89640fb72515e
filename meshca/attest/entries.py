"""Registration entries: which workload identities a node-mode agent may obtain, and for
which local callers (``agents/entries.json``, 0600, under the lock).

An entry names an identity, the agent (by its agent ID) that may obtain it, and
selectors a caller of that agent's socket must all match: ``unix:uid:N``,
``unix:gid:N`` (the caller's primary gid) and ``unix:path:/abs/exe`` (the caller's
executable), read by the agent from SO_PEERCRED and ``/proc/<pid>/exe``. SPIRE's
registration entries and unix workload attestor are the model.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshca.attest.state_file import RecordFile, parsing
from meshca.spiffe import SpiffeId

ENTRIES_FILE = "entries.json"
MAX_ENTRIES = 10_000
MAX_SELECTORS = 16
KINDS = ("uid", "gid", "path")


class EntryError(ValueError):
    """An entry or selector meshca cannot accept; the message says why."""


def parse_selector(text: str) -> str:
    """``unix:uid:N``, ``unix:gid:N`` or ``unix:path:/absolute/executable``."""
    parts = text.strip().split(":", 2)
    if len(parts) != 3 or parts[0] != "unix" or parts[1] not in KINDS:
        raise EntryError(
            f"selector {text[:100]!r}: use unix:uid:N, unix:gid:N or unix:path:/abs/exe"
        )
    kind, value = parts[1], parts[2]
    if kind in ("uid", "gid"):
        if not value.isdigit() or int(value) > 2**32 - 1:
            raise EntryError(f"selector {text[:100]!r}: {kind} must be a number")
        return f"unix:{kind}:{int(value)}"
    if not value.startswith("/") or len(value) > 4096 or "\0" in value:
        raise EntryError(f"selector {text[:100]!r}: the path must be absolute")
    return f"unix:path:{os.path.normpath(value)}"


@dataclass(frozen=True)
class RegistrationEntry:
    id: str
    spiffe_id: SpiffeId
    node: SpiffeId  # the agent ID allowed to obtain it
    selectors: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "spiffe_id": str(self.spiffe_id),
            "node": str(self.node),
            "selectors": list(self.selectors),
        }

    @classmethod
    def from_json(cls, entry_id: str, data: dict[str, Any]) -> RegistrationEntry:
        with parsing(f"registration entry {entry_id}"):
            return cls(
                entry_id,
                SpiffeId.parse(data["spiffe_id"]),
                SpiffeId.parse(data["node"]),
                tuple(parse_selector(s) for s in data["selectors"]),
            )


class EntryStore:
    """The entries of one data directory, re-read when the file changes."""

    def __init__(self, data_dir: Path) -> None:
        self.file = RecordFile(data_dir, ENTRIES_FILE, RegistrationEntry.from_json)

    def all(self) -> dict[str, RegistrationEntry]:
        return self.file.cached()

    def for_node(self, node: SpiffeId) -> list[RegistrationEntry]:
        return sorted((e for e in self.all().values() if e.node == node), key=lambda e: e.spiffe_id)

    def create(
        self, spiffe_id: SpiffeId, node: SpiffeId, selectors: list[str]
    ) -> RegistrationEntry:
        if spiffe_id.is_agent:
            raise EntryError(f"{spiffe_id} is under the reserved path /meshca/agent")
        if not node.is_agent:
            raise EntryError(
                f"--node {node} is not an agent ID (spiffe://<td>/meshca/agent/...; "
                "'meshca token create --node' prints the one its token admits)"
            )
        if node.trust_domain != spiffe_id.trust_domain:
            raise EntryError("the identity and the agent must be in one trust domain")
        parsed = tuple(sorted(dict.fromkeys(parse_selector(s) for s in selectors)))
        if not parsed:
            raise EntryError("an entry needs at least one --selector")
        if len(parsed) > MAX_SELECTORS:
            raise EntryError(f"at most {MAX_SELECTORS} selectors per entry")
        entry = RegistrationEntry(secrets.token_hex(8), spiffe_id, node, parsed)
        with self.file.locked():
            entries = self.file.read()
            if len(entries) >= MAX_ENTRIES:
                raise EntryError(f"{len(entries)} entries exist already (at most {MAX_ENTRIES})")
            entries[entry.id] = entry
            self.file.write(entries)
        return entry

    def delete(self, entry_id: str) -> bool:
        with self.file.locked():
            entries = self.file.read()
            if entries.pop(entry_id, None) is None:
                return False
            self.file.write(entries)
        return True
