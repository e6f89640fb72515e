"""The few DER encodings a certificate template needs (X.690), and a reader for one TLV.

Kept minimal and strict: only definite lengths, only the types the leaf profile uses.
"""

from __future__ import annotations

from datetime import UTC, datetime

SEQUENCE = 0x30
OCTET_STRING = 0x04
BIT_STRING = 0x03
INTEGER = 0x02
NULL = b"\x05\x00"
BOOLEAN_TRUE = b"\x01\x01\xff"
UTC_TIME = 0x17
GENERALIZED_TIME = 0x18
CONTEXT_0 = 0xA0  # [0] EXPLICIT, constructed
CONTEXT_3 = 0xA3  # [3] EXPLICIT, constructed


def length(size: int) -> bytes:
    if size < 0x80:
        return bytes((size,))
    octets = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(octets),)) + octets


def tlv(tag: int, body: bytes) -> bytes:
    size = len(body)
    if size < 0x80:
        return bytes((tag, size)) + body
    if size < 0x100:
        return bytes((tag, 0x81, size)) + body
    if size < 0x10000:
        return bytes((tag, 0x82, size >> 8, size & 0xFF)) + body
    return bytes((tag,)) + length(size) + body


def sequence(*parts: bytes) -> bytes:
    return tlv(SEQUENCE, b"".join(parts))


def integer(value: int) -> bytes:
    """A non-negative INTEGER in its minimal two's-complement form."""
    if value < 0:
        raise ValueError("only non-negative integers are encoded here")
    return tlv(INTEGER, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def object_identifier(dotted: str) -> bytes:
    arcs = [int(arc) for arc in dotted.split(".")]
    body = bytearray()
    for arc in [40 * arcs[0] + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body.extend(reversed(chunk))
    return tlv(0x06, bytes(body))


def time(moment: datetime) -> bytes:
    """UTCTime through 2049, GeneralizedTime from 2050 (RFC 5280 4.1.2.5); whole seconds."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    if moment.year < 1950:
        raise ValueError("certificate times must be on or after 1950-01-01")
    m = moment
    clock = f"{m.month:02d}{m.day:02d}{m.hour:02d}{m.minute:02d}{m.second:02d}Z"
    if m.year < 2050:
        return tlv(UTC_TIME, f"{m.year % 100:02d}{clock}".encode())
    return tlv(GENERALIZED_TIME, f"{m.year:04d}{clock}".encode())


def read_tlv(data: bytes, offset: int = 0) -> tuple[int, int, int]:
    """(tag, start of the value, end of the value) of the element at ``offset``."""
    tag = data[offset]
    first = data[offset + 1]
    start = offset + 2
    if first < 0x80:
        size = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4:
            raise ValueError("unsupported DER length")
        size = int.from_bytes(data[start : start + count], "big")
        start += count
    end = start + size
    if end > len(data):
        raise ValueError("truncated DER element")
    return tag, start, end
