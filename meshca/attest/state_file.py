"""A small JSON document in the data directory, shared by ``meshca serve`` and the
``meshca token`` and ``meshca entry`` commands: read and replaced under an exclusive lock
(``flock`` on a sibling lock file), written atomically with mode 0600, so concurrent
writers never lose an update and a reader never sees half a file. :class:`RecordFile` is
such a document of records by key: join tokens, registration entries, attested agents."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from meshca.util.files import PRIVATE, atomic_write, ensure_private_dir

AGENTS_DIR = "agents"
LOCK_FILE = ".lock"


class StateFileError(ValueError):
    """The state file cannot be read (damaged): the message names it."""


def agents_dir(data_dir: Path) -> Path:
    return Path(data_dir) / AGENTS_DIR


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold the directory's exclusive lock (across processes) for the block."""
    ensure_private_dir(directory)
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, PRIVATE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def read_document(path: Path) -> dict[str, Any]:
    """The document's mapping; empty when the file does not exist yet."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    try:
        document = json.loads(text)
    except ValueError:
        raise StateFileError(f"{path} is damaged: not valid JSON") from None
    if not isinstance(document, dict):
        raise StateFileError(f"{path} is damaged: not a JSON object")
    return document


def write_document(path: Path, document: dict[str, Any]) -> None:
    data = json.dumps(document, indent=1, sort_keys=True).encode() + b"\n"
    atomic_write(path, data, PRIVATE)


@contextlib.contextmanager
def parsing(what: str) -> Iterator[None]:
    """Turn a record that does not parse into StateFileError naming ``what``."""
    try:
        yield
    except (KeyError, TypeError, ValueError) as exc:
        raise StateFileError(f"{what} is damaged: {exc}") from None


class Record(Protocol):
    def to_json(self) -> dict[str, Any]: ...


R = TypeVar("R", bound=Record)


class RecordFile(Generic[R]):
    """One state file of records by key (``agents/<name>``): read and replaced whole under
    the directory's lock, and held between reads until the file changes on disk (another
    process may replace it; its mtime and inode say so)."""

    def __init__(
        self, data_dir: Path, name: str, parse: Callable[[str, dict[str, Any]], R]
    ) -> None:
        self.directory = agents_dir(data_dir)
        self.path = self.directory / name
        self._parse = parse
        self._cache: tuple[tuple[int, int], dict[str, R]] | None = None
        self._cache_lock = threading.Lock()

    def locked(self) -> contextlib.AbstractContextManager[None]:
        return locked(self.directory)

    def read(self) -> dict[str, R]:
        """Every record as the file holds it now."""
        return {key: self._parse(key, value) for key, value in read_document(self.path).items()}

    def write(self, records: Mapping[str, R]) -> None:
        """Replace the file (hold :meth:`locked` around the read that led to it)."""
        write_document(self.path, {key: record.to_json() for key, record in records.items()})

    def cached(self) -> dict[str, R]:
        """:meth:`read`, re-done only when the file has changed since the last one."""
        with self._cache_lock:
            stamp = self._stamp()
            if self._cache is None or self._cache[0] != stamp:
                self._cache = (stamp, self.read())
            return self._cache[1]

    def _stamp(self) -> tuple[int, int]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return (0, 0)
        return (st.st_mtime_ns, st.st_ino)
