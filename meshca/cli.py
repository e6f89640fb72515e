"""The ``meshca`` command (placeholder until the command modules land)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("meshca: no commands yet", file=sys.stderr)
    return 2
