"""Every bench and every example starts and does its job in a few seconds.

Benches are not tests, so nothing else runs them: each one takes ``--smoke`` (its real
code path with tiny counts) and must exit 0 with one JSON object as its last line. A
new file in ``bench/`` is picked up here by itself, and a new example must be added
to ``EXAMPLES`` (a check below says so). The examples run as a reader runs them:
``examples/serve_defaults.py`` (``make run``) with the commands it prints followed by
hand, Envoy included; ``examples/bookstore/run.py --wait`` with a mesh edit it must
report. ``examples/run_defaults.py`` is run by ``tests/test_cli.py``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.envoy_harness import (
    bookstore_mesh_copy,
    envoy_binary,
    eventually,
    free_port,
    stop_process,
)
from tests.serve_harness import clean_env, short_tempdir

pytestmark = pytest.mark.envoy

REPO = Path(__file__).resolve().parent.parent
BENCHES = sorted((REPO / "bench").glob("*.py"))
# What each bench needs besides Python: its marker.
NEEDS = {"vault_issue": pytest.mark.vault, "soak_rotation": pytest.mark.envoy}
EXAMPLES = {
    "examples/serve_defaults.py": "test_make_run_prints_commands_that_show_the_served_certificate",
    "examples/mtls_demo.py": "test_mtls_demo_shows_both_identities",
    "examples/bookstore/run.py": "test_bookstore_wait_reports_a_refused_mesh_edit",
    "examples/run_defaults.py": "tests/test_cli.py",
}
EXAMPLE_ID = "spiffe://cluster.local/ns/bookbuyer/sa/bookbuyer"


def test_every_example_is_run_by_a_test() -> None:
    found = {
        str(path.relative_to(REPO))
        for path in (REPO / "examples").rglob("*.py")
        if path.parent.name == "examples" or path.name == "run.py"
    }
    assert found == set(EXAMPLES), "add the new example to EXAMPLES and run it here"


@pytest.mark.parametrize(
    "bench",
    [pytest.param(path, id=path.stem, marks=NEEDS.get(path.stem, ())) for path in BENCHES],
)
def test_bench_runs_with_smoke(bench: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(bench), "--smoke"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
        env=clean_env(),
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert isinstance(figures, dict) and figures


@pytest.mark.envoy
def test_mtls_demo_shows_both_identities() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "mtls_demo.py")],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "client SPIFFE ID (URI): spiffe://cluster.local/ns/shop/sa/buyer" in result.stdout
    assert "server SPIFFE ID (By):  spiffe://cluster.local/ns/shop/sa/web" in result.stdout
    envoys = [line for line in result.stdout.splitlines() if " -c " in line]
    assert len(envoys) == 2
    assert all("--disable-hot-restart" in line for line in envoys), envoys


def printed_block(text: str, heading: str) -> list[str]:
    """The command lines printed after the line ``heading`` up to the next blank line,
    each with its ``\\`` continuations joined."""
    lines = text.split(heading + "\n", 1)[1].split("\n\n", 1)[0].splitlines()
    commands: list[str] = []
    for line in lines:
        if commands and commands[-1].endswith("\\"):
            commands[-1] = commands[-1][:-1] + line.strip()
        else:
            commands.append(line.strip())
    return commands


@pytest.fixture
def make_run(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path, Path]]:
    """``make run``'s script in a scratch directory holding (a link to) the venv, as
    the repository does; its process, its output and that directory."""
    output = tmp_path / "make-run.out"
    with short_tempdir("mca-run-") as short, output.open("w") as out:
        # A short directory: the Unix socket's path must fit in sun_path.
        (short / ".venv").symlink_to(REPO / ".venv")
        process = subprocess.Popen(
            [sys.executable, str(REPO / "examples" / "serve_defaults.py")],
            cwd=short,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env={**clean_env(), "MESHCA_LISTEN": "127.0.0.1:0"},
        )
        try:
            eventually(
                lambda: (
                    "Stop the server with Ctrl-C" in output.read_text()
                    or process.poll() is not None
                ),
                "make run printing its instructions",
            )
            yield process, output, short
        finally:
            stop_process(process)


@pytest.mark.envoy
def test_make_run_prints_commands_that_show_the_served_certificate(
    make_run: tuple[subprocess.Popen[str], Path, Path],
) -> None:
    process, output, workdir = make_run
    text = output.read_text()
    assert process.poll() is None, text
    bootstrap, envoy = printed_block(text, "  over the Unix socket:")
    check = printed_block(text, "Check the certificate meshca served (Envoy's admin API):")[0]
    assert check == "curl -s localhost:15000/certs", text
    assert envoy.endswith("--disable-hot-restart"), envoy
    # The printed ports, replaced by free ones so that nothing else here collides.
    admin, inbound = str(free_port()), str(free_port())
    ports = {"15000": admin, "15100": inbound}

    def port_free(command: str) -> str:
        return re.sub(r"\b(15000|15100)\b", lambda m: ports[m.group(1)], command)

    made = subprocess.run(
        port_free(bootstrap), shell=True, cwd=workdir, capture_output=True, text=True, timeout=60
    )
    assert made.returncode == 0, made.stderr
    command = shlex.split(port_free(envoy))
    assert command[0] == envoy_binary()
    log = workdir / "envoy.log"
    with log.open("wb") as out:
        proxy = subprocess.Popen(command, cwd=workdir, stdout=out, stderr=subprocess.STDOUT)
    try:

        def served() -> str:
            assert proxy.poll() is None, log.read_text(errors="replace")[-2000:]
            shown = subprocess.run(
                port_free(check), shell=True, capture_output=True, text=True, timeout=10
            ).stdout
            return shown if EXAMPLE_ID in shown else ""

        certs = json.loads(eventually(served, "the served SVID in Envoy's /certs"))
    finally:
        stop_process(proxy)
    chains = [c["cert_chain"] for c in certs["certificates"] if c.get("cert_chain")]
    uris = [san["uri"] for chain in chains for san in chain[0]["subject_alt_names"]]
    assert uris == [EXAMPLE_ID]
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 0, output.read_text()


EXAMPLE_COMMAND = [sys.executable, str(REPO / "examples" / "bookstore" / "run.py")]


@pytest.mark.envoy
@pytest.mark.timeout(180)
def test_bookstore_wait_reports_a_refused_mesh_edit(tmp_path: Path) -> None:
    mesh = bookstore_mesh_copy(tmp_path)
    out, err = tmp_path / "run.out", tmp_path / "run.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.Popen(
            # 40 purchases (the default): the walkthrough requires both halves of the 50/50
            # split to serve, which 4 random picks miss one time in eight
            [*EXAMPLE_COMMAND, "--wait", "--mesh", str(mesh), "--requests", "40"],
            stdout=stdout,
            stderr=stderr,
            env=clean_env(),
        )
    try:
        eventually(
            lambda: "Ctrl-C stops everything" in out.read_text() or process.poll() is not None,
            "the bookstore running",
            120,
        )
        assert process.poll() is None, out.read_text() + err.read_text()
        log = re.search(r"meshca's log is (\S+);", out.read_text())
        assert log is not None and Path(log.group(1)).is_file(), out.read_text()
        staged = mesh.with_name("mesh.yaml.new")
        staged.write_text(mesh.read_text().replace("weight: 50", "weight: -5", 1))
        os.replace(staged, mesh)
        shown = eventually(
            lambda: [line for line in err.read_text().splitlines() if "not reloaded" in line],
            "the refused edit shown in the terminal",
        )
        assert shown[0].startswith("meshca: "), shown
        assert "weight" in shown[0], shown
        assert "not reloaded" in Path(log.group(1)).read_text()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0, err.read_text()
        assert "stopped meshca, the Envoys and the apps" in out.read_text()
    finally:
        stop_process(process)
