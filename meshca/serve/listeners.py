"""How ``meshca serve``'s listeners hold up against callers who never authenticate.

gRPC core does the work, given the right settings (docs/serve.md, "Limits"); this module
says which, and keeps the process's own reports of failures to one line per interval:

* :func:`raise_open_file_limit`: the soft limit on open files up to the hard one;
* :func:`grpc_server_options`: no SO_REUSEPORT, a TLS handshake timeout, a cap on
  connections below the open-file limit, and a maximum connection age;
* :func:`quiet_loop_errors`: errors the event loop reports itself (an ``accept`` out of
  file descriptors, say) logged once per kind per interval, not once per attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
from typing import Any

from meshca.serve.config import ServeConfig
from meshca.util.logs import Throttle, suppressed_note

LOOP_ERROR_INTERVAL = 10.0  # seconds between reports of one kind of event-loop error
_loop_errors = Throttle(LOOP_ERROR_INTERVAL)


def raise_open_file_limit() -> int:
    """Raise the soft limit on open files to the hard one; returns the limit in force.
    Connections are capped below it (:func:`grpc_server_options`), so a flood of idle
    connections cannot take the descriptors the Unix socket and health need."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and soft != resource.RLIM_INFINITY:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def grpc_server_options(config: ServeConfig, open_files: int) -> list[tuple[str, int]]:
    """gRPC core settings for the listeners:

    * no SO_REUSEPORT: a second server on the same port fails to start instead of
      silently taking some of the connections;
    * a TLS handshake must complete within ``handshake_timeout`` seconds;
    * at most ``max_connections`` connections per listener (and a quarter of the open
      file limit), beyond which new ones are closed at once;
    * connections are closed after ``max_connection_age`` (plus a grace for open
      streams), so the client certificate that opened one is checked again.
    """
    connections = max(16, min(config.max_connections, open_files // 4))
    return [
        ("grpc.so_reuseport", 0),
        ("grpc.server_handshake_timeout_ms", int(config.handshake_timeout * 1000)),
        ("grpc.max_allowed_incoming_connections", connections),
        ("grpc.max_connection_age_ms", int(config.max_connection_age.total_seconds() * 1000)),
        (
            "grpc.max_connection_age_grace_ms",
            int(config.connection_age_grace.total_seconds() * 1000),
        ),
    ]


def quiet_loop_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Report errors of the event loop itself once per kind per interval."""

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        key = (context.get("message"), type(exc).__name__, getattr(exc, "errno", None))
        held_back = _loop_errors.allow(key)
        if held_back is not None:
            if held_back:
                message = f"{context.get('message')}{suppressed_note(held_back)}"
                context = {**context, "message": message}
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
