"""The ``meshca`` commands: one module per command, each exposing ``register(subparsers)``.

To add a command, write ``meshca/cli/commands/<name>.py`` with a ``register`` function that
adds its parser (via :func:`meshca.cli.commands.common.add_command`) and append it to
:data:`COMMANDS`. Errors a command raises for bad input or a refused request belong in
:data:`REFUSALS`: the command line prints them as one line and exits 1.
"""

from __future__ import annotations

from meshca.attest.entries import EntryError
from meshca.attest.state_file import StateFileError
from meshca.attest.tokens import TokenError
from meshca.cli.commands import (
    agent,
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
from meshca.cli.options import ConfigError
from meshca.envoy.mesh import MeshError
from meshca.issuer import IssuerError
from meshca.spiffe import SpiffeIdError
from meshca.util.durations import DurationError

# The command registry, in the order `meshca --help` lists them.
COMMANDS = (
    init.register,
    issue.register,
    inspect.register,
    bundle.register,
    serve.register,
    bootstrap.register,
    ca.register,
    token.register,
    agent.register,
    entry.register,
)

# Exceptions that mean "refused" (exit 1, one line), not "bug" (traceback).
REFUSALS: tuple[type[Exception], ...] = (
    IssuerError,
    SpiffeIdError,
    DurationError,
    MeshError,
    ConfigError,
    OSError,
    TokenError,
    StateFileError,
    EntryError,
)
