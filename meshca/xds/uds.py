"""The Unix-socket front door: who is calling, by SO_PEERCRED, for the gRPC server.

gRPC Python does not expose a Unix-socket caller's credentials. So meshca accepts on
the public socket itself, reads SO_PEERCRED (pid, uid, gid) from each accepted
connection, and relays the bytes to the gRPC server listening on a private socket in a
0700 directory only meshca's user can enter. Each relay connection comes from a client
socket bound to a unique path in that directory; gRPC reports that path as the call's
peer (``context.peer() == "unix:<path>"``), and :class:`PeerCredTable` maps it back to
the caller. Nobody else can reach the private socket (directory mode), and a socket
that is not bound reports ``unix:``, which maps to nobody, so the peer string cannot be
forged by a local process.

Before relaying, the door decides from the credentials alone: a uid the server does not
admit (``admits``: those mapped to an identity) is closed at once, before any gRPC is
spoken, and so is a connection past ``max_per_uid`` for its uid, so one member of the
socket's group cannot take every relay slot. Refusals are logged once per kind per
interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import struct
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from meshca.util.files import ensure_private_dir
from meshca.util.logger import get_logger
from meshca.util.logs import Throttle, suppressed_note
from meshca.util.unix_socket import UnixSocketError, bind_listening_socket, check_path_length
from meshca.xds.auth import PeerCred

log = get_logger("meshca.uds")

DEFAULT_SOCKET_MODE = 0o660
DEFAULT_MAX_CONNECTIONS = 4096
DEFAULT_MAX_PER_UID = 64  # one uid cannot take every relay slot
REFUSAL_LOG_INTERVAL = 10.0  # seconds between warnings about refused connections of a kind
BACKEND_SOCKET = "grpc.sock"
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


UdsError = UnixSocketError  # the Unix socket cannot be set up as asked; the message says why


def read_peer_cred(sock: socket.socket) -> PeerCred:
    """The credentials the kernel recorded for the other end of a connected Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCred(uid=uid, gid=gid, pid=pid)


def check_socket_mode(mode: int) -> int:
    """Accept 0660 or tighter: never anything for "others", never execute bits."""
    if mode & ~DEFAULT_SOCKET_MODE:
        raise UdsError(f"socket mode {mode:04o} is too open: use 0660 or tighter (e.g. 0600)")
    if not mode & 0o200:
        raise UdsError(f"socket mode {mode:04o} would stop meshca's own user from connecting")
    return mode


class PeerCredTable:
    """The relay connections in flight: gRPC peer string -> the caller's credentials.

    This is the ``PeerCredLookup`` handed to the caller authenticator.
    """

    def __init__(self) -> None:
        self._creds: dict[str, PeerCred] = {}

    def lookup(self, peer: str) -> PeerCred | None:
        return self._creds.get(peer)

    def add(self, peer: str, cred: PeerCred) -> None:
        self._creds[peer] = cred

    def remove(self, peer: str) -> None:
        self._creds.pop(peer, None)

    def __len__(self) -> int:
        return len(self._creds)


class _Side(asyncio.Protocol):
    """One end of a relay: bytes received here are written to the other end, with the
    other end's reading paused while this end's write buffer is full."""

    def __init__(self, relay: _Relay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.other: _Side | None = None
        self.pending: list[bytes] = []  # received before the other end existed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        other = self.other
        if other is not None and other.transport is not None:
            other.transport.write(data)
        else:
            self.pending.append(data)

    def eof_received(self) -> bool:
        return False  # gRPC does not half-close: an EOF ends the relay

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.relay.close()

    def pause_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()


class _Relay:
    """A caller's connection on the public socket and meshca's own to the gRPC server."""

    def __init__(self, door: UdsFrontDoor) -> None:
        self.door = door
        self.public = _Side(self)
        self.backend = _Side(self)
        self.peer = ""
        self.uid: int | None = None  # counted against this uid's cap while open
        self.closed = False
        self.task: asyncio.Task[None] | None = None

    def accepted(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()
        sock = transport.get_extra_info("socket")
        try:
            cred = read_peer_cred(sock)
        except OSError as exc:
            self.door._refused(("no-cred",), f"no peer credentials ({exc})")
            transport.close()
            return
        problem = self.door._admit(cred)
        if problem is not None:
            self.door._refused((problem[0], cred.uid), problem[1])
            transport.close()
            return
        self.uid = cred.uid
        self.door._per_uid[cred.uid] += 1
        self.task = asyncio.get_running_loop().create_task(self._connect(cred))

    async def _connect(self, cred: PeerCred) -> None:
        door = self.door
        loop = asyncio.get_running_loop()
        path = door.private_dir / f"c{next(door._counter)}"
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as exc:  # out of file descriptors: refuse this one, keep serving
            door._refused(("relay",), f"cannot open a relay socket ({exc})")
            self.close()
            return
        try:
            sock.setblocking(False)
            sock.bind(str(path))
            self.peer = "unix:" + str(path)
            door.peer_creds.add(self.peer, cred)
            await loop.sock_connect(sock, str(door.backend_path))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # the connection keeps its address; the name is never reused
            await loop.create_unix_connection(lambda: self.backend, sock=sock)
        except OSError as exc:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            door._refused(("relay",), f"cannot relay it to the gRPC server ({exc})")
            self.close()
            return
        if self.closed:  # the caller left while we were connecting
            self.close()
            return
        self.public.other, self.backend.other = self.backend, self.public
        assert self.backend.transport is not None and self.public.transport is not None
        for data in self.public.pending:
            self.backend.transport.write(data)
        self.public.pending.clear()
        self.public.transport.resume_reading()
        log.debug(
            "Unix-socket caller uid=%d gid=%d pid=%d relayed as %s",
            cred.uid,
            cred.gid,
            cred.pid,
            self.peer,
        )

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.door._relays.discard(self)
        if self.uid is not None:
            self.door._released(self.uid)
            self.uid = None
        if self.peer:
            self.door.peer_creds.remove(self.peer)
        for side in (self.public, self.backend):
            if side.transport is not None:
                side.transport.close()


class _PublicSide(_Side):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.relay.accepted(transport)


class UdsFrontDoor:
    """Accepts on ``public_path`` (mode 0660 or tighter) and relays to a private gRPC socket.

    Use: ``door = UdsFrontDoor(path)``; have the gRPC server listen on
    ``door.prepare()``; start the server; ``await door.start()``; give
    ``door.peer_creds`` to the authenticator; ``await door.close()`` on shutdown.
    """

    def __init__(
        self,
        public_path: Path,
        *,
        mode: int = DEFAULT_SOCKET_MODE,
        private_dir: Path | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_per_uid: int = DEFAULT_MAX_PER_UID,
        admits: Callable[[int], bool] | None = None,
    ) -> None:
        self.public_path = Path(public_path).absolute()
        self.mode = check_socket_mode(mode)
        self.max_connections = max_connections
        self.max_per_uid = max_per_uid
        # Which uids may connect at all (those mapped to an identity); None: every uid.
        self.admits = admits
        self._per_uid: Counter[int] = Counter()
        self._warnings = Throttle(REFUSAL_LOG_INTERVAL)
        check_path_length(self.public_path, "socket path")
        self._owns_private_dir = private_dir is None
        self._private_dir = None if private_dir is None else Path(private_dir).absolute()
        self.peer_creds = PeerCredTable()
        self._counter = itertools.count()
        self._relays: set[_Relay] = set()
        self._server: asyncio.AbstractServer | None = None
        self._public_inode: int | None = None  # the socket file this door created

    @property
    def private_dir(self) -> Path:
        """The 0700 directory of the gRPC server's socket and the relays' client sockets."""
        if self._private_dir is None:
            self._private_dir = Path(tempfile.mkdtemp(prefix="meshca-"))  # created 0700
        return self._private_dir

    @property
    def backend_path(self) -> Path:
        return self.private_dir / BACKEND_SOCKET

    def prepare(self) -> str:
        """Create the private directory; returns the address the gRPC server must listen
        on (``server.add_insecure_port``) before :meth:`start`."""
        ensure_private_dir(self.private_dir)
        if os.stat(self.private_dir).st_uid != os.getuid():
            raise UdsError(f"{self.private_dir} belongs to another user: it must be meshca's own")
        check_path_length(self.private_dir / "c0000000000", "private socket directory")
        return "unix:" + str(self.backend_path)

    @property
    def connections(self) -> int:
        return len(self._relays)

    async def start(self) -> None:
        self.prepare()
        sock = bind_listening_socket(self.public_path, self.mode)
        self._public_inode = os.lstat(self.public_path).st_ino
        self._server = await asyncio.get_running_loop().create_unix_server(
            self._accept, sock=sock, backlog=1024
        )
        log.info("listening on unix:%s (mode %04o)", self.public_path, self.mode)

    def _admit(self, cred: PeerCred) -> tuple[str, str] | None:
        """(kind, why) a connection from ``cred`` is closed at once; None to relay it."""
        if self.admits is not None and not self.admits(cred.uid):
            return "unmapped", f"uid {cred.uid} (pid {cred.pid}) is not mapped to any identity"
        if self._per_uid[cred.uid] >= self.max_per_uid:
            return (
                "per-uid",
                f"uid {cred.uid} already holds {self._per_uid[cred.uid]} connections, "
                f"the most one uid may (uds_max_connections_per_uid)",
            )
        return None

    def _released(self, uid: int) -> None:
        self._per_uid[uid] -= 1
        if self._per_uid[uid] <= 0:
            del self._per_uid[uid]

    def _refused(self, key: tuple[object, ...], why: str) -> None:
        """Log a refused connection, once per kind (and uid) per interval."""
        held_back = self._warnings.allow(key)
        if held_back is not None:
            log.warning("closed a Unix-socket connection: %s%s", why, suppressed_note(held_back))

    def _accept(self) -> asyncio.Protocol:
        relay = _Relay(self)
        relay.public = _PublicSide(relay)
        if len(self._relays) >= self.max_connections:
            self._refused(("full",), f"{len(self._relays)} already open")
            relay.closed = True
            relay.public = _Refused(relay)
            return relay.public
        self._relays.add(relay)
        return relay.public

    async def close(self) -> None:
        """Stop accepting, end every relay, remove the public socket and private files."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for relay in list(self._relays):
            relay.close()
        if self._public_inode is not None:
            with contextlib.suppress(FileNotFoundError):
                if os.lstat(self.public_path).st_ino == self._public_inode:
                    os.unlink(self.public_path)  # only our own, never a successor's
            self._public_inode = None
        if self._owns_private_dir and self._private_dir is not None:
            for child in self.private_dir.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    child.unlink()
            with contextlib.suppress(OSError):
                self.private_dir.rmdir()


class _Refused(_Side):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()
