"""A small JSON document in the data directory, shared by ``meshca serve`` and the
``meshca token`` commands: read and replaced under an exclusive lock (``flock`` on a
sibling lock file), written atomically with mode 0600, so concurrent writers never lose
an update and a reader never sees half a file."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
