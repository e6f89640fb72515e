"""Logging: one event per line, as text or JSON, with the call's context, never key material.

``configure_logging(level, fmt)`` installs one handler on the root logger:

* ``text``: ``2025-01-02T03:04:05.678Z INFO meshca.sds: message key=value ...``;
* ``json``: one object per line with ``ts``, ``level``, ``logger``, ``msg`` and the
  structured fields of the event (those bound to the current call with :func:`bind`
  and any ``extra=`` given to the logging call); a traceback goes in ``exc``.

Newlines inside a message or a traceback are escaped, so an event is always exactly
one line and a log shipper never splits it.

Fields bound with :func:`bind` live in a context variable: a gRPC handler binds the
caller, peer and request id once, and every event logged while serving that call (in
its task, or in tasks it starts) carries them.

A filter on the handler never emits anything that looks like private key material (a
PEM ``PRIVATE KEY`` block or marker, or the base64 opening of a PKCS#8 key): the
material is redacted from the message, fields and traceback (to the end of the text
when its end cannot be told), and the event itself is kept, raised to WARNING, so a
request that merely carries such text (an impersonation attempt) is still seen.

What a caller sends can reach a log line; :func:`shorten` bounds each such value, and
:class:`Throttle` keeps one caller's repeated warnings to one per interval, with a count
of those held back.

This module imports nothing of meshca, so any layer may use it.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import re
import sys
import time
import traceback
from collections.abc import Hashable, Iterator, Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, TextIO

LOG_FORMATS = ("text", "json")
WITHHELD = "log event withheld: it contained what looks like private key material"
REDACTED = "[redacted: private key material]"
SHORTEN_LIMIT = 256  # characters of one caller-supplied value in a log line

_context: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "meshca_log_context", default=MappingProxyType({})
)

# PEM blocks of private keys (PKCS#8, SEC1, PKCS#1, OpenSSH, encrypted), and the base64
# opening of a DER PKCS#8 key: version 0 then the algorithm (EC with either parameter
# length, RSA). Matched anywhere in the event, so a key inside a repr, a protobuf dump
# or an escaped string is caught as well.
_KEY_MATERIAL = re.compile(
    r"PRIVATE KEY-----"
    r"|-----BEGIN[A-Z0-9 ]*PRIVATE KEY"
    r"|AgEAMBMGByqGSM49AgEG"  # PKCS#8, id-ecPublicKey (P-256: 19-byte AlgorithmIdentifier)
    r"|AgEAMBAGByqGSM49AgEG"  # PKCS#8, id-ecPublicKey (P-384, P-521)
    r"|ADANBgkqhkiG9w0BAQEFAAS"  # PKCS#8, rsaEncryption
)

_PKCS8_OPENING = r"(?:AgEAMBMGByqGSM49AgEG|AgEAMBAGByqGSM49AgEG|ADANBgkqhkiG9w0BAQEFAAS)"
_KEY_END = r"(?:-----END[A-Z0-9 ]*PRIVATE KEY-----|\Z)"
# What is redacted: a PEM block (to its END line, else to the end of the text), a base64
# run that opens like a PKCS#8 key (likewise), and any stray marker.
_REDACT = (
    re.compile(r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY.*?" + _KEY_END, re.S),
    re.compile(r"[A-Za-z0-9+/]*" + _PKCS8_OPENING + ".*?" + _KEY_END, re.S),
    re.compile(r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY|PRIVATE KEY-----"),
)

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


def parse_log_format(text: str) -> str:
    value = text.strip().lower()
    if value not in LOG_FORMATS:
        raise ValueError(f"{text!r} is not a log format ({' or '.join(LOG_FORMATS)})")
    return value


def bind(**fields: Any) -> None:
    """Add ``fields`` to every event logged from now on in the current task (and the tasks
    it starts). ``None`` values are left out."""
    _context.set({**_context.get(), **{k: v for k, v in fields.items() if v is not None}})


@contextlib.contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """Like :func:`bind`, for the duration of a ``with`` block."""
    token = _context.set({**_context.get(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


def looks_like_key_material(text: str) -> bool:
    return _KEY_MATERIAL.search(text) is not None


def redact_key_material(text: str) -> str:
    """``text`` with anything that looks like private key material replaced by REDACTED."""
    for pattern in _REDACT:
        text = pattern.sub(REDACTED, text)
    return text


def shorten(value: object, limit: int = SHORTEN_LIMIT) -> str:
    """``value`` as text of at most about ``limit`` characters, marked when cut."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...[{len(text) - limit} more characters]"


class Throttle:
    """At most one event per key per ``interval`` seconds (a bounded number of keys).

    ``allow(key)`` is None when the event should be held back; otherwise the number of
    events held back since the last one allowed (0 the first time).
    """

    def __init__(self, interval: float = 60.0, max_keys: int = 4096) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self._last: dict[Hashable, tuple[float, int]] = {}

    def allow(self, key: Hashable) -> int | None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last[0] < self.interval:
            self._last[key] = (last[0], last[1] + 1)
            return None
        if last is None and len(self._last) >= self.max_keys:
            self._last = {k: v for k, v in self._last.items() if now - v[0] < self.interval}
            if len(self._last) >= self.max_keys:
                return None  # too many distinct keys at once: hold back until some expire
        self._last[key] = (now, 0)
        return last[1] if last is not None else 0


def suppressed_note(held_back: int) -> str:
    """What a throttled log line appends: how many like it were held back."""
    return f" ({held_back} similar events held back)" if held_back else ""


def event_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields of an event: the bound context, then ``extra=`` values."""
    fields: dict[str, Any] = dict(getattr(record, "meshca_context", None) or {})
    for key, value in record.__dict__.items():
        if key not in _STANDARD and not key.startswith("_") and key != "meshca_context":
            fields[key] = value
    return fields


class ContextFilter(logging.Filter):
    """Copies the fields bound to the current call onto each record (at logging time,
    in the task that logs, before any handler formats it elsewhere)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "meshca_context"):
            record.meshca_context = _context.get()
        return True


class KeyMaterialFilter(logging.Filter):
    """Redacts what looks like a key from an event's text, fields and traceback; withholds
    the event only if something still looks like one."""

    def filter(self, record: logging.LogRecord) -> bool:
        if looks_like_key_material(_full_text(record)):
            _redact(record)
            if looks_like_key_material(_full_text(record)):
                _withhold(record)
        return True


def _redact(record: logging.LogRecord) -> None:
    try:
        message = record.getMessage()
    except Exception:
        message = f"{record.msg} {record.args!r}"
    exc = record.exc_text or ""
    if record.exc_info:
        exc = "".join(traceback.format_exception(*record.exc_info))
    for key in [k for k in record.__dict__ if k not in _STANDARD and k != "meshca_context"]:
        value = getattr(record, key)
        text = value if isinstance(value, str) else repr(value)
        if looks_like_key_material(text):
            setattr(record, key, redact_key_material(text))
    record.meshca_context = {
        k: redact_key_material(v if isinstance(v, str) else repr(v))
        if looks_like_key_material(v if isinstance(v, str) else repr(v))
        else v
        for k, v in (getattr(record, "meshca_context", None) or {}).items()
    }
    record.msg = redact_key_material(message)
    record.args = ()
    record.exc_info = None
    record.exc_text = redact_key_material(exc.rstrip("\n")) or None
    if record.stack_info:
        record.stack_info = redact_key_material(record.stack_info)
    if record.levelno < logging.WARNING:
        record.levelno, record.levelname = logging.WARNING, "WARNING"


def _full_text(record: logging.LogRecord) -> str:
    try:
        parts = [record.getMessage()]
    except Exception:  # a bad format string: check the pieces instead
        parts = [str(record.msg), repr(record.args)]
    if record.exc_info:
        parts.append("".join(traceback.format_exception(*record.exc_info)))
    if record.exc_text:
        parts.append(record.exc_text)
    if record.stack_info:
        parts.append(record.stack_info)
    try:
        parts.append(repr(event_fields(record)))
    except Exception:
        parts.append("PRIVATE KEY-----")  # fields that cannot even be shown: withhold them
    return "\n".join(parts)


def _withhold(record: logging.LogRecord) -> None:
    origin = f"{record.name} at {record.pathname}:{record.lineno}"
    for key in [k for k in record.__dict__ if k not in _STANDARD]:
        if key != "meshca_context":
            delattr(record, key)
    record.meshca_context = {
        k: v
        for k, v in (getattr(record, "meshca_context", None) or {}).items()
        if not looks_like_key_material(repr(v))
    }
    record.msg = f"{WITHHELD} (from {origin})"
    record.args = ()
    record.exc_info = None
    record.exc_text = None
    record.stack_info = None
    if record.levelno < logging.WARNING:
        record.levelno, record.levelname = logging.WARNING, "WARNING"


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _exception_text(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    text = ""
    if record.exc_info:
        text = formatter.formatException(record.exc_info)
    elif record.exc_text:
        text = record.exc_text
    if record.stack_info:
        text = f"{text}\n{record.stack_info}" if text else record.stack_info
    return text


class JsonFormatter(logging.Formatter):
    """One JSON object per event: ts, level, logger, msg, then the structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in event_fields(record).items():
            event.setdefault(key, value)
        exc = _exception_text(self, record)
        if exc:
            event["exc"] = exc
        text = json.dumps(event, default=str, ensure_ascii=False)
        # JSON leaves these unescaped; some readers end a line at them.
        return (
            text.replace("\x85", "\\u0085")
            .replace("\u2028", "\\u2028")
            .replace("\u2029", "\\u2029")
        )


_BARE = re.compile(r"^[^\s=\"\\]+$")


# A backslash, and every character a reader might take for the end of a line: control
# characters (C0, DEL, C1) and the Unicode line and paragraph separators.
_BREAKS = re.compile("[\\\\\x00-\x1f\x7f-\x9f\u2028\u2029]")
_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return _ESCAPES.get(char) or f"\\u{ord(char):04x}"


def _one_line(text: str) -> str:
    return _BREAKS.sub(_escape, text)


def _text_value(value: Any) -> str:
    """``value`` bare when it can be, else double-quoted with backslash escapes."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if _BARE.match(text):
        return text
    return '"' + _one_line(text).replace('"', '\\"') + '"'


class TextFormatter(logging.Formatter):
    """``ts LEVEL logger: message key=value ...`` on one line (newlines escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        message = _one_line(record.getMessage())
        line = f"{_timestamp(record)} {record.levelname} {record.name}: {message}"
        fields = event_fields(record)
        if fields:
            line += " " + " ".join(f"{_one_line(k)}={_text_value(v)}" for k, v in fields.items())
        exc = _exception_text(self, record)
        if exc:
            line += f" exc={_text_value(exc)}"
        return line


def formatter_for(fmt: str) -> logging.Formatter:
    return JsonFormatter() if parse_log_format(fmt) == "json" else TextFormatter()


def make_handler(fmt: str = "text", stream: TextIO | None = None) -> logging.Handler:
    """A stream handler with meshca's format and both filters (context, key material)."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter_for(fmt))
    handler.addFilter(ContextFilter())
    handler.addFilter(KeyMaterialFilter())
    handler.meshca = True  # type: ignore[attr-defined]  # marks the handler as ours
    return handler


def configure_logging(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send every logger's events to ``stream`` (stderr) in ``fmt``, from ``level`` up.

    Replaces handlers a previous call installed; chatty libraries stay at warning.
    gRPC's C core writes its own lines to stderr, outside Python logging; unless
    ``GRPC_VERBOSITY`` is set, it is limited to errors (it must be set before gRPC
    starts, so call this first), which keeps routine lines such as a client's failed TLS
    handshake from breaking the one-event-per-line format.
    """
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "meshca", False)]:
        root.removeHandler(old)
    root.addHandler(make_handler(fmt, stream))
    numeric = logging.getLevelName(level.upper())
    root.setLevel(numeric)
    for noisy in ("apscheduler", "urllib3", "hvac", "grpc", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, numeric))
