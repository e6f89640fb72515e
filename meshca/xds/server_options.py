"""gRPC server options for serving xDS: how many calls may wait for the application.

gRPC Core queues a new call until the application asks for it, and ends the surplus
RESOURCE_EXHAUSTED ("Too many pending requests for this server") past 3,000 queued
calls, or past 1,000 once the oldest has waited a little. A grpc.aio server takes calls
one at a time on its event loop, so when thousands of proxies (re)connect at once (a
restart of meshca, a rotation pushing to every stream) the queue outgrows those
defaults and proxies are refused, with a plain grpc.aio server as much as with meshca
(``bench/sds_fanout.py`` measures both). The limits are raised, still bounded: a queued
call holds only its headers.
"""

from __future__ import annotations

MAX_PENDING_CALLS = 50_000

XDS_SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
    ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
]
