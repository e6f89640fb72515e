"""Network namespaces for tests that capture traffic with iptables: what the machine
must offer (root, ``ip``, an iptables with the nat table), a namespace the test creates
and deletes, threads that work inside it, and veth links between namespaces.

The addresses a test gives these namespaces exist only inside them: nothing is routed
out of a namespace a test creates.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.cli_harness import MESHCA

CLONE_NEWNET = 0x40000000
IPTABLES = ("iptables", "iptables-nft", "iptables-legacy")
SBIN = os.pathsep.join(("/usr/local/sbin", "/usr/sbin", "/sbin", os.environ.get("PATH", "")))
T = TypeVar("T")


# --- what the machine must offer --------------------------------------------------------------


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, "PATH": SBIN},
    )


def _first_line(result: subprocess.CompletedProcess[str]) -> str:
    text = (result.stderr or result.stdout).strip()
    return text.splitlines()[0] if text else f"exit status {result.returncode}"


def requirements(why: str = "intercept mode") -> tuple[str, str]:
    """(ip, iptables) commands, or the test is skipped with what is missing."""
    if os.geteuid() != 0:
        pytest.skip(
            f"{why} needs root for a network namespace and iptables rules "
            f"(running as uid {os.geteuid()})"
        )
    ip = shutil.which("ip", path=SBIN)
    if ip is None:
        pytest.skip("no 'ip' command (iproute2): cannot create a network namespace")
    iptables = next((found for name in IPTABLES if (found := shutil.which(name, path=SBIN))), None)
    if iptables is None:
        pytest.skip(
            f"no iptables, iptables-nft or iptables-legacy on PATH: {why} needs "
            "iptables to redirect the app's connections to Envoy"
        )
    return ip, iptables


def meshca_stdout(*args: str) -> str:
    """``python -m meshca ARGS`` as a process (how the namespace tests make their CA and
    bootstraps); its standard output, the test failing with its error on a non-zero exit."""
    result = subprocess.run(
        [*MESHCA, *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


# --- a network namespace, and threads that work inside it ---------------------------------------


class Netns:
    """``ip netns add``; ``run(fn)`` calls ``fn`` on a thread inside the namespace: its
    sockets are the namespace's, and processes it starts are born there."""

    def __init__(self, ip: str, iptables: str, suffix: str = "") -> None:
        self.ip, self.iptables = ip, iptables
        self.name = f"meshca-test-{os.getpid()}{suffix}"
        added = _run(ip, "netns", "add", self.name)
        if added.returncode != 0:
            pytest.skip(f"'ip netns add' failed: {_first_line(added)}")
        self._pool: ThreadPoolExecutor | None = None
        try:
            self.exec(ip, "link", "set", "lo", "up")
            probe = _run(
                ip, "netns", "exec", self.name, iptables, "-t", "nat", "-n", "-L", "OUTPUT"
            )
            if probe.returncode != 0:
                pytest.skip(
                    f"{Path(iptables).name} cannot use the nat table in a network namespace: "
                    f"{_first_line(probe)}"
                )
            self._pool = ThreadPoolExecutor(4, initializer=self._enter)
        except BaseException:
            self.delete()
            raise

    def exec(self, *argv: str) -> None:
        result = _run(self.ip, "netns", "exec", self.name, *argv)
        assert result.returncode == 0, f"{' '.join(argv)}: {result.stderr.strip()}"

    def _enter(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                error = ctypes.get_errno()
                raise OSError(error, f"setns {self.name}: {os.strerror(error)}")
        finally:
            os.close(fd)

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        assert self._pool is not None
        return self._pool.submit(fn, *args).result(timeout=90)

    def link(self, device: str, address: str, other: Netns, other_address: str) -> None:
        """A veth pair made inside the namespaces (never in the host's): ``device`` here
        with ``address`` (CIDR form), the same name there with ``other_address``."""
        self.exec(self.ip, "link", "add", device, "type", "veth", "peer", "name", device,
                  "netns", other.name)  # fmt: skip
        for namespace, cidr in ((self, address), (other, other_address)):
            namespace.exec(self.ip, "addr", "add", cidr, "dev", device)
            namespace.exec(self.ip, "link", "set", device, "up")

    def delete(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        _run(self.ip, "netns", "delete", self.name)
