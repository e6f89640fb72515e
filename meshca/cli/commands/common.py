"""What every command shares: how a subcommand is declared (a :class:`Command`, data that
becomes its parser) and how it opens the data directory's CA (refusing a trust domain that
contradicts the CA's)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from meshca.cli.options import ConfigError, Settings, add_options

if TYPE_CHECKING:
    from meshca.backends.local import LocalCa

Handler = Callable[[argparse.Namespace, Settings], int]


class UsageError(Exception):
    """A command line whose shape is wrong (exit 2), found after argparse accepted it."""


class Arg(NamedTuple):
    """One argument of a command line: ``add_argument``'s names and keywords, as data."""

    names: tuple[str, ...]
    keywords: Mapping[str, Any]


def arg(*names: str, **keywords: Any) -> Arg:
    return Arg(names, keywords)


class OneOf(NamedTuple):
    """Arguments of which at most one may be given (a mutually exclusive group)."""

    arguments: tuple[Arg, ...]


class _ConfigurationOptions:
    """Where a parser's configuration options stand among its own arguments."""


CONFIGURATION = _ConfigurationOptions()
"""Marks where the configuration options come in an argument list (and so in the usage
line); where it is absent, they come first."""

Argument = Arg | OneOf | _ConfigurationOptions


class Action(NamedTuple):
    """A command's sub-action (``meshca ca rotate``): its help and its own arguments."""

    name: str
    summary: str
    description: str | None = None
    arguments: tuple[Argument, ...] = ()


class Command(NamedTuple):
    """A ``meshca`` subcommand, declared: its help, its arguments and what runs it. The
    configuration options it offers come from the option table (``cli/options.py``)."""

    name: str
    handler: Handler
    description: str
    arguments: tuple[Argument, ...] = ()
    actions: tuple[Action, ...] = ()

    def register(
        self, subparsers: argparse._SubParsersAction[argparse.ArgumentParser], summary: str
    ) -> None:
        """Add this command's parser (and one per action) to ``subparsers``, listed in
        ``meshca --help`` with ``summary`` (the registry's, ``meshca.cli.commands``)."""
        parser = subparsers.add_parser(self.name, help=summary, description=self.description)
        self._fill(parser, self.arguments)
        if not self.actions:
            return
        actions = parser.add_subparsers(
            title="actions", dest=f"{self.name}_action", metavar="ACTION"
        )
        actions.required = True
        for action in self.actions:
            sub = actions.add_parser(
                action.name, help=action.summary, description=action.description
            )
            self._fill(sub, action.arguments)

    def _fill(self, parser: argparse.ArgumentParser, arguments: tuple[Argument, ...]) -> None:
        parser.set_defaults(handler=self.handler, command=self.name)
        if CONFIGURATION not in arguments:
            arguments = (CONFIGURATION, *arguments)
        for argument in arguments:
            if isinstance(argument, Arg):
                parser.add_argument(*argument.names, **argument.keywords)
            elif isinstance(argument, OneOf):
                group = parser.add_mutually_exclusive_group()
                for each in argument.arguments:
                    group.add_argument(*each.names, **each.keywords)
            else:
                add_options(parser, self.name)


def open_ca(settings: Settings) -> LocalCa:
    """The data directory's CA. A trust domain set explicitly (flag, environment or config
    file) must be the CA's own: silently issuing for another domain would mint IDs no
    peer accepts."""
    from meshca.backends.local import load_local_ca  # only the commands that open the CA

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
