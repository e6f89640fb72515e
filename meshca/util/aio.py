"""Small asyncio pieces shared by the server's background tasks, the one loop they run
on (:class:`Periodic`), and the life of a long-running command until a signal stops it
(:func:`run_until_signalled`, for ``meshca serve`` and ``meshca agent``).

``wait_event`` and ``cancel_and_wait`` exist because of how Python 3.11's
``asyncio.wait_for`` and a bare ``suppress(CancelledError)`` treat cancellation:
``wait_for`` can swallow a cancel that lands as the awaited thing completes (a loop
around it then never ends), and suppressing CancelledError around ``await task`` also
hides a cancellation aimed at the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``event``; whether it is set. Never swallows a cancel."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True


def set_event(event: asyncio.Event, loop: asyncio.AbstractEventLoop | None) -> None:
    """Set ``event`` from ``loop``'s thread or any other. ``asyncio.Event`` is not
    thread-safe: set from a worker thread, its waiters' wake-ups are queued without waking
    the loop (which may then sleep on until its next timer), so there the set is handed to
    ``loop``. ``loop`` is None while nothing on a loop waits for the event yet."""
    try:
        current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        current = None
    if loop is None or current is loop or loop.is_closed():
        event.set()
    else:
        loop.call_soon_threadsafe(event.set)


async def call_inline_or_in_thread(
    inline: bool, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs
) -> T:
    """``function(*args, **kwargs)`` on the loop when ``inline`` (work shorter than a
    thread hand-off, such as an EC issuance signed in this process), else in a thread
    (RSA key generation, a remote signer), so the loop never blocks for long."""
    if inline:
        return function(*args, **kwargs)
    return await asyncio.to_thread(function, *args, **kwargs)


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


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


async def run_until_signalled(
    start: Callable[[], Awaitable[None]],
    stop: Callable[[], Awaitable[None]],
    on_ready: Callable[[], None] | None = None,
    *,
    log: logging.Logger | None = None,
) -> None:
    """``start``, call ``on_ready``, wait for SIGTERM or SIGINT (said on ``log``), then
    ``stop``: also when starting fails or is interrupted. The signal handlers are removed
    before ``stop``, so a second signal interrupts a stop that hangs."""
    loop = asyncio.get_running_loop()
    signalled = asyncio.Event()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, signalled.set)
    try:
        # A start that waits (for the API server's first lists, say) ends at a signal too.
        async def starts() -> None:
            await start()

        starting = loop.create_task(starts())
        stopping = loop.create_task(signalled.wait())
        try:
            await asyncio.wait((starting, stopping), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not starting.done():
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await starting
        if starting.cancelled():
            if log is not None:
                log.info("signal received while starting: shutting down")
            return
        starting.result()  # a start that failed raises here
        if on_ready is not None:
            on_ready()
        await signalled.wait()
        if log is not None:
            log.info("signal received: shutting down")
    finally:
        for signum in STOP_SIGNALS:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)
        await stop()


class Periodic:
    """A background step on the event loop: ``step`` runs every ``interval()`` seconds,
    or at once after :meth:`wake`, until :meth:`stop`. A step that raises is logged and
    the loop goes on: a watcher must outlive any surprise. (The mesh file's poll, the
    backend roots' poll and the health monitor each run on one.)"""

    def __init__(
        self,
        step: Callable[[], Awaitable[object]],
        interval: Callable[[], float],
        *,
        log: logging.Logger,
        what: str,
    ) -> None:
        self._step = step
        self._interval = interval
        self._log = log
        self._what = what
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None

    def start(self) -> None:
        """Start on the running loop (a second call does nothing)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def wake(self) -> None:
        """Run the step now rather than at the end of the interval (on the loop's thread;
        from another thread, through ``loop.call_soon_threadsafe``)."""
        self._wake.set()

    async def stop(self) -> None:
        """Cancel the loop and wait until it has ended."""
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self) -> None:
        while True:
            await wait_event(self._wake, self._interval())
            self._wake.clear()
            try:
                await self._step()
            except Exception:
                self._log.exception("%s failed", self._what)
