"""Running the ``meshca`` command line from tests: in-process through ``main`` (output
captured by pytest) or as a real process, never with the caller's ``MESHCA_*`` settings,
and the one shape every refusal has (one line on stderr, an exit code, no traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from meshca.cli import main

MESHCA = [sys.executable, "-m", "meshca"]

Run = Callable[..., tuple[int, str, str]]


def clean_environment(monkeypatch: pytest.MonkeyPatch, cwd: Path) -> None:
    """No ``MESHCA_*`` setting of the outer shell leaks in, and the working directory (so
    the default data directory ``./.meshca``) is ``cwd``."""
    for name in list(os.environ):
        if name.startswith("MESHCA_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(cwd)


def runner(capsys: pytest.CaptureFixture[str]) -> Run:
    """``run(*argv)``: ``meshca ARGV`` in-process, returning (exit code, stdout, stderr)."""

    def run(*argv: str | Path) -> tuple[int, str, str]:
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def assert_one_line_error(err: str, needle: str = "") -> None:
    """``err`` is one ``meshca: error: ...`` line holding ``needle``, not a traceback."""
    assert err.startswith("meshca: error: "), err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    assert needle in err, err


def assert_refused(
    capsys: pytest.CaptureFixture[str], argv: list[str], code: int, needle: str
) -> None:
    """``meshca ARGV`` exits ``code``, prints nothing on stdout and one error line on
    stderr holding ``needle``."""
    assert main(argv) == code
    captured = capsys.readouterr()
    assert captured.out == ""
    assert_one_line_error(captured.err, needle)


def child_environment() -> dict[str, str]:
    """The environment for a ``meshca`` child process: the caller's, minus ``MESHCA_*``."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MESHCA_")}


def meshca_process(*argv: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m meshca ARGV`` as a real process in ``cwd``."""
    return subprocess.run(
        [*MESHCA, *map(str, argv)],
        cwd=cwd,
        env=child_environment(),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
