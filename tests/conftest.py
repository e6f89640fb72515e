"""Shared pytest configuration. Fixtures that start real processes live in
``tests/*_harness.py`` modules and are imported by the tests that need them."""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator

import pytest

# Some tests press Ctrl-C (SIGINT) on a meshca process, as a terminal would. A test run
# started as a background job of a non-interactive shell inherits SIGINT *ignored*, and an
# ignored signal stays ignored across exec, so every meshca started by a test would ignore
# it too. A handled signal is reset to the default at exec: what a terminal gives a command.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """A test that runs ``meshca serve`` in-process installs a handler on pytest's captured
    stderr of that test; it must not outlive the test and write into a closed stream later."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)
