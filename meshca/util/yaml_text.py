"""Parsing YAML text safely: no aliases, errors that never quote the text.

Imported only where YAML is read (:func:`meshca.util.files.read_yaml`), so commands that
read none never load PyYAML.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.composer import Composer, ComposerError
from yaml.constructor import SafeConstructor
from yaml.resolver import Resolver

_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"


try:  # libyaml's parser when installed (several times faster on a large file)
    from yaml._yaml import CParser as _Parser
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml.parser import Parser as _Parser  # type: ignore[assignment]


class _SafeLoader(Composer, _Parser, SafeConstructor, Resolver):
    """PyYAML's safe loader, composing in Python on libyaml's events: a worker thread
    parsing a large file then lets the event loop run between events (libyaml's own
    composer holds the GIL for the whole document). Aliases are refused where first
    seen: walking nested aliases expands them (a few hundred bytes become gigabytes)."""

    def __init__(self, stream: str) -> None:
        _Parser.__init__(self, stream)
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event: Any = self.peek_event()
            raise ComposerError(None, None, "aliases (*name) are not allowed", event.start_mark)
        return super().compose_node(parent, index)


class _NumbersAsTextLoader(_SafeLoader):
    """Numbers stay the text that was written: ``uds_mode: 0660`` is "0660", not the
    integer 432 that YAML 1.1 reads (every option parses its value from text anyway)."""

    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
        for first, resolvers in Resolver.yaml_implicit_resolvers.items()
    }


_QUOTED = re.compile(r"'[^']{3,}'|\"[^\"]{3,}\"")


def _without_content(problem: str | None) -> str | None:
    """A parser's problem without the file text it quotes (a tag, an anchor name): only
    a quoted single character (``'\\t'``) is kept, it says what to fix."""
    return _QUOTED.sub("(...)", problem) if problem else problem


def parse_yaml(text: str, *, numbers_as_text: bool = False) -> Any:
    """The single document in ``text``; ValueError with " (problem, line N)" (or "")
    when it is not valid YAML."""
    loader = _NumbersAsTextLoader if numbers_as_text else _SafeLoader
    try:
        parser = loader(text)
        try:
            return parser.get_single_data()
        finally:
            parser.dispose()
    except yaml.YAMLError as exc:
        problem = _without_content(getattr(exc, "problem", None))
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f" ({problem}{where})" if problem else "") from None
