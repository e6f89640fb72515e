"""What ``meshca inspect`` does: read an X.509-SVID, check it against the profile and the
data directory's trust bundle, and report. Loaded only when that command runs."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509

from meshca.backends.local import CaError, ca_exists, load_local_ca
from meshca.cli.commands.common import write_out
from meshca.cli.commands.vault_backend import uses_stored_vault_roots, vault_trust_bundle
from meshca.cli.options import Settings
from meshca.issuer.errors import ChainError, IssuerError, KeyTypeError, SvidError
from meshca.issuer.keys import key_type_of
from meshca.issuer.profile import utcnow
from meshca.issuer.svid import (
    MALFORMED_CERTIFICATE,
    fingerprint,
    load_certificates_pem,
    spiffe_id_of,
)
from meshca.issuer.verify import verify_chain
from meshca.spiffe import SpiffeId
from meshca.util.durations import format_duration
from meshca.util.formats import name_text, rfc3339, serial_hex

MAX_FILE_BYTES = 1024 * 1024


@dataclass(frozen=True)
class ChainVerdict:
    checked: bool
    verified: bool
    detail: str


def _load(path: Path) -> list[x509.Certificate]:
    with path.open("rb") as handle:
        data = handle.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise SvidError("format", f"{path} is larger than {MAX_FILE_BYTES} bytes")
    if b"-----BEGIN CERTIFICATE-----" in data:
        certs = load_certificates_pem(data, str(path))
    elif b"PRIVATE KEY-----" in data:
        raise SvidError("format", f"{path} holds a private key, not a certificate")
    elif b"-----BEGIN" in data:
        raise SvidError("format", f"{path} holds PEM data but no certificate")
    else:
        try:
            certs = [x509.load_der_x509_certificate(data)]
        except (ValueError, x509.InvalidVersion):
            raise SvidError("format", f"{path} is neither a PEM nor a DER certificate") from None
    for cert in certs:
        _parse_fully(cert, path)
    return certs


def _parse_fully(cert: x509.Certificate, path: Path) -> None:
    """Touch every field once: cryptography parses lazily, and a malformed field must be a
    one-line refusal here rather than an exception halfway through the report."""
    try:
        _ = (cert.version, cert.issuer, cert.subject, cert.serial_number)
        _ = (cert.not_valid_before_utc, cert.not_valid_after_utc, cert.signature_hash_algorithm)
        cert.public_key()
        list(cert.extensions)
    except MALFORMED_CERTIFICATE as exc:
        raise SvidError("format", f"{path} holds a malformed certificate: {exc}") from None


def _check_leaf(leaf: x509.Certificate) -> tuple[SpiffeId, str]:
    """The SPIFFE ID and key type of a leaf following the profile; SvidError otherwise."""
    try:
        basic = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (x509.ExtensionNotFound, ValueError):
        basic = None
    if basic is not None and basic.ca:
        raise SvidError("basic-constraints", "this is a CA certificate, not a workload SVID")
    spiffe_id = spiffe_id_of(leaf)
    try:
        key_type = key_type_of(leaf.public_key()).value
    except KeyTypeError as exc:
        raise SvidError("key-type", str(exc)) from None
    return spiffe_id, key_type


def _check_chain(
    leaf: x509.Certificate,
    intermediates: list[x509.Certificate],
    spiffe_id: SpiffeId,
    settings: Settings,
    now: datetime,
) -> ChainVerdict:
    data_dir: Path = settings["data_dir"]
    local = ca_exists(data_dir)
    if uses_stored_vault_roots(settings, local):
        try:
            bundle, where = vault_trust_bundle(settings)
        except IssuerError as exc:
            return ChainVerdict(False, False, f"not checked: {exc}")
    elif not local:
        return ChainVerdict(False, False, f"not checked: no CA in {data_dir}")
    else:
        try:
            ca = load_local_ca(data_dir)
        except CaError as exc:
            return ChainVerdict(False, False, f"not checked: {exc}")
        bundle, where = ca.bundle, f"the trust bundle in {ca.directory}"
    if spiffe_id.trust_domain != bundle.trust_domain:
        return ChainVerdict(
            True,
            False,
            f"not trusted: the CA's trust domain is {bundle.trust_domain}, not the SVID's",
        )
    try:
        verify_chain(leaf, intermediates, bundle, now=now)
    except ChainError as exc:
        return ChainVerdict(True, False, f"does not verify against {where}: {exc}")
    return ChainVerdict(True, True, f"verifies against {where}")


def _time_left(leaf: x509.Certificate, now: datetime) -> str:
    if now < leaf.not_valid_before_utc:
        return f"not valid yet (starts in {_span(leaf.not_valid_before_utc - now)})"
    if now > leaf.not_valid_after_utc:
        return f"expired {_span(now - leaf.not_valid_after_utc)} ago"
    return _span(leaf.not_valid_after_utc - now)


def _span(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds >= 3600:
        seconds -= seconds % 60  # minutes are precise enough for long spans
    return format_duration(timedelta(seconds=max(seconds, 1)))


_TEXT_ROWS = (
    ("SPIFFE ID", "spiffe_id"),
    ("issuer", "issuer"),
    ("serial", "serial"),
    ("not before", "not_before"),
    ("not after", "not_after"),
    ("time left", "time_left"),
    ("key type", "key_type"),
    ("SHA-256", "sha256"),
)


def run(args: argparse.Namespace, settings: Settings) -> int:
    certs = _load(args.file)
    leaf = certs[0]
    spiffe_id, key_type = _check_leaf(leaf)
    now = utcnow()
    chain = _check_chain(leaf, certs[1:], spiffe_id, settings, now)
    report: dict[str, Any] = {
        "spiffe_id": str(spiffe_id),
        "issuer": name_text(leaf.issuer),
        "serial": serial_hex(leaf.serial_number),
        "not_before": rfc3339(leaf.not_valid_before_utc),
        "not_after": rfc3339(leaf.not_valid_after_utc),
        "time_left": _time_left(leaf, now),
        "key_type": key_type,
        "sha256": fingerprint(leaf),
        "chain": {"checked": chain.checked, "verified": chain.verified, "detail": chain.detail},
    }
    if args.json:
        write_out(json.dumps(report, indent=2) + "\n")
    else:
        rows = [(label, report[key]) for label, key in _TEXT_ROWS]
        rows.append(("chain", chain.detail))
        lines = [f"{label + ':':<12} {value}" for label, value in rows]
        write_out("\n".join(lines) + "\n")
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        raise SvidError("validity", f"{args.file} is {report['time_left']}")
    return 0
