"""Listening Unix sockets that have their final permissions from the moment they exist.

A socket bound in place gets the process umask and is only then chmod'ed, so for an
instant it may be open to more users than intended. Here it is bound inside a fresh
0700 directory next to its final path, chmod'ed there, and renamed into place. The SDS
front door (``meshca.xds.uds``) and the rotation admin endpoint
(``meshca.rotation.admin``) both listen this way; this module imports nothing of meshca.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

MAX_SOCKET_PATH = 107  # sun_path is 108 bytes including the terminating NUL
DEFAULT_BACKLOG = 1024


class UnixSocketError(OSError):
    """A Unix socket cannot be set up as asked; the message says why."""


def check_path_length(path: Path, what: str) -> None:
    """UnixSocketError when ``path`` cannot be a Unix socket address as it is."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise UnixSocketError(
            f"{what} {path} is too long for a Unix socket "
            f"({len(os.fsencode(path))} bytes, at most {MAX_SOCKET_PATH}): use a shorter path"
        )


@contextlib.contextmanager
def reachable(path: Path) -> Iterator[str]:
    """An address to bind or connect ``path`` by, short enough for a Unix socket (through
    ``/proc/self/fd`` when the real path is too long)."""
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def clear_stale_socket(path: Path) -> None:
    """Remove a socket nobody listens on (left by a process that died); refuse to touch
    anything else."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise UnixSocketError(f"{path} exists and is not a socket; it was left unchanged")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with reachable(path) as address:
            probe.connect(address)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    finally:
        probe.close()
    raise UnixSocketError(f"{path} is in use: another server is listening on it")


def bind_listening_socket(
    path: Path, mode: int, *, backlog: int = DEFAULT_BACKLOG
) -> socket.socket:
    """A non-blocking socket listening on ``path`` with ``mode`` from the first instant:
    bound inside a fresh 0700 directory, chmod'ed, then renamed into place. A stale
    socket at ``path`` is replaced; a live one, or anything that is not a socket, is a
    UnixSocketError."""
    path = Path(path)
    if not path.parent.is_dir():
        raise UnixSocketError(f"cannot listen on {path}: directory {path.parent} does not exist")
    clear_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staging: Path | None = None
    try:
        staging = Path(tempfile.mkdtemp(prefix=".meshca-", dir=path.parent))  # created 0700
        staged = staging / "s"
        with reachable(staged) as address:
            sock.bind(address)
        os.chmod(staged, mode)
        os.rename(staged, path)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if isinstance(exc, UnixSocketError):
            raise
        raise UnixSocketError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    finally:
        if staging is not None:
            with contextlib.suppress(FileNotFoundError):
                (staging / "s").unlink()
            with contextlib.suppress(OSError):
                staging.rmdir()
    return sock
