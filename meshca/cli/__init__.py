"""The command line: the ``meshca`` entry point (``main``), the option table (``options``)
and one module per command (``commands``). The top layer: nothing else imports it."""

from meshca.cli.main import main

__all__ = ["main"]
