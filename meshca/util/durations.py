"""Human durations (``30s``, ``15m``, ``24h``, ``90d``) for flags and config files."""

from __future__ import annotations

import re
from datetime import timedelta

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_PART = re.compile(r"(\d{1,12})([smhd])")
# Longer than anything meshca schedules (a root CA's 10 years, ten times over): past
# this, date arithmetic would overflow instead of giving an answer.
MAX_DURATION = timedelta(days=36500)


class DurationError(ValueError):
    pass


def parse_duration(text: str) -> timedelta:
    """Parse one or more ``<n><unit>`` parts (``1h30m``); units s, m, h, d. Must be > 0."""
    value = text.strip() if isinstance(text, str) else ""
    pos, seconds = 0, 0
    for match in _PART.finditer(value):
        if match.start() != pos:
            break
        seconds += int(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not value or pos != len(value):
        raise DurationError(
            f"invalid duration {text!r}: use a number and a unit s, m, h or d (30s, 15m, 24h, 90d)"
        )
    if seconds <= 0:
        raise DurationError(f"invalid duration {text!r}: must be greater than zero")
    if seconds > MAX_DURATION.total_seconds():
        raise DurationError(f"invalid duration {text!r}: longer than the limit of 36500d")
    return timedelta(seconds=seconds)


def format_duration(delta: timedelta) -> str:
    """The shortest exact form: 86400 s -> ``1d``, 5400 s -> ``1h30m``."""
    seconds = int(delta.total_seconds())
    if seconds <= 0:
        return f"{seconds}s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)
