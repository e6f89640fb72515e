"""``meshca token``: one-time join tokens that admit a ``meshca agent`` (docs/agent.md).

Tokens are stored hashed in the data directory (``agents/tokens.json``, 0600, under a
lock), which a running ``meshca serve`` re-reads at each attestation: creating a token
needs no server restart and no admin socket.
"""

from __future__ import annotations

import argparse
import json
import sys

from meshca.cli.commands.common import (
    CONFIGURATION,
    Action,
    Command,
    UsageError,
    arg,
    open_ca,
    write_out,
)
from meshca.cli.options import Settings
from meshca.issuer import IssuerError
from meshca.spiffe import SpiffeId, TrustDomain
from meshca.util.formats import rfc3339

NAME = "token"


def _trust_domain(settings: Settings) -> TrustDomain:
    """The CA's trust domain when the data directory holds one, else the option's."""
    try:
        return open_ca(settings).trust_domain
    except (IssuerError, OSError):
        return TrustDomain.parse(str(settings["trust_domain"]))


def run(args: argparse.Namespace, settings: Settings) -> int:
    from meshca.attest.tokens import ATTESTOR, TokenStore  # loaded by this command only

    store = TokenStore(settings["data_dir"])
    if args.token_action == "create":
        identity, node = settings["identity"], settings["node"]
        if identity is None and not node:
            raise UsageError("token create needs --identity ID (or --node)")
        token, record = store.create(identity, node=node, ttl=settings["token_ttl"])
        write_out(token + "\n")
        if node:  # entries name the agent: say which ID this token's agent will have
            agent_id = SpiffeId.for_agent(_trust_domain(settings), ATTESTOR, record.id)
            print(f"agent ID: {agent_id}", file=sys.stderr)
        return 0
    if args.token_action == "delete":
        if not store.delete(args.token_id):
            raise UsageError(f"no unused token has the ID {args.token_id!r}")
        write_out(f"deleted token {args.token_id}\n")
        return 0
    tokens = store.list()
    if args.json:
        rows = [
            {
                "id": t.id,
                "identity": str(t.identity) if t.identity else None,
                "node": t.node,
                "expires": rfc3339(t.expires),
            }
            for t in tokens
        ]
        write_out(json.dumps(rows, indent=2) + "\n")
        return 0
    for t in tokens:
        what = str(t.identity) if t.identity else "node (registration entries)"
        write_out(f"{t.id}  expires {rfc3339(t.expires)}  {what}\n")
    return 0


COMMAND = Command(
    NAME,
    run,
    description=(
        "Join tokens admit a 'meshca agent': it exchanges one for its agent SVID at "
        "'meshca serve --attest-listen'. A token is printed once, stored only as its "
        "SHA-256, used at most once and expires (--ttl)."
    ),
    actions=(
        Action(
            "create",
            "print a new token for --identity ID (sidecar) or --node",
            "Print a new one-time join token. With --identity ID the agent it admits may "
            "obtain exactly that workload identity (sidecar mode).",
        ),
        Action(
            "list",
            "unused, unexpired tokens (IDs, never tokens)",
            arguments=(arg("--json", action="store_true", help="print JSON"), CONFIGURATION),
        ),
        Action(
            "delete",
            "revoke an unused token by its ID",
            arguments=(
                arg("token_id", metavar="TOKEN_ID", help="the ID 'meshca token list' shows"),
                CONFIGURATION,
            ),
        ),
    ),
)
