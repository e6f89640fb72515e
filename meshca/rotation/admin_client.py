"""The client side of the admin socket (``meshca ca`` talking to a running server): the
standard library and nothing of the rotation machinery, so the command starts fast.
The protocol is described in :mod:`meshca.rotation.admin`."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from meshca.rotation.errors import RotationError
from meshca.util.unix_socket import reachable


class AdminUnavailable(Exception):
    """No server answers on the admin socket."""


def admin_request(path: Path, request: dict[str, Any], *, timeout: float) -> dict[str, Any]:
    """Send one request to a running server and wait at most ``timeout`` seconds in all;
    AdminUnavailable when none listens.

    The request carries its ``deadline`` (wall-clock seconds): a server that gets to it
    later, when this client has given up, does not carry it out."""
    path = Path(path)
    if not path.exists():
        raise AdminUnavailable(f"no admin socket at {path}")
    give_up = time.monotonic() + timeout
    request = {**request, "deadline": time.time() + timeout}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.settimeout(timeout)
            try:
                with reachable(path) as address:
                    sock.connect(address)
            except (ConnectionRefusedError, FileNotFoundError):
                raise AdminUnavailable(f"nothing listens on {path}") from None
            sock.sendall((json.dumps(request) + "\n").encode())
            chunks = []
            while True:
                sock.settimeout(max(give_up - time.monotonic(), 0.001))
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                if chunk.endswith(b"\n"):
                    break
        except TimeoutError:
            raise RotationError(
                f"the server at {path} did not answer within {timeout:g}s: it may be stopped "
                "or overloaded (see its log); it will not carry out this request unless it "
                "had already started it"
            ) from None
    if not chunks:
        raise RotationError(
            f"the server at {path} closed the connection without answering (did it stop?); "
            "'meshca ca status' shows where the rotation is"
        )
    try:
        response = json.loads(b"".join(chunks))
    except ValueError:
        raise RotationError("the server sent an unreadable answer") from None
    if not isinstance(response, dict):
        raise RotationError("the server sent an unreadable answer")
    if not response.get("ok"):
        raise RotationError(str(response.get("error", "refused")))
    result = response.get("result", {})
    return result if isinstance(result, dict) else {}
