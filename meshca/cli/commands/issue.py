"""``meshca issue``: mint one X.509-SVID to files (CI jobs, VMs, bootstrap certificates)."""

from __future__ import annotations

import argparse
import json
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from meshca.cli.commands.common import Command, UsageError, arg, write_out
from meshca.cli.commands.vault_backend import opened
from meshca.cli.options import Settings
from meshca.issuer.errors import CsrError
from meshca.spiffe import SpiffeId, TrustDomain
from meshca.util.files import (
    PRIVATE,
    PUBLIC,
    atomic_write,
    check_output_dir,
    make_private_dirs,
)
from meshca.util.formats import rfc3339, serial_hex

if TYPE_CHECKING:  # the signing modules load when the command runs, not with every command
    from meshca.issuer.svid import X509Svid

NAME = "issue"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
BUNDLE_FILE = "bundle.pem"


def _usage(message: str) -> UsageError:
    return UsageError(f"{message} (see 'meshca {NAME} --help')")


def _requested_id(args: argparse.Namespace, trust_domain: TrustDomain) -> SpiffeId:
    kubernetes = args.namespace is not None or args.service_account is not None
    if args.spiffe_id is not None and kubernetes:
        raise _usage("give a SPIFFE_ID or --namespace and --service-account, not both")
    if args.spiffe_id is not None:
        return SpiffeId.parse(args.spiffe_id)
    if args.namespace is None or args.service_account is None:
        raise _usage("give a SPIFFE_ID, or both --namespace and --service-account")
    return SpiffeId.from_kubernetes(args.namespace, args.service_account, trust_domain)


def _read_csr(path: Path) -> bytes:
    from meshca.issuer.csr import MAX_CSR_BYTES

    with path.open("rb") as handle:
        data = handle.read(MAX_CSR_BYTES + 1)
    if len(data) > MAX_CSR_BYTES:
        raise CsrError(f"CSR refused: {path} is larger than {MAX_CSR_BYTES} bytes")
    if data.lstrip().startswith(b"-----BEGIN"):
        if b"CERTIFICATE REQUEST-----" not in data:
            raise CsrError(f"CSR refused: {path} holds PEM data but no CERTIFICATE REQUEST")
    elif not data.startswith(b"\x30"):  # a DER SEQUENCE
        raise CsrError(f"CSR refused: {path} is neither a PEM nor a DER certificate request")
    return data


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.csr is not None and hasattr(args, "key_type"):
        raise _usage("--key-type does not apply with --csr: the CSR's own key is certified")
    if args.out.exists():  # refused before anything is issued
        check_output_dir(args.out)
    from meshca.issuer.authority import Issuer
    from meshca.issuer.policy import DEFAULT_LEAF_TTL, TtlPolicy

    with opened(settings) as backend:  # the local CA, or Vault
        authority = backend.authority
        spiffe_id = _requested_id(args, authority.trust_domain)
        maximum: timedelta = settings["max_leaf_ttl"]
        policy = TtlPolicy(default=min(DEFAULT_LEAF_TTL, maximum), maximum=maximum)
        issuer = Issuer(authority, policy, default_key_type=settings["key_type"])
        ttl: timedelta = settings["leaf_ttl"]
        if args.csr is not None:
            svid = issuer.sign_csr(spiffe_id, _read_csr(args.csr), ttl=ttl)
        else:
            svid = issuer.issue(spiffe_id, ttl=ttl)
    paths = _write(args.out, svid, issuer.bundle().pem())
    write_out(_json(svid, paths) if args.json else _text(svid, paths))
    return 0


def _write(out: Path, svid: X509Svid, bundle_pem: bytes) -> dict[str, Path | None]:
    """Key first, then the certificate that matches it, then the bundle; each atomically,
    into a directory of this user's own that no other user can write (missing ones are
    created 0700)."""
    make_private_dirs(out)
    check_output_dir(out)
    key_path = None
    if svid.private_key is not None:
        key_path = out / KEY_FILE
        atomic_write(key_path, svid.private_key_pem(), PRIVATE)
    else:
        # A key.pem from an earlier run would sit next to a certificate it does not match.
        (out / KEY_FILE).unlink(missing_ok=True)
    atomic_write(out / CERT_FILE, svid.chain_pem(), PUBLIC)
    atomic_write(out / BUNDLE_FILE, bundle_pem, PUBLIC)
    return {"cert": out / CERT_FILE, "key": key_path, "bundle": out / BUNDLE_FILE}


def _json(svid: X509Svid, paths: dict[str, Path | None]) -> str:
    document: dict[str, str | None] = {
        name: str(path.resolve()) if path is not None else None for name, path in paths.items()
    }
    document.update(
        spiffe_id=str(svid.spiffe_id),
        serial=serial_hex(svid.serial),
        not_after=rfc3339(svid.not_after),
        key_type=svid.key_type,
    )
    return json.dumps(document, indent=2) + "\n"


def _text(svid: X509Svid, paths: dict[str, Path | None]) -> str:
    lines = [
        f"Issued {svid.spiffe_id}",
        f"  serial:    {serial_hex(svid.serial)}",
        f"  not after: {rfc3339(svid.not_after)}",
        f"  key type:  {svid.key_type}",
    ]
    for name, path in paths.items():
        if path is not None:
            lines.append(f"  {name + ':':<10} {path}")
    return "\n".join(lines) + "\n"


COMMAND = Command(
    NAME,
    run,
    description=(
        f"Issue an X.509-SVID and write {CERT_FILE} (leaf, then intermediates), "
        f"{KEY_FILE} (PKCS#8, mode 0600; not with --csr) and {BUNDLE_FILE} (the trust "
        "bundle) into --out."
    ),
    arguments=(
        arg("spiffe_id", nargs="?", metavar="SPIFFE_ID", help="the workload's ID"),
        arg("--namespace", metavar="NS", help="Kubernetes namespace (with -a)"),
        arg("--service-account", "-a", metavar="SA", help="Kubernetes service account (with NS)"),
        arg("--out", required=True, type=Path, metavar="DIR", help="output directory"),
        arg("--csr", type=Path, metavar="FILE", help="certify this CSR's public key (PEM or DER)"),
        arg("--json", action="store_true", help="print the result as JSON"),
    ),
)
