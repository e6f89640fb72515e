"""What every command shares: how a subcommand is declared and how it opens the data
directory's CA (refusing a trust domain that contradicts the CA's)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from meshca.backends.local import LocalCa, load_local_ca
from meshca.cli.options import ConfigError, Settings, add_options

Handler = Callable[[argparse.Namespace, Settings], int]


class UsageError(Exception):
    """A command line whose shape is wrong (exit 2), found after argparse accepted it."""


def add_command(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    handler: Handler,
    *,
    summary: str,
    description: str,
) -> argparse.ArgumentParser:
    """Add subcommand ``name`` with the configuration options it offers."""
    parser = subparsers.add_parser(name, help=summary, description=description)
    parser.set_defaults(handler=handler, command=name)
    add_options(parser, name)
    return parser


def open_ca(settings: Settings) -> LocalCa:
    """The data directory's CA. A trust domain set explicitly (flag, environment or config
    file) must be the CA's own: silently issuing for another domain would mint IDs no
    peer accepts."""
    ca = load_local_ca(settings["data_dir"])
    if settings.is_explicit("trust_domain") and settings["trust_domain"] != ca.trust_domain:
        raise ConfigError(
            f"the CA in {ca.directory} is for trust domain {ca.trust_domain}, but "
            f"{settings.source('trust_domain')} names {settings['trust_domain']}"
        )
    return ca


def write_out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
