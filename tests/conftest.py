"""Shared pytest configuration. Fixtures that start real processes live in
``tests/*_harness.py`` modules and are imported by the tests that need them."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


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
