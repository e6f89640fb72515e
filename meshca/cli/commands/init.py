"""``meshca init``: create the data directory's CA, or adopt an existing one (cacerts)."""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from meshca.cli.commands.common import Command, UsageError, arg, write_out
from meshca.cli.commands.vault_backend import init_vault, uses_vault
from meshca.cli.options import Settings
from meshca.issuer.errors import IssuerError
from meshca.util.formats import rfc3339

if TYPE_CHECKING:  # the CA modules load with the command that runs (start-up of the others)
    from cryptography import x509

    from meshca.backends.local import LocalCa

NAME = "init"


def _path_length(text: str) -> int:
    if not text.isdigit() or int(text) > 9:
        raise argparse.ArgumentTypeError(f"{text!r} is not a path length (0 to 9)")
    return int(text)


def _signing_ttl(ca_ttl: timedelta, leaf_ttl: timedelta) -> timedelta:
    """A signing CA lives a year, or long enough for the leaf rotation schedule, and never
    longer than ``ca_ttl`` (its parent clips it further)."""
    from meshca.issuer.policy import CA_TO_LEAF_TTL_RATIO, DEFAULT_INTERMEDIATE_TTL

    return min(ca_ttl, max(DEFAULT_INTERMEDIATE_TTL, CA_TO_LEAF_TTL_RATIO * leaf_ttl))


def run(args: argparse.Namespace, settings: Settings) -> int:
    if uses_vault(settings):
        return init_vault(settings)  # the CA is Vault's: check it, create nothing
    from meshca.backends.local import init_local_ca
    from meshca.issuer.policy import check_ca_covers_leaves

    data_dir: Path = settings["data_dir"]
    if args.own_intermediate and args.from_cacerts is None:
        raise UsageError(
            "--own-intermediate mints a signing CA under an adopted one: "
            "give --from-cacerts DIR too (see 'meshca init --help')"
        )
    if args.from_cacerts is not None:
        if args.path_length:
            raise UsageError(
                "--path-length applies to a CA meshca creates, not to one adopted with "
                "--from-cacerts (see 'meshca init --help')"
            )
        ca = _adopt(args.from_cacerts, data_dir, settings, args.force, args.own_intermediate)
        write_out(_describe(ca, "Adopted"))
        if args.own_intermediate:
            _warn_if_short(ca, settings["leaf_ttl"])
        return 0
    ca_ttl: timedelta = settings["ca_ttl"]
    leaf_ttl: timedelta = settings["leaf_ttl"]
    check_ca_covers_leaves(ca_ttl, leaf_ttl)  # init's configured TTL, before any CA exists
    signing_ttl = _signing_ttl(ca_ttl, leaf_ttl)
    ca = init_local_ca(
        data_dir,
        settings["trust_domain"],
        key_type=settings["key_type"],
        root_ttl=ca_ttl,
        intermediate_ttl=signing_ttl,
        force=args.force,
        path_length=args.path_length,
    )
    write_out(_describe(ca, "Created"))
    return 0


def _adopt(
    source: Path, data_dir: Path, settings: Settings, force: bool, own_intermediate: bool
) -> LocalCa:
    from meshca.backends.local import CaError, import_cacerts
    from meshca.issuer.svid import MALFORMED_CERTIFICATE

    trust_domain = settings["trust_domain"]
    own_ttl = _signing_ttl(settings["ca_ttl"], settings["leaf_ttl"]) if own_intermediate else None
    try:
        return import_cacerts(
            data_dir,
            source,
            trust_domain,
            force=force,
            own_intermediate_ttl=own_ttl,
            own_key_type=settings["key_type"],
        )
    except MALFORMED_CERTIFICATE as exc:
        # cryptography parses certificate fields lazily: a damaged field surfaces here.
        raise CaError(f"cannot adopt the CA in {source}: a malformed certificate: {exc}") from None


def _cert_lines(role: str, cert: x509.Certificate) -> list[str]:
    from meshca.issuer.svid import fingerprint
    from meshca.util.formats import name_text

    return [
        f"{role}:",
        f"  subject:   {name_text(cert.subject)}",
        f"  SHA-256:   {fingerprint(cert)}",
        f"  not after: {rfc3339(cert.not_valid_after_utc)}",
    ]


def _describe(ca: LocalCa, verb: str) -> str:
    from meshca.backends.local import CA_KEY, ROOT_KEY
    from meshca.issuer.keys import key_type_of
    from meshca.util.formats import name_text

    lines = [f"{verb} a CA for trust domain {ca.trust_domain} in {ca.directory}"]
    for root in ca.bundle:
        lines += _cert_lines("root CA", root)
    lines += _cert_lines("signing CA", ca.signer.certificate)
    if ca.origin.startswith("own intermediate"):
        parent = ca.signer.intermediates[0] if ca.signer.intermediates else ca.bundle.roots[0]
        lines.append("  this data directory's own: a fresh key, not shared with any replica")
        lines.append(f"  issued by: {name_text(parent.subject)} (its key was not kept)")
    lines.append(f"key type:    {key_type_of(ca.signer.key).value}")
    root_key = ca.directory / ROOT_KEY
    if root_key.exists():
        lines.append(f"root key:    {root_key} (only needed to replace the signing CA)")
    elif ca.signer.is_self_signed:
        lines.append(f"root key:    {ca.directory / CA_KEY} (the signing CA is the root itself)")
    else:
        lines.append("root key:    not held by meshca")
    return "\n".join(lines) + "\n"


def _warn_if_short(ca: LocalCa, leaf_ttl: timedelta) -> None:
    """The own signing CA ends with the adopted CA: say so when that is too soon to serve."""
    from meshca.issuer.policy import check_signing_ca

    cert = ca.signer.certificate
    try:
        check_signing_ca(cert, leaf_ttl)  # the rule serve applies, with the same measure
    except IssuerError as exc:
        print(
            f"meshca: warning: this signing CA ends {rfc3339(cert.not_valid_after_utc)}, "
            f"with the adopted CA: {exc}; 'meshca serve' will refuse it",
            file=sys.stderr,
        )


COMMAND = Command(
    NAME,
    run,
    description=(
        "Create a self-signed root and an intermediate signing CA under it in "
        "<data-dir>/ca, or adopt an existing CA with --from-cacerts. An existing CA "
        "is never replaced unless --force is given (the old one is kept in a backup). "
        "For replicas that share a root but no signing key, give each one "
        "--from-cacerts DIR --own-intermediate."
    ),
    arguments=(
        arg(
            "--from-cacerts",
            metavar="DIR",
            type=Path,
            help="adopt a CA from Istio's cacerts layout or a kubernetes.io/tls secret directory",
        ),
        arg(
            "--own-intermediate",
            action="store_true",
            help=(
                "with --from-cacerts: mint this data directory's own signing CA (fresh key, "
                "unique subject, path length 0) under the adopted CA, which must be allowed to "
                "sign CAs; the adopted CA's key is not kept"
            ),
        ),
        arg(
            "--path-length",
            metavar="N",
            type=_path_length,
            default=0,
            help=(
                "path length of a new signing CA: 0 (default) signs only SVIDs; 1 also lets it "
                "sign one level of CAs, as replicas initialised with --own-intermediate need"
            ),
        ),
        arg(
            "--force",
            action="store_true",
            help="replace an existing CA (moved to <data-dir>/backup/ first)",
        ),
    ),
)
