"""``meshca bundle``: the trust bundle, as PEM or as a SPIFFE bundle (JWKS)."""

from __future__ import annotations

import argparse
from pathlib import Path

from meshca.cli.commands.common import Command, arg, open_ca, write_out
from meshca.cli.commands.vault_backend import uses_stored_vault_roots, vault_trust_bundle
from meshca.cli.options import Settings
from meshca.util.files import PUBLIC, atomic_write

NAME = "bundle"
FORMATS = ("pem", "jwks")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from meshca.backends.local import ca_exists  # loaded by the command that uses them

    if uses_stored_vault_roots(settings, ca_exists(settings["data_dir"])):
        bundle, _ = vault_trust_bundle(settings)
    else:
        bundle = open_ca(settings).bundle
    if args.format == "jwks":
        from meshca.backends.jwt_key import published_jwt_keys
        from meshca.issuer.jwt_svid import jwt_authority_jwk

        keys = published_jwt_keys(settings["data_dir"])
        authorities = [jwt_authority_jwk(key) for key in keys]
        text = bundle.jwks_json(jwt_authorities=authorities)
    else:
        text = bundle.pem().decode()
    if args.out is not None:
        atomic_write(args.out, text.encode(), PUBLIC)
    else:
        write_out(text)
    return 0


COMMAND = Command(
    NAME,
    run,
    description=(
        "Print the trust bundle (the root certificates peers validate SVIDs against) "
        "as PEM, or as a SPIFFE bundle: a JWK Set with one x509-svid key per root and, "
        "once 'meshca serve' has created them, the jwt-svid keys that sign JWT-SVIDs "
        "(the signing key, a prepared successor, and retired keys whose tokens may "
        "still be valid)."
    ),
    arguments=(
        arg("--format", choices=FORMATS, default="pem", help="output format"),
        arg(
            "--out", type=Path, metavar="FILE", help="write to FILE (atomically) instead of stdout"
        ),
    ),
)
