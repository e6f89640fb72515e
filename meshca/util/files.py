"""Atomic, permission-correct file writes: a reader never sees half a key or certificate.
And reading a YAML file whose errors never echo its content."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

PRIVATE = 0o600
PUBLIC = 0o644


class YamlFileError(ValueError):
    """A YAML file that cannot be read or parsed; the message names the file and the
    problem (with its line), never the file's content."""


def read_yaml(path: Path, what: str) -> Any:
    """The document in ``path``, which the errors call ``what`` (e.g. "mesh file").

    Only the problem and line are reported for invalid YAML: the text around it might
    be a key or a token (a key file passed by mistake), and error messages reach logs.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise YamlFileError(f"cannot read {what} {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise YamlFileError(f"{what} {path} is not UTF-8 text") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None)
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        detail = f" ({problem}{where})" if problem else ""
        raise YamlFileError(f"{what} {path} is not valid YAML{detail}") from None


def atomic_write(path: Path, data: bytes, mode: int = PUBLIC) -> None:
    """Write ``data`` to a temp file in the same directory (created with ``mode``), fsync,
    rename over ``path``, then fsync the directory so the rename survives a crash.

    The temp file is created with ``mode`` from the start, so a private key is never
    readable by others, not even for an instant.
    """
    path = Path(path)
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_directory(directory)


def fsync_directory(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) with mode 0700 if missing; tighten it if it exists."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path
