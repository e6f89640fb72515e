"""The ``meshca`` commands: one module per command, each declaring its ``COMMAND``.

To add a command, write ``meshca/cli/commands/<name>.py`` ending in ``COMMAND = Command(...)``
(:class:`meshca.cli.commands.common.Command`: its help, arguments and handler) and append
it to :data:`COMMANDS`. Errors a command raises for bad input or a refused request belong in
:data:`REFUSALS`: the command line prints them as one line and exits 1.
"""

from __future__ import annotations

import sys

from meshca.cli.commands import (
    agent,
    agent_admin,
    bootstrap,
    bundle,
    ca,
    entry,
    init,
    inspect,
    issue,
    serve,
    token,
)

# The command registry, in the order `meshca --help` lists them.
COMMANDS = (
    init.COMMAND,
    issue.COMMAND,
    inspect.COMMAND,
    bundle.COMMAND,
    serve.COMMAND,
    bootstrap.COMMAND,
    ca.COMMAND,
    token.COMMAND,
    agent.COMMAND,
    agent_admin.COMMAND,
    entry.COMMAND,
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
