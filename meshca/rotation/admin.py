"""The operator's interface to rotation, and the local admin endpoint that carries it.

A running ``meshca serve`` listens on ``<data-dir>/admin.sock`` (a Unix socket, mode
0600, in the 0700 data directory: only the account that owns the CA can use it). One
request per connection: a JSON object on one line, answered by one JSON line::

    {"op": "status"}
    {"op": "rotate"}
    {"op": "rotate-root", "step": 2, "timeout": 60}     # "step": null runs every step
    {"op": "rotate-root", "rollback": true, "timeout": 60}
    {"op": "rotate-root", "step": 2, "timeout": 60, "force": true}   # go on without
                                                        # proxies that did not ACK in time
    {"op": "jwt-key", "step": "prepare"}                # or "activate", "retire"
    {"op": "jwt-key", "step": "activate", "timeout": 60}   # waits for every agent's ACK
    {"op": "jwt-key", "step": "activate", "force": true}   # activates without them
    {"op": "jwt-key", "step": "retire", "force": true}  # before its tokens have expired

    {"ok": true, "result": {...}}   or   {"ok": false, "error": "one line"}

Any request may carry ``"deadline"`` (seconds since the epoch): when the server gets to
it later, or the client has closed the connection by then, it is not carried out.

When no server runs, ``meshca ca`` performs the same operations directly on the data
directory (:class:`CaOperations` over a manager without proxies).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from meshca.issuer import IssuerError
from meshca.rotation.acks import bundle_holds
from meshca.rotation.admin_client import AdminUnavailable, admin_request
from meshca.rotation.journal import JwtKeyRecord, RotationError, SlotKind
from meshca.rotation.jwt_keys import JwtKeyUnacked
from meshca.rotation.manager import RotationManager
from meshca.rotation.root import DEFAULT_ACK_TIMEOUT, RootRotation
from meshca.rotation.status import rotation_status
from meshca.util.durations import MAX_DURATION
from meshca.util.logger import get_logger
from meshca.util.unix_socket import bind_listening_socket

__all__ = ["AdminServer", "AdminUnavailable", "CaOperations", "admin_request"]

log = get_logger("meshca.rotation")

SOCKET_MODE = 0o600
LISTED = 100  # proxies named in a status; the counts say how many there are in all
# How long a reply after a change waits for the streams it woke to push first (a proxy
# that does not read can hold its own push up, never the reply for longer than this).
PUSH_WAIT = 10.0
MAX_REQUEST = 64 * 1024
JWT_ACK_POLL = 0.25  # seconds between looks while a JWT key activation waits for agents


class CaOperations:
    """``meshca ca`` status, rotate, rotate-root and jwt-key, over one manager."""

    def __init__(
        self, manager: RotationManager, rotation: RootRotation, *, polled: bool = True
    ) -> None:
        self.manager = manager
        self.rotation = rotation
        # Whether agents poll meanwhile (a running server): waiting for their ACKs can
        # end; working on the data directory directly, nobody will, so no wait is made.
        self.polled = polled

    def status(self) -> dict[str, Any]:
        manager = self.manager
        data = rotation_status(manager, self.rotation.rotator.problem)
        data["root_rotation"] = self.rotation.status()
        prepared = manager.journal.prepared
        waiting: list[str] = []
        if data["root_rotation"] is not None:
            waiting = data["root_rotation"]["waiting_on"]
        elif prepared is not None and prepared.kind is SlotKind.ROOT:
            waiting = manager.unacked(bundle_holds(manager.ca(prepared.id).root))
        # Bounded whatever the number of proxies: the first names, and how many in all.
        data["waiting_on"], data["waiting_count"] = waiting[:LISTED], len(waiting)
        if data["root_rotation"] is not None:
            data["root_rotation"]["waiting_on"] = waiting[:LISTED]
        connected = manager.acks.connected()
        data["connected"], data["connected_count"] = sorted(connected)[:LISTED], len(connected)
        return data

    async def _reply(self, result: dict[str, Any]) -> dict[str, Any]:
        """The answer to a change, with the status after it. Built once the streams the
        change woke have sent their pushes (reading every stream's state takes the event
        loop a while at tens of thousands): the operator's reply never delays them."""
        await self.manager.acks.pushed(PUSH_WAIT)
        return {**result, "status": self.status()}

    async def rotate(self) -> dict[str, Any]:
        record = await self.manager.rotate_now()
        self.rotation.rotator.replan()
        return await self._reply({"activated": record.id})

    async def jwt_key(
        self, step: str, *, force: bool = False, timeout: timedelta | None = None
    ) -> dict[str, Any]:
        """One step of the JWT signing key's rotation (the schedule does them too).
        ``activate`` waits up to ``timeout`` for every attested agent to have fetched the
        prepared key, then is refused naming them; ``force`` activates without them."""
        jwt = self.manager.jwt
        if step == "activate":
            record = await self._activate_jwt_key(force, timeout or DEFAULT_ACK_TIMEOUT)
            self.rotation.rotator.replan()
            return await self._reply({"jwt_activated": record.id, "kid": record.kid})
        async with self.manager.lock:
            if step == "prepare":
                record = jwt.prepare()
                result: dict[str, Any] = {"jwt_prepared": record.id, "kid": record.kid}
            elif step == "retire":
                result = {"jwt_retired": jwt.retire(force=force)}
            else:
                raise RotationError(f"unknown JWT key step {step!r} (prepare, activate, retire)")
        self.rotation.rotator.replan()
        return await self._reply(result)

    async def _activate_jwt_key(self, force: bool, timeout: timedelta) -> JwtKeyRecord:
        """Activate once no agent is waited for (agents ACK at their next poll), never
        holding the manager's lock while waiting; refused at ``timeout``."""
        jwt = self.manager.jwt
        deadline = time.monotonic() + timeout.total_seconds()
        while True:
            timed_out = time.monotonic() >= deadline
            async with self.manager.lock:
                try:
                    return jwt.activate(force=force)
                except JwtKeyUnacked as exc:
                    if not self.polled:
                        raise
                    if timed_out:
                        seconds = timeout.total_seconds()
                        raise JwtKeyUnacked(exc.record, exc.waiting, seconds) from None
            await asyncio.sleep(JWT_ACK_POLL)

    async def rotate_root(
        self, *, step: int | None, rollback: bool, timeout: timedelta, force: bool = False
    ) -> dict[str, Any]:
        if rollback:
            reports = [await self.rotation.rollback(timeout=timeout, force=force)]
        elif step is not None:
            reports = [await self.rotation.step(step, timeout=timeout, force=force)]
        else:
            reports = await self.rotation.run(timeout=timeout, force=force)
        return await self._reply({"steps": [r.to_json() for r in reports]})

    async def perform(self, request: dict[str, Any]) -> dict[str, Any]:
        """Carry out one request (the admin protocol's JSON object); RotationError when
        refused."""
        op = request.get("op")
        if op == "status":
            return self.status()
        if op == "rotate":
            return await self.rotate()
        if op == "rotate-root":
            step = request.get("step")
            if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
                raise RotationError("step must be a whole number from 1 to 5")
            return await self.rotate_root(
                step=step,
                rollback=request.get("rollback") is True,
                timeout=timedelta(seconds=_timeout(request)),
                force=request.get("force") is True,
            )
        if op == "jwt-key":
            return await self.jwt_key(
                str(request.get("step")),
                force=request.get("force") is True,
                timeout=timedelta(seconds=_timeout(request)),
            )
        raise RotationError(f"unknown operation {op!r} (status, rotate, rotate-root, jwt-key)")

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """One admin request; refusals become ``{"ok": false, "error": ...}``."""
        try:
            return {"ok": True, "result": await self.perform(request)}
        except (IssuerError, OSError) as exc:
            return {"ok": False, "error": str(exc)}


def _timeout(request: dict[str, Any]) -> float:
    """The request's wait for ACKs, in seconds (the default when it names none)."""
    seconds = request.get("timeout", DEFAULT_ACK_TIMEOUT.total_seconds())
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not 0 < seconds <= MAX_DURATION.total_seconds()  # NaN fails this too
    ):
        raise RotationError(
            "timeout must be a positive number of seconds, "
            f"at most {MAX_DURATION.total_seconds():.0f}"
        )
    return float(seconds)


class AdminServer:
    """Serves :class:`CaOperations` on a Unix socket for the server's lifetime."""

    def __init__(self, operations: CaOperations, path: Path) -> None:
        self.operations = operations
        self.path = Path(path)
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None  # the socket file this server created

    async def start(self) -> None:
        # 0600 from the moment the socket exists; a stale one (a server that died) is
        # replaced, a live one (another server given the same path) is an error.
        sock = bind_listening_socket(self.path, SOCKET_MODE)
        try:
            self._inode = os.lstat(self.path).st_ino
            self._server = await asyncio.start_unix_server(
                self._serve, sock=sock, limit=MAX_REQUEST
            )
        except BaseException:
            sock.close()
            self._remove_socket()
            raise
        log.info("admin endpoint on %s", self.path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        self._remove_socket()

    def _remove_socket(self) -> None:
        """Unlink the socket this server created, never one another process put there."""
        inode, self._inode = self._inode, None
        if inode is not None:
            with contextlib.suppress(FileNotFoundError):
                if os.lstat(self.path).st_ino == inode:
                    os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                line = await reader.readline()
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("not a JSON object")
            except (ValueError, asyncio.LimitOverrunError) as exc:
                response: dict[str, Any] = {"ok": False, "error": f"bad request: {exc}"}
            else:
                gone = _client_gone(reader, writer, request)
                if gone is not None:
                    # The operator's command gave up (killed, timed out): acting now would
                    # surprise whoever runs the next one.
                    log.warning("admin request %r not carried out: %s", request.get("op"), gone)
                    response = {"ok": False, "error": f"not carried out: {gone}"}
                else:
                    response = await self.operations.handle(request)
        except Exception as exc:  # a bug must not take the server down
            log.exception("admin request failed")
            response = {"ok": False, "error": f"internal error ({type(exc).__name__}); see the log"}
        with contextlib.suppress(ConnectionError):
            writer.write((json.dumps(response) + "\n").encode())
            await writer.drain()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def _client_gone(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: dict[str, Any]
) -> str | None:
    """Why the request's client no longer waits for it (None while it does): its
    deadline passed, or it closed the connection (killed or gave up)."""
    deadline = request.get("deadline")
    if (
        isinstance(deadline, int | float)
        and not isinstance(deadline, bool)
        and math.isfinite(deadline)
        and time.time() > deadline
    ):
        return "its client stopped waiting before the server got to it"
    if reader.at_eof():
        return "its client closed the connection before the server got to it"
    transport_socket = writer.get_extra_info("socket")
    if transport_socket is None:
        return None
    try:
        with socket.socket(fileno=os.dup(transport_socket.fileno())) as peek:
            data = peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None  # open, nothing more sent: the client waits
    except OSError:
        return "its client's connection failed before the server got to it"
    return "its client closed the connection before the server got to it" if not data else None
