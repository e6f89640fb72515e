"""docs/configuration.md cannot drift from the options meshca really has.

The table between the markers is ``meshca.cli.options.reference_markdown()`` verbatim, and
that table is checked against the real command line (every configuration flag each
command's parser offers, and no other), the real environment and config-file lookup
(each documented variable and key is where the value comes from), and the documented
defaults (each parses). The hand-written table of command arguments names only flags
that exist. After changing an option, regenerate the generated table with::

    .venv/bin/python -m tests.test_config_reference --write
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshca.cli.main import build_parser
from meshca.cli.options import (
    EVERY_COMMAND,
    OPTIONS,
    ConfigError,
    load_settings,
    reference_markdown,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
BEGIN = "<!-- BEGIN GENERATED: meshca.cli.options.reference_markdown() -->"
END = "<!-- END GENERATED -->"
CONFIG_GROUP = "configuration (flag > MESHCA_* environment > file)"


def documented_table(text: str) -> str:
    assert text.count(BEGIN) == 1 and text.count(END) == 1, f"{DOC} lost its markers"
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def rows(table: str) -> list[dict[str, str]]:
    lines = [line for line in table.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    found = []
    for line in lines[2:]:
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        assert len(cells) == len(header), line
        found.append(dict(zip(header, cells, strict=True)))
    return found


def unquote(cell: str) -> str:
    return cell.strip("`")


def parsers(
    parser: argparse.ArgumentParser, command: str = EVERY_COMMAND
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every parser of the real command line, with the top-level command it belongs to."""
    yield command, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from parsers(sub, name if command == EVERY_COMMAND else command)


def offered_flags() -> dict[str, set[str]]:
    """command -> the configuration flags its parsers offer (``*``: the global ones)."""
    offered: dict[str, set[str]] = {}
    for command, parser in parsers(build_parser()):
        for group in parser._action_groups:
            if group.title == CONFIG_GROUP:
                for action in group._group_actions:
                    offered.setdefault(command, set()).update(action.option_strings)
    return offered


def test_the_document_holds_the_generated_reference() -> None:
    assert documented_table(DOC.read_text()) == reference_markdown(), (
        "docs/configuration.md is out of date: run "
        "'.venv/bin/python -m tests.test_config_reference --write'"
    )


def test_every_documented_flag_is_offered_where_documented_and_nowhere_else() -> None:
    """Global options (flag on "all") are offered before the command and by every
    command; the others by the commands named in their row."""
    table = rows(documented_table(DOC.read_text()))
    offered = offered_flags()
    aliases = {alias for option in OPTIONS for alias in option.aliases}
    assert set(offered) >= {EVERY_COMMAND, "init", "issue", "serve", "bootstrap"}
    for command, flags in sorted(offered.items()):
        documented = {
            unquote(row["flag"])
            for row in table
            if row["flag on"] == "all" or command in row["flag on"].split(", ")
        }
        assert flags - aliases == documented, command
    every_documented = {c for row in table for c in row["flag on"].split(", ")} - {"all"}
    assert every_documented <= set(offered), "a row names a command that does not exist"


def test_every_documented_variable_and_key_is_where_the_value_comes_from(tmp_path: Path) -> None:
    table = rows(documented_table(DOC.read_text()))
    assert [row["option"] for row in table] == [option.name for option in OPTIONS]
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    for row in table:
        name, env = row["option"], unquote(row["environment"])
        # the config file's own variable must name a readable file; any text does elsewhere
        text = str(empty) if name == "config" else "from-the-environment"
        settings = load_settings(argparse.Namespace(), environ={env: text})
        assert settings.source(name) == f"environment {env}", name
        key = row["config key"]
        if key == "-":
            continue
        config = tmp_path / f"{name}.yaml"
        config.write_text(f"{unquote(key)}: from-the-file\n")
        settings = load_settings(argparse.Namespace(), environ={"MESHCA_CONFIG": str(config)})
        assert settings.source(name) == f"config file {config}: {unquote(key)}", name


def test_every_documented_default_is_the_value_used_and_parses() -> None:
    settings = load_settings(argparse.Namespace(), environ={})
    for row in rows(documented_table(DOC.read_text())):
        name, default = row["option"], row["default"]
        if default == "-":
            assert settings.source(name) == "unset", name
            continue
        assert settings.source(name) == "default", name
        try:
            settings[name]
        except ConfigError as exc:
            pytest.fail(f"{name}: the documented default {default} does not parse: {exc}")


def test_the_command_arguments_named_in_the_document_exist() -> None:
    """The hand-written table of command arguments names only flags the commands have."""
    text = DOC.read_text().split("## Command arguments that are not settings", 1)[1]
    table = [line for line in text.split("\n## ", 1)[0].splitlines() if line.startswith("| `")]
    assert table
    every: dict[str, set[str]] = {}
    for command, parser in parsers(build_parser()):
        for action in parser._actions:
            every.setdefault(command, set()).update(action.option_strings)
    for line in table:
        command = re.match(r"\| `meshca (\w+)`", line)
        assert command, line
        named = set(re.findall(r"`(--[a-z-]+)", line))
        assert named, line
        assert named <= every[command[1]], (line, named - every[command[1]])


def write() -> None:
    text = DOC.read_text()
    before, rest = text.split(BEGIN, 1)
    _, after = rest.split(END, 1)
    DOC.write_text(f"{before}{BEGIN}\n{reference_markdown()}{END}{after}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m tests.test_config_reference --write")
    write()
