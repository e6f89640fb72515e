"""``meshca bundle``: the trust bundle, as PEM or as a SPIFFE bundle (JWKS)."""

from __future__ import annotations

import argparse
from pathlib import Path

from meshca.cli.commands.common import add_command, open_ca, write_out
from meshca.cli.options import Settings
from meshca.util.files import PUBLIC, atomic_write

NAME = "bundle"
FORMATS = ("pem", "jwks")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(
        subparsers,
        NAME,
        run,
        summary="print the trust bundle",
        description=(
            "Print the trust bundle (the root certificates peers validate SVIDs against) "
            "as PEM, or as a SPIFFE bundle: a JWK Set with one x509-svid key per root."
        ),
    )
    parser.add_argument("--format", choices=FORMATS, default="pem", help="output format")
    parser.add_argument(
        "--out", type=Path, metavar="FILE", help="write to FILE (atomically) instead of stdout"
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    bundle = open_ca(settings).bundle
    text = bundle.jwks_json() if args.format == "jwks" else bundle.pem().decode()
    if args.out is not None:
        atomic_write(args.out, text.encode(), PUBLIC)
    else:
        write_out(text)
    return 0
