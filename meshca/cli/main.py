"""The ``meshca`` command: parses the command line and hands it to a command module.

Exit codes: 0 success; 1 refused (bad value, file or state: one line on stderr);
2 usage (the command line's shape is wrong: unknown option, missing argument);
130 interrupted by Ctrl-C (``meshca serve`` stops gracefully instead, exit 0). Bad input
never produces a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any, NoReturn, cast

from meshca import __version__
from meshca.cli.commands import COMMANDS, is_refusal
from meshca.cli.commands.common import UsageError
from meshca.cli.options import EVERY_COMMAND, add_options, load_settings

PROG = "meshca"


def _terminal_columns() -> int:
    """``shutil.get_terminal_size().columns``, as argparse sizes its help (``COLUMNS``,
    else the terminal's, else 80), without importing ``shutil``: argparse would on every
    argument added, and shutil loads the compression modules with it."""
    try:
        columns = int(os.environ.get("COLUMNS", 0))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class _Formatter(argparse.HelpFormatter):
    """argparse's help layout, its width found by :func:`_terminal_columns`."""

    def __init__(
        self,
        prog: str,
        indent_increment: int = 2,
        max_help_position: int = 24,
        width: int | None = None,
    ) -> None:
        if width is None:
            width = _terminal_columns() - 2  # the margin argparse leaves
        super().__init__(prog, indent_increment, max_help_position, width)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are exceptions, so ``main`` prints one line."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)  # subcommands' parsers too
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        """Unknown arguments are reported before missing ones (``issue --bogus`` names
        ``--bogus``, not a missing ``--out``), by the (sub)command they were given to,
        so the hint names that command's help."""
        required = [action for action in self._actions if action.required]
        for action in required:
            action.required = False
        try:
            parsed, extras = super().parse_known_args(args, namespace)
        finally:
            for action in required:
                action.required = True
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        missing = [a for a in required if getattr(parsed, a.dest, None) is None]
        if missing:
            names = ", ".join(
                "/".join(a.option_strings) or a.metavar or a.dest  # type: ignore[misc]
                for a in missing
            )
            self.error(f"the following arguments are required: {names}")
        return parsed, extras


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser; given the command line ``argv``, only the commands it names get
    their arguments (the others are listed by name and summary, as ``--help`` shows them).
    Every command named anywhere in ``argv`` is filled in, so an option's value that
    happens to be a command's name never leaves the command given without its arguments."""
    named = None if argv is None else set(argv)
    parser = _Parser(
        prog=PROG,
        description="A certificate authority for service meshes: SPIFFE X.509-SVIDs for Envoy.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    add_options(parser, EVERY_COMMAND)
    subparsers = cast(
        "argparse._SubParsersAction[argparse.ArgumentParser]",
        parser.add_subparsers(title="commands", dest="command", metavar="COMMAND"),
    )
    subparsers.required = True
    for listed in COMMANDS:
        if named is None or listed.name in named:
            listed.load().register(subparsers, listed.summary)
        else:  # named and summarized only: building every command's arguments, and
            # importing every command's modules, costs more start-up than most commands
            subparsers.add_parser(listed.name, help=listed.summary)
    return parser


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = exc.filename if exc.filename is not None else ""
        return f"{where}: {exc.strerror}" if where else exc.strerror
    return str(exc) or type(exc).__name__


def _fail(message: str) -> None:
    line = " ".join(message.split())  # one line, whatever the message held
    print(f"{PROG}: error: {line}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    with warnings.catch_warnings():
        # Library warnings about odd input (a negative serial, an over-long name attribute)
        # are for developers; a user gets meshca's own verdict on the input, in one line.
        warnings.simplefilter("ignore")
        return _run(argv)


def _run(argv: list[str] | None) -> int:
    try:
        if argv is None:
            argv = sys.argv[1:]
        args = build_parser(argv).parse_args(argv)
        return int(args.handler(args, load_settings(args)))
    except UsageError as exc:
        _fail(str(exc))
        return 2
    except Exception as exc:
        if not is_refusal(exc):
            raise
        if isinstance(exc, BrokenPipeError):
            return _broken_pipe()
        _fail(_describe(exc))
        return 1
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else 0
    except KeyboardInterrupt:
        return 130


def _broken_pipe() -> int:
    """The reader went away (``meshca bundle | head -1``): stop quietly."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 1
