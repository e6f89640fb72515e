"""How meshca writes serial numbers, times and names: one spelling each, in command
output, JSON, logs and error messages alike, so that they can be compared and searched
(and match what openssl and Envoy's admin API show)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # times and serials are written by commands that load no certificate
    from cryptography import x509

SERIAL_BYTES = 16  # meshca's serials are 128 bits: always 32 hex digits


def serial_hex(serial: int) -> str:
    """Lower-case hex of the serial's bytes, leading zeros kept, as ``openssl x509
    -serial`` and Envoy show it: 32 digits for a 128-bit serial, more for a longer one
    (Vault's are 20 bytes). A negative serial (RFC 5280 forbids one, but a damaged or
    foreign certificate can carry it) is shown as ``-`` and its magnitude, as openssl does."""
    sign, magnitude = ("-", -serial) if serial < 0 else ("", serial)
    length = max(SERIAL_BYTES, (magnitude.bit_length() + 7) // 8)
    return sign + magnitude.to_bytes(length, "big").hex()


def rfc3339(moment: datetime) -> str:
    """RFC 3339 in UTC to the second, ``2026-12-03T05:16:50Z`` (a naive time is UTC)."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def name_text(name: x509.Name) -> str:
    """RFC 4514 text with serialNumber spelled out (meshca's CA subjects carry one),
    never as its dotted OID ``2.5.4.5``."""
    from cryptography.x509.oid import NameOID

    return name.rfc4514_string({NameOID.SERIAL_NUMBER: "serialNumber"})
