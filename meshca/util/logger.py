"""Loggers for meshca's modules: quiet until a command installs a handler.

Every meshca module takes its logger from :func:`get_logger`, so importing any module
that can log first gives the ``meshca`` logger a ``NullHandler``. Without it, Python's
last-resort handler would print a backend's retry narration ("serving what is cached,
retrying ...") beside a one-shot command's own one-line verdict; a long-running command
(serve, agent) installs its own handler (``util.logs.configure_logging``). The commands
that never log (``meshca issue``, ``inspect``, ``bundle``) import no such module and so
start without ``logging`` at all.
"""

from __future__ import annotations

import logging

logging.getLogger("meshca").addHandler(logging.NullHandler())


def get_logger(name: str) -> logging.Logger:
    """The logger ``name`` (under ``meshca``), once meshca's quiet default is in place."""
    return logging.getLogger(name)
