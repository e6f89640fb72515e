"""The attested agents: for each agent ID, what it is entitled to and until when it may
renew its own SVID (``agents/agents.json`` in the data directory, 0600).

This record, not the certificate, is what the CSR API trusts after attestation: an agent
SVID authenticates only while a record names its ID and its ``reattest_by`` is ahead,
so a chain of self-renewals ends at the maximum age set at attestation, and deleting the
record (``meshca token`` never shows it) evicts the agent at its next call.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from meshca.attest.state_file import RecordFile, parsing
from meshca.spiffe import SpiffeId

AGENTS_FILE = "agents.json"


@dataclass(frozen=True)
class AgentRecord:
    agent_id: SpiffeId
    identity: SpiffeId | None  # sidecar: the one workload identity; None in node mode
    node: bool
    attested_at: datetime
    reattest_by: datetime  # the end of its chain of self-renewals
    attestor: str
    kube_node: str | None = None  # a Kubernetes node agent: entries of pods on this node only

    def entitled(self) -> tuple[SpiffeId, ...]:
        return (self.identity,) if self.identity is not None else ()

    def to_json(self) -> dict[str, Any]:
        return {
            "identity": str(self.identity) if self.identity else None,
            "node": self.node,
            "attested_at": int(self.attested_at.timestamp()),
            "reattest_by": int(self.reattest_by.timestamp()),
            "attestor": self.attestor,
            **({"kube_node": self.kube_node} if self.kube_node is not None else {}),
        }

    @classmethod
    def from_json(cls, agent_id: str, data: dict[str, Any]) -> AgentRecord:
        with parsing(f"agent record {agent_id}"):
            identity = SpiffeId.parse(data["identity"]) if data.get("identity") else None
            return cls(
                SpiffeId.parse(agent_id),
                identity,
                bool(data.get("node", False)),
                datetime.fromtimestamp(int(data["attested_at"]), UTC),
                datetime.fromtimestamp(int(data["reattest_by"]), UTC),
                str(data.get("attestor", "")),
                str(data["kube_node"]) if data.get("kube_node") is not None else None,
            )


class AgentRecords:
    """The record file, re-read when it changes on disk (another process may write it)."""

    def __init__(self, data_dir: Path) -> None:
        self.file = RecordFile(data_dir, AGENTS_FILE, AgentRecord.from_json)

    def all(self) -> dict[str, AgentRecord]:
        return self.file.cached()

    def get(self, agent_id: SpiffeId) -> AgentRecord | None:
        return self.all().get(str(agent_id))

    def add(self, record: AgentRecord) -> None:
        """Record an attested agent; records past their ``reattest_by`` are dropped."""
        now = datetime.now(UTC)
        with self.file.locked():
            records = {k: r for k, r in self.file.read().items() if r.reattest_by > now}
            records[str(record.agent_id)] = record
            self.file.write(records)

    def remove(self, agent_id: SpiffeId) -> bool:
        with self.file.locked():
            records = self.file.read()
            if records.pop(str(agent_id), None) is None:
                return False
            self.file.write(records)
        return True
