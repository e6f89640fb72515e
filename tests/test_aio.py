"""The asyncio helpers background tasks stop with, and the health monitor's stop."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest
from grpc_health.v1.health import aio as health_aio

from meshca.backends.opened import OpenedBackend
from meshca.issuer import ActiveSigner, Issuer
from meshca.serve.health import HealthMonitor
from meshca.store import SecretStore
from meshca.util.aio import (
    Periodic,
    call_inline_or_in_thread,
    cancel_and_wait,
    set_event,
    wait_event,
)
from tests.ca_factory import make_ca


async def test_wait_event_says_whether_the_event_was_set() -> None:
    event = asyncio.Event()
    assert await wait_event(event, 0.01) is False
    asyncio.get_running_loop().call_later(0.01, event.set)
    assert await wait_event(event, 5) is True


async def test_cancel_and_wait_ends_the_task() -> None:
    task = asyncio.create_task(asyncio.sleep(60))
    await cancel_and_wait(task)
    assert task.cancelled()
    await cancel_and_wait(None)  # nothing to stop


async def test_cancel_and_wait_lets_the_callers_own_cancellation_through() -> None:
    release = asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            await release.wait()  # cleanup that takes a while

    worker = asyncio.create_task(slow_to_stop())
    await asyncio.sleep(0)
    stopper = asyncio.create_task(cancel_and_wait(worker))
    await asyncio.sleep(0)
    stopper.cancel()  # whoever was stopping the worker is cancelled itself
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await stopper
    assert worker.cancelled()


async def test_stop_ends_the_monitor_when_woken_at_the_same_moment() -> None:
    """A store event arriving just as the server stops used to leave the monitor looping
    (wait_for swallowed the cancel), so shutdown hung."""
    ca = make_ca()
    authority = ActiveSigner(ca.signer, ca.bundle)
    store = SecretStore(Issuer(authority))
    backend = OpenedBackend.in_process(authority)
    monitor = HealthMonitor(health_aio.HealthServicer(), backend, store)
    await monitor.start()
    await asyncio.sleep(0)  # the monitor waits for its next wake-up
    monitor._periodic.wake()  # an event arrives just as the server stops
    running = monitor._periodic._task
    stopping = asyncio.create_task(monitor.stop())
    done, _ = await asyncio.wait({stopping}, timeout=5)
    if not done:
        stopping.cancel()
    assert done, "HealthMonitor.stop() did not end the monitor's task"
    assert running is not None and running.cancelled()


async def test_periodic_runs_its_step_at_each_interval_and_at_once_when_woken() -> None:
    """The loop the background tasks share: a failing step is logged and the loop goes
    on; wake() runs the step without waiting out the interval; stop() ends it."""
    ran = asyncio.Event()
    calls: list[int] = []

    async def step() -> None:
        calls.append(len(calls))
        ran.set()
        if len(calls) == 1:
            raise RuntimeError("a surprise")

    interval = 60.0
    periodic = Periodic(step, lambda: interval, log=logging.getLogger("test"), what="step")
    periodic.start()
    periodic.wake()  # the first step fails ...
    assert await wait_event(ran, 5)
    ran.clear()
    periodic.wake()  # ... and the loop is still there
    assert await wait_event(ran, 5)
    assert calls == [0, 1]
    interval = 0.01  # read at each turn
    ran.clear()
    periodic.wake()
    assert await wait_event(ran, 5)
    ran.clear()
    assert await wait_event(ran, 5)  # and again after the (now short) interval
    task = periodic._task
    await periodic.stop()
    assert task is not None and task.done() and not periodic.running


async def test_quick_work_runs_on_the_loop_and_slow_work_in_a_thread() -> None:
    loop_thread = threading.get_ident()
    assert await call_inline_or_in_thread(True, threading.get_ident) == loop_thread
    assert await call_inline_or_in_thread(False, threading.get_ident) != loop_thread


async def test_set_event_from_a_worker_thread_wakes_the_waiter_through_its_loop() -> None:
    """In debug mode asyncio refuses a waiter's wake-up queued from another thread (which
    is what ``event.set()`` there does); ``set_event`` hands it to the loop instead."""
    loop = asyncio.get_running_loop()
    loop.set_debug(True)
    try:
        event = asyncio.Event()
        waiter = asyncio.create_task(event.wait())
        await asyncio.sleep(0)  # the waiter is parked on the event
        errors: list[BaseException] = []

        def from_thread() -> None:
            try:
                set_event(event, loop)
            except BaseException as exc:  # reported to the test below
                errors.append(exc)

        thread = threading.Thread(target=from_thread)
        thread.start()
        await asyncio.to_thread(thread.join)
        assert errors == []
        assert await asyncio.wait_for(waiter, 10) is True
        set_event(event, loop)  # on the loop's own thread: set at once
        assert event.is_set()
    finally:
        loop.set_debug(False)
