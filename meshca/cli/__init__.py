"""The command line: the ``meshca`` entry point (``main``), the option table (``options``)
and one module per command (``commands``). The top layer: nothing else imports it.

Loading the command modules and their libraries is most of meshca's start-up (a second
or more on a busy machine). Ctrl-C in that window exits 130 without a traceback, as it
does once ``main`` runs (the entry point imports this package before calling ``main``).
"""

try:
    from meshca.cli.main import main
except KeyboardInterrupt:
    raise SystemExit(130) from None  # 128 + SIGINT, the shell's code for Ctrl-C

__all__ = ["main"]
