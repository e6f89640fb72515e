"""``meshca agent-admin``: the attested agents meshca serve knows, and eviction.

The records live in the data directory (``agents/agents.json``, 0600, under the lock
shared with ``meshca serve``), which a running server re-reads when it changes: an
evicted agent's next call to the CSR API (renewal, a workload CSR, a bundle poll) is
refused with PERMISSION_DENIED and logged, so none of its SVIDs is renewed. It can only
come back with a new join token. (``meshca agent`` itself takes no action word: it runs
the agent.)
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from meshca.cli.commands.common import CONFIGURATION, Action, Command, UsageError, arg, write_out
from meshca.cli.options import Settings
from meshca.spiffe import SpiffeId, SpiffeIdError
from meshca.util.formats import rfc3339

NAME = "agent-admin"


def _row(agent_id: str, record: Any) -> dict[str, Any]:
    return {
        "agent_id": agent_id,
        "mode": "node" if record.node else "sidecar",
        "identity": str(record.identity) if record.identity else None,
        "attestor": record.attestor,
        "attested_at": rfc3339(record.attested_at),
        "reattest_by": rfc3339(record.reattest_by),
    }


def run(args: argparse.Namespace, settings: Settings) -> int:
    from meshca.attest.entries import EntryStore  # loaded by this command only
    from meshca.attest.records import AgentRecords

    records = AgentRecords(settings["data_dir"])
    if getattr(args, f"{NAME}_action") == "evict":
        try:
            agent_id = SpiffeId.parse(args.agent_id)
        except SpiffeIdError as exc:
            raise UsageError(f"AGENT_ID: {exc}") from None
        if not records.remove(agent_id):
            raise UsageError(f"no attested agent has the ID {agent_id} (see 'meshca {NAME} list')")
        write_out(
            f"evicted {agent_id}: meshca serve refuses its next call (PERMISSION_DENIED); "
            "it can come back only with a new join token\n"
        )
        named = EntryStore(settings["data_dir"]).for_node(agent_id)
        if named:
            write_out(
                f"{len(named)} registration entries still name it as their node "
                f"({', '.join(e.id for e in named)}): 'meshca entry delete' removes them\n"
            )
        return 0
    rows = [_row(key, record) for key, record in sorted(records.all().items())]
    if args.json:
        write_out(json.dumps(rows, indent=2) + "\n")
        return 0
    for row in rows:
        what = row["identity"] or "node (registration entries)"
        write_out(f"{row['agent_id']}  until {row['reattest_by']}  {what}\n")
    return 0


COMMAND = Command(
    NAME,
    run,
    description=(
        "The agents that attested to 'meshca serve' (join tokens). Evicting one deletes "
        "its record: its next call (renewal, workload CSR, bundle poll) is refused with "
        "PERMISSION_DENIED, so its SVIDs are no longer renewed; only a new join token "
        "admits it again."
    ),
    actions=(
        Action(
            "list",
            "attested agents, their mode and maximum age",
            arguments=(arg("--json", action="store_true", help="print JSON"), CONFIGURATION),
        ),
        Action(
            "evict",
            "forget an agent: its next call is refused",
            arguments=(
                arg(
                    "agent_id",
                    metavar="AGENT_ID",
                    help="the agent's SPIFFE ID, as 'list' shows it",
                ),
                CONFIGURATION,
            ),
        ),
    ),
)
