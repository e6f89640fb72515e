"""Atomic, permission-correct file writes: a reader never sees half a key or certificate.
And reading a YAML file whose errors never echo its content."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PRIVATE = 0o600
PUBLIC = 0o644


class YamlFileError(ValueError):
    """A YAML file that cannot be read or parsed; the message names the file and the
    problem (with its line), never the file's content."""


# Bounds on what a YAML file may cost: its size (a 21 MB mesh file took seconds to parse),
# and no aliases (a 371-byte "billion laughs" file expands to gigabytes when walked).
MESH_MAX_BYTES = 4 * 1024 * 1024
CONFIG_MAX_BYTES = 256 * 1024


def _read_bounded(path: Path, what: str, max_bytes: int) -> bytes:
    """The bytes of regular file ``path``, refused beyond ``max_bytes`` without reading
    more. ``/dev/zero``, a FIFO or a device is refused before any read; opening does not
    wait for a FIFO's writer (O_NONBLOCK has no other effect on a regular file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise YamlFileError(f"cannot read {what} {path}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise YamlFileError(f"{what} {path} is not a regular file")
    with os.fdopen(fd, "rb") as handle:
        try:
            data = handle.read(max_bytes + 1)
        except OSError as exc:
            raise YamlFileError(f"cannot read {what} {path}: {exc.strerror}") from None
    if len(data) > max_bytes:
        raise YamlFileError(f"{what} {path} is larger than the limit of {max_bytes} bytes")
    return data


def read_yaml(
    path: Path, what: str, *, max_bytes: int = MESH_MAX_BYTES, numbers_as_text: bool = False
) -> Any:
    """The document in ``path``, which the errors call ``what`` (e.g. "mesh file").

    Only the problem and line are reported for invalid YAML: the text around it might
    be a key or a token (a key file passed by mistake), and error messages reach logs.
    Files over ``max_bytes``, files that are not regular files and aliases are refused.
    ``numbers_as_text`` keeps numbers as written (``uds_mode: 0660`` stays "0660").
    PyYAML is loaded here, on first use: commands that read no YAML never pay for it.
    """
    from meshca.util.yaml_text import parse_yaml

    data = _read_bounded(Path(path), what, max_bytes)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise YamlFileError(f"{what} {path} is not UTF-8 text") from None
    try:
        return parse_yaml(text, numbers_as_text=numbers_as_text)
    except ValueError as exc:
        raise YamlFileError(f"{what} {path} is not valid YAML{exc}") from None


def atomic_write(path: Path, data: bytes, mode: int = PUBLIC) -> None:
    """Write ``data`` to a temp file in the same directory (created with ``mode``), fsync,
    rename over ``path``, then fsync the directory so the rename survives a crash.

    The temp file is created with ``mode`` from the start, so a private key is never
    readable by others, not even for an instant.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _staged(path, data, mode) as tmp:
        os.replace(tmp, path)
    fsync_directory(path.parent)


def atomic_create(path: Path, data: bytes, mode: int = PUBLIC) -> bool:
    """Like :func:`atomic_write`, but only where ``path`` does not exist yet: the staged
    file is hard-linked into place, so of writers racing for the same path the first one
    wins and the others leave it untouched. Whether this call created it."""
    path = Path(path)
    created = True
    with _staged(path, data, mode) as tmp:
        try:
            os.link(tmp, path)
        except FileExistsError:
            created = False
    fsync_directory(path.parent)
    return created


@contextlib.contextmanager
def _staged(path: Path, data: bytes, mode: int) -> Iterator[str]:
    """A temp file beside ``path`` holding ``data`` durably, created with ``mode``; it is
    removed on the way out (by then renamed or linked into place, or not wanted)."""
    fd, tmp = _create_temp(path)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _create_temp(path: Path) -> tuple[int, str]:
    """A new file ``.<name>.<random>.tmp`` beside ``path``, mode 0600, opened for writing,
    as ``tempfile.mkstemp`` makes it (O_EXCL, no symlink followed), without loading
    ``tempfile`` and the archive modules it pulls in: every file-writing command would
    pay for them at start-up."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        tmp = os.path.join(path.parent, f".{path.name}.{os.urandom(6).hex()}.tmp")
        try:
            return os.open(tmp, flags, PRIVATE), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary file name", str(path.parent))


def fsync_directory(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def make_private_dirs(path: Path) -> Path:
    """Create ``path`` and each missing parent with mode 0700 (whatever the umask), so
    no directory meshca creates on the way to a key is readable by others; existing
    directories are left as they are."""
    path = Path(path)
    missing: list[Path] = []
    current = path
    while not current.exists() and current != current.parent:
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            continue  # made meanwhile by someone else: checked by the caller as found
        os.chmod(directory, 0o700)
    return path


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` with mode 0700 if missing, and its missing parents too (they are
    meshca's: the data directory above ``vault/`` or ``rotation/``); tighten ``path``
    if it exists."""
    make_private_dirs(path)
    os.chmod(path, 0o700)
    return path


def loose_key_mode(path: Path) -> str | None:
    """Why the private key file ``path`` must not be used (group or others may read or
    write it), with the command that fixes it; None when its mode is private or the file
    does not exist."""
    try:
        mode = os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        return None
    if not mode & 0o077:
        return None
    return (
        f"{path} has mode {mode:04o}: private keys must be 0600 (readable by their owner "
        f"only); run: chmod 600 {path}"
    )


def check_output_dir(path: Path) -> None:
    """Refuse to write keys into ``path`` when another user could read or swap them: the
    directory must be this user's own, and neither it nor a directory above it may be
    world-writable without the sticky bit. Raises PermissionError naming the problem."""
    path = Path(path).absolute()
    info = os.stat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise FileExistsError(errno.EEXIST, "File exists (not a directory)", str(path))
    if info.st_uid != os.geteuid():
        raise PermissionError(
            errno.EPERM,
            f"is owned by uid {info.st_uid}, not by this user (uid {os.geteuid()}): "
            "write keys only into a directory of your own",
            str(path),
        )
    for directory in (path, *path.parents):
        mode = os.stat(directory).st_mode
        if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
            where = "is" if directory == path else f"is inside {directory}, which is"
            raise PermissionError(
                errno.EPERM,
                f"{where} world-writable without the sticky bit: another user could replace "
                "the files written there",
                str(path),
            )
