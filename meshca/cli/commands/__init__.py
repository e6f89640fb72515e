"""The ``meshca`` commands: one module per command, each declaring its ``COMMAND``.

To add a command, write ``meshca/cli/commands/<module>.py`` ending in
``COMMAND = Command(...)`` (:class:`meshca.cli.commands.common.Command`: its help,
arguments and handler) and list it in :data:`COMMANDS` with its one-line summary. Only
the module of the command being run is imported: ``meshca --help`` lists the summaries
from here, so a command never pays for another's modules and libraries. Errors a command
raises for bad input or a refused request belong in :data:`REFUSALS`: the command line
prints them as one line and exits 1.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meshca.cli.commands.common import Command


class Listed:
    """A command as ``meshca --help`` lists it; its module is imported only to run it."""

    __slots__ = ("module", "name", "summary")

    def __init__(self, name: str, module: str, summary: str) -> None:
        self.name = name
        self.module = module  # in this package
        self.summary = summary

    def load(self) -> Command:
        command: Command = importlib.import_module(f"{__name__}.{self.module}").COMMAND
        return command


# The command registry, in the order `meshca --help` lists them.
COMMANDS = (
    Listed("init", "init", "create the CA in the data directory"),
    Listed("issue", "issue", "issue an X.509-SVID to files"),
    Listed("inspect", "inspect", "describe an X.509-SVID and check it"),
    Listed("bundle", "bundle", "print the trust bundle"),
    Listed("serve", "serve", "serve certificates (SDS) and mesh configuration (ADS) to Envoy"),
    Listed("bootstrap", "bootstrap", "write an Envoy bootstrap that uses meshca's SDS (or ADS)"),
    Listed("ca", "ca", "show and rotate the signing CA and the root"),
    Listed("token", "token", "create, list and revoke one-time join tokens for meshca agent"),
    Listed(
        "agent",
        "agent",
        "keep workload keys local; serve SDS and the SPIFFE Workload API on a socket",
    ),
    Listed("agent-admin", "agent_admin", "list attested meshca agents, or evict one"),
    Listed(
        "entry",
        "entry",
        "registration entries: which identities a node-mode agent serves, to whom",
    ),
)

# Exceptions that mean "refused" (exit 1, one line), not "bug" (traceback), by module
# and name: a command loads only the modules it uses, and an exception can only come
# from a module that was loaded, so these are looked up when one is raised.
REFUSALS: tuple[tuple[str, str], ...] = (
    ("meshca.issuer.errors", "IssuerError"),
    ("meshca.spiffe", "SpiffeIdError"),
    ("meshca.util.durations", "DurationError"),
    ("meshca.envoy.model", "MeshError"),
    ("meshca.cli.options", "ConfigError"),
    ("meshca.attest.tokens", "TokenError"),
    ("meshca.attest.state_file", "StateFileError"),
    ("meshca.attest.entries", "EntryError"),
)


def is_refusal(exc: BaseException) -> bool:
    """Whether ``exc`` is bad input or a refused request (OSError included)."""
    if isinstance(exc, OSError):
        return True
    for module_name, name in REFUSALS:
        module = sys.modules.get(module_name)
        if module is not None and isinstance(exc, getattr(module, name)):
            return True
    return False
