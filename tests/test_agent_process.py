"""``meshca serve``, ``meshca token`` and ``meshca agent`` as real processes: the agent
attests with a token file, serves py-spiffe and SDS on its socket, and keeps serving
the cached SVID after ``kill -9`` of meshca serve."""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from spiffe import WorkloadApiClient

from tests.cli_harness import assert_refused, child_environment, clean_environment, runner
from tests.envoy_harness import stop_process
from tests.serve_harness import (
    MESHCA,
    ServeProcess,
    fetch,
    make_data_dir,
    meshca,
    serving,
    short_tempdir,
)

WORKLOAD = "spiffe://cluster.local/ns/shop/sa/web"


@contextlib.contextmanager
def agent_process(root: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    out, err = root / "agent.out", root / "agent.log"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen(
            [*MESHCA, "agent", *args],
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            env=child_environment(),
        )
    try:
        deadline = time.monotonic() + 30
        while "listening on unix://" not in out.read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"meshca agent did not start:\n{err.read_text()}")
            time.sleep(0.05)
        yield process
    finally:
        stop_process(process)


def join_token_files(root: Path, data_dir: Path, identity: str) -> str:
    """What a join-token agent starts from: ``root/bundle.pem`` (the CA's trust bundle)
    and ``root/token`` (0600), a one-time token for ``identity``. The token."""
    (root / "bundle.pem").write_text(meshca("bundle", "--data-dir", str(data_dir)).stdout)
    token = meshca("token", "create", "--data-dir", str(data_dir), "--identity", identity)
    (root / "token").write_text(token.stdout)
    (root / "token").chmod(0o600)
    return token.stdout.strip()


def joining(root: Path, server: ServeProcess, socket: Path) -> tuple[str, ...]:
    """``meshca agent`` flags: join ``server`` (its TCP and attestation listeners) with
    the files of :func:`join_token_files`, serve on ``socket``, keep state in
    ``root/agent-data``."""
    attest = re.search(r"attestation on tcp \S+:(\d+)", server.stdout.read_text())
    assert attest is not None and server.tcp_port is not None
    return (
        *("--server", f"localhost:{server.tcp_port}"),
        *("--attest-server", f"localhost:{attest.group(1)}"),
        *("--token-file", str(root / "token")),
        *("--trust-bundle", str(root / "bundle.pem")),
        *("--socket", str(socket), "--data-dir", str(root / "agent-data")),
    )


def sds_default(socket: Path) -> bytes:
    async def call() -> bytes:
        async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
            (secret,) = await fetch(channel, ["default"])
            return bytes(secret.tls_certificate.certificate_chain.inline_bytes)

    import asyncio

    return asyncio.run(call())


def test_an_agent_process_outlives_a_killed_meshca() -> None:
    with short_tempdir() as root:
        data_dir = make_data_dir(root)
        token = join_token_files(root, data_dir, WORKLOAD)
        args = ("--listen", "127.0.0.1:0", "--attest-listen", "127.0.0.1:0")
        with serving(root, data_dir, *args) as server:
            socket = root / "agent.sock"
            with agent_process(root, *joining(root, server, socket)) as agent:
                with WorkloadApiClient(f"unix://{socket}") as client:
                    before = client.fetch_x509_svid(10)
                assert str(before.spiffe_id) == WORKLOAD
                chain = sds_default(socket)
                server.process.send_signal(signal.SIGKILL)
                server.process.wait(10)
                with WorkloadApiClient(f"unix://{socket}") as client:
                    after = client.fetch_x509_svid(10)
                assert after.leaf.serial_number == before.leaf.serial_number
                assert sds_default(socket) == chain
                assert agent.poll() is None
            log = (root / "agent.log").read_text()
            assert "Traceback" not in log
            assert token not in log  # the token is never logged


@pytest.mark.parametrize(
    ("argv", "code", "needle"),
    [
        (["agent"], 2, "--server"),
        (["agent", "--server", "unix:///x.sock"], 1, "TCP"),
        (["agent", "--server", "localhost:1"], 2, "--socket"),
        (
            ["agent", "--server", "localhost:1", "--socket", "s", "--trust-bundle", "b.pem"],
            1,
            "--trust-bundle",
        ),
        (["bootstrap", WORKLOAD, "--agent", "localhost:1"], 2, "Unix socket"),
        (["bootstrap", WORKLOAD, "--agent", "unix:///a", "--server", "unix:///b"], 2, "not both"),
    ],
)
def test_agent_refusals_are_one_line(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    argv: list[str],
    code: int,
    needle: str,
) -> None:
    clean_environment(monkeypatch, tmp_path)
    (tmp_path / "b.pem").write_text("not a bundle")
    assert_refused(capsys, argv, code, needle)


def test_bootstrap_for_an_agent_needs_no_certificate_directory(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    clean_environment(monkeypatch, tmp_path)
    code, out, err = runner(capsys)("bootstrap", WORKLOAD, "--agent", "unix:///run/agent.sock")
    assert code == 0, err
    assert "/run/agent.sock" in out and "cert.pem" not in out
