"""Who was connected during a root rotation, recorded beside the journal.

A restart forgets the proxies that were connected; until they reconnect, nothing says
they still trust only the old root or present a certificate under it. So while a root
rotation is in progress the server writes ``<data-dir>/rotation/proxies.json``: the
proxies connected (named by node id and identities, which survive a reconnection) with
how many streams each had open (Envoy opens one per secret, and reconnects each on its
own), and the timeout of the operator's last command. After a restart the waits hold
until each of them is back with as many streams and has acknowledged, bounded by that
timeout.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from meshca.util.files import PUBLIC, atomic_write

RECORD = "proxies.json"
MAX_NAME = 512  # a node id is the proxy's to choose: bound what one name costs the record


@dataclass(frozen=True)
class Recorded:
    proxies: Mapping[str, int]  # name -> streams it had open
    timeout: float | None  # seconds, of the operator's last rotate-root command


class ProxyRecord:
    """Reads and writes the record; writes only when its content changes."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / RECORD
        self._written: Recorded | None = None

    def load(self) -> Recorded | None:
        """The record, or None when there is none (or it is unreadable: then no one is
        known to be missing, as before records were kept)."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            proxies = {str(name)[:MAX_NAME]: int(n) for name, n in data["proxies"].items()}
            timeout = data.get("timeout")
            seconds = float(timeout) if isinstance(timeout, int | float) else None
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if seconds is not None and not seconds > 0:
            seconds = None
        return Recorded(proxies, seconds)

    def save(self, proxies: Mapping[str, int], timeout: float | None) -> None:
        record = Recorded({name[:MAX_NAME]: n for name, n in proxies.items()}, timeout)
        if record == self._written:
            return
        document = {"proxies": dict(sorted(record.proxies.items())), "timeout": timeout}
        text = json.dumps(document, indent=1)
        atomic_write(self.path, (text + "\n").encode(), PUBLIC)
        self._written = record

    def remove(self) -> None:
        self._written = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
