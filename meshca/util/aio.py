"""Small asyncio pieces shared by the server's background tasks.

Both exist because of how Python 3.11's ``asyncio.wait_for`` and a bare
``suppress(CancelledError)`` treat cancellation: ``wait_for`` can swallow a cancel
that lands as the awaited thing completes (a loop around it then never ends), and
suppressing CancelledError around ``await task`` also hides a cancellation aimed at
the caller.
"""

from __future__ import annotations

import asyncio
from typing import Any


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``event``; whether it is set. Never swallows a cancel."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` and wait until it has ended; the caller's own cancellation propagates."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
