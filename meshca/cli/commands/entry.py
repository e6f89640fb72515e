"""``meshca entry``: registration entries for node-mode agents (docs/agent.md).

Stored in the data directory (``agents/entries.json``, 0600, under the lock shared with
``meshca serve``); a running server reads them at each call, and agents pick changes up
at their next poll.
"""

from __future__ import annotations

import argparse
import json

from meshca.cli.commands.common import CONFIGURATION, Action, Command, UsageError, arg, write_out
from meshca.cli.options import Settings

NAME = "entry"


def run(args: argparse.Namespace, settings: Settings) -> int:
    from meshca.attest.entries import EntryStore  # loaded by this command only

    store = EntryStore(settings["data_dir"])
    if args.entry_action == "create":
        identity, node, selectors = (
            settings["identity"],
            settings["entry_node"],
            settings["selector"],
        )
        if identity is None or node is None or not selectors:
            raise UsageError("entry create needs --identity ID, --node AGENT_ID and --selector")
        entry = store.create(identity, node, selectors.split(","))
        write_out(entry.id + "\n")
        return 0
    if args.entry_action == "delete":
        if not store.delete(args.entry_id):
            raise UsageError(f"no entry has the ID {args.entry_id!r}")
        write_out(f"deleted entry {args.entry_id}\n")
        return 0
    entries = sorted(store.all().values(), key=lambda e: (str(e.node), str(e.spiffe_id)))
    if args.json:
        rows = [{"id": e.id, **e.to_json()} for e in entries]
        write_out(json.dumps(rows, indent=2) + "\n")
        return 0
    for e in entries:
        write_out(f"{e.id}  {e.spiffe_id}  node {e.node}  {' '.join(e.selectors)}\n")
    return 0


COMMAND = Command(
    NAME,
    run,
    description=(
        "A registration entry lets the node-mode agent --node AGENT_ID obtain "
        "--identity ID for local callers matching every --selector (unix:uid:N, "
        "unix:gid:N, unix:path:/abs/exe)."
    ),
    actions=(
        Action("create", "add an entry; prints its ID"),
        Action(
            "list",
            "every entry",
            arguments=(arg("--json", action="store_true", help="print JSON"), CONFIGURATION),
        ),
        Action(
            "delete",
            "remove an entry by its ID",
            arguments=(arg("entry_id", metavar="ENTRY_ID"), CONFIGURATION),
        ),
    ),
)
