"""``meshca inspect``: what an X.509-SVID file holds, and whether meshca's CA vouches for it.

A file that is not a valid X.509-SVID is refused naming the broken rule. An SVID outside
its validity period is still described (that is when people inspect certificates),
then refused with exit 1.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from meshca.cli.commands.common import Command, arg
from meshca.cli.options import Settings

NAME = "inspect"


def run(args: argparse.Namespace, settings: Settings) -> int:
    from meshca.cli.commands.inspect_report import run as report  # the certificate modules

    return report(args, settings)


COMMAND = Command(
    NAME,
    run,
    description=(
        "Show an X.509-SVID's SPIFFE ID, issuer, validity, key type and fingerprint; "
        "when the data directory holds a CA, also whether the chain verifies against "
        "its trust bundle. Exits 1 naming the rule when the file is not a valid SVID."
    ),
    arguments=(
        arg("file", type=Path, metavar="FILE", help="PEM (leaf first) or DER"),
        arg("--json", action="store_true", help="print the result as JSON"),
    ),
)
