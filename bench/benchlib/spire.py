"""SPIRE as a bench peer: spire-server and spire-agent (built from the Go module proxy by
``bench/spire_build.sh`` into ``~/.cache/meshca/spire-<version>/bin``) on loopback and
Unix sockets, join-token node attestation, the unix workload attestor with a uid
selector entry for this process.

Two figures, measured as for meshca:

* signing throughput: ``MintX509SVID`` (the server API's SVID service, which signs a
  CSR) from ``agents`` concurrent clients over the server's Unix socket. SPIRE's own
  agents sign through ``BatchNewX509SVID`` over mutual TLS, which needs an attested
  agent's credentials and is not driven here: this path has no TLS, so it favours SPIRE.
* Workload API fan-out: ``streams`` ``FetchX509SVID`` streams on the spire-agent's
  socket; an entry update (a new DNS name) makes the agent re-sign the SVID and push
  it. The agent learns of the update at its next sync with the server, so the time
  from the update is mostly that sync; ``spread_s`` (first to last stream) is the
  fan-out itself. RSS per stream is the spire-agent process's growth over the streams.

Never a test dependency: nothing runs unless the bench is run without ``--smoke``.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc

from benchlib.rate import Rate, concurrent_calls

SPIRE_VERSION = "v1.13.3"
BUILD_SCRIPT = Path(__file__).resolve().parent.parent / "spire_build.sh"
TD = "cluster.local"
NODE = f"spiffe://{TD}/bench/node"
MINT = "/spire.api.server.svid.v1.SVID/MintX509SVID"


def binaries() -> tuple[Path | None, str]:
    """The bin directory (building once if needed), or None and why it is skipped."""
    if shutil.which("go") is None:
        return None, "skipped: no Go"
    print(f"SPIRE {SPIRE_VERSION}: building once into ~/.cache/meshca (minutes) ...", flush=True)
    done = subprocess.run(
        ["bash", str(BUILD_SCRIPT)],
        env={**os.environ, "SPIRE_VERSION": SPIRE_VERSION},
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        tail = " ".join(done.stderr.strip().splitlines()[-2:])
        return None, f"skipped: the SPIRE build failed ({tail[:300]})"
    return Path(done.stdout.strip().splitlines()[-1]), ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def rss_of(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Spire:
    """spire-server and one spire-agent under ``root``, stopped by :meth:`stop`."""

    def __init__(self, bin_dir: Path, root: Path) -> None:
        self.bin = bin_dir
        self.root = root
        self.server_socket = root / "server" / "api.sock"
        self.agent_socket = root / "agent" / "public" / "api.sock"
        self.port = _free_port()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.entry_id = ""

    def _cli(self, *args: str) -> str:
        done = subprocess.run(
            [str(self.bin / "spire-server"), *args, "-socketPath", str(self.server_socket)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"spire-server {args[0]}: {done.stderr.strip()[:300]}")
        return done.stdout

    def _spawn(self, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{Path(args[0]).name}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        for d in ("server/data", "agent/data", "agent/public"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        server_conf = self.root / "server.conf"
        server_conf.write_text(
            f"""server {{
  bind_address = "127.0.0.1"
  bind_port = "{self.port}"
  socket_path = "{self.server_socket}"
  trust_domain = "{TD}"
  data_dir = "{self.root}/server/data"
  log_level = "WARN"
  ca_key_type = "ec-p256"
  default_x509_svid_ttl = "1h"
}}
plugins {{
  DataStore "sql" {{
    plugin_data {{
      database_type = "sqlite3"
      connection_string = "{self.root}/server/data/datastore.sqlite3"
    }}
  }}
  NodeAttestor "join_token" {{ plugin_data {{}} }}
  KeyManager "memory" {{ plugin_data {{}} }}
}}
"""
        )
        self.server = self._spawn(
            str(self.bin / "spire-server"), "run", "-config", str(server_conf)
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                self._cli("healthcheck")
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        token = self._cli("token", "generate", "-spiffeID", NODE, "-ttl", "600")
        token = token.split("Token:")[-1].strip()
        out = self._cli(
            "entry",
            "create",
            "-parentID",
            NODE,
            "-spiffeID",
            f"spiffe://{TD}/ns/bench/sa/web",
            "-selector",
            f"unix:uid:{os.getuid()}",
            "-x509SVIDTTL",
            "3600",
            "-dns",
            "v0.bench",
        )
        for line in out.splitlines():
            if line.startswith("Entry ID"):
                self.entry_id = line.split(":", 1)[1].strip()
        agent_conf = self.root / "agent.conf"
        agent_conf.write_text(
            f"""agent {{
  data_dir = "{self.root}/agent/data"
  log_level = "WARN"
  server_address = "127.0.0.1"
  server_port = "{self.port}"
  socket_path = "{self.agent_socket}"
  trust_domain = "{TD}"
  insecure_bootstrap = true
}}
plugins {{
  NodeAttestor "join_token" {{ plugin_data {{}} }}
  KeyManager "memory" {{ plugin_data {{}} }}
  WorkloadAttestor "unix" {{ plugin_data {{}} }}
}}
"""
        )
        self.agent = self._spawn(
            str(self.bin / "spire-agent"), "run", "-config", str(agent_conf), "-joinToken", token
        )

    def rotate(self, generation: int) -> float:
        """Change the entry (a new DNS name): the agent re-signs and pushes the SVID."""
        changed_at = time.monotonic()
        self._cli(
            "entry",
            "update",
            "-entryID",
            self.entry_id,
            "-parentID",
            NODE,
            "-spiffeID",
            f"spiffe://{TD}/ns/bench/sa/web",
            "-selector",
            f"unix:uid:{os.getuid()}",
            "-x509SVIDTTL",
            "3600",
            "-dns",
            f"v{generation}.bench",
        )
        return changed_at

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    # --- signing throughput ---------------------------------------------------------
    def mint_rate(self, clients: int, seconds: float, csr: bytes) -> Rate:
        """``MintX509SVID`` calls from ``clients`` threads, with spire-server's CPU."""
        request = b"\x0a" + _varint(len(csr)) + csr + b"\x10" + _varint(3600)
        channels = [grpc.insecure_channel(f"unix:{self.server_socket}") for _ in range(clients)]
        calls = [c.unary_unary(MINT) for c in channels]
        for call in calls:
            call(request, timeout=30)  # connect and warm up
        try:
            return concurrent_calls(
                [functools.partial(call, request, timeout=30) for call in calls],
                seconds,
                server_pid=self.server.pid,
            )
        finally:
            for channel in channels:
                channel.close()


async def wait_for_svid(spire: Spire, timeout: float = 120.0) -> None:
    """Until the agent's Workload API serves this process its SVID."""
    from spiffe._proto import workload_pb2, workload_pb2_grpc

    deadline = time.monotonic() + timeout
    while True:
        if spire.agent.poll() is not None:
            raise RuntimeError(f"spire-agent exited; see {spire.root / 'spire-agent.log'}")
        if spire.agent_socket.exists():
            async with grpc.aio.insecure_channel(f"unix:{spire.agent_socket}") as channel:
                stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
                call = stub.FetchX509SVID(
                    workload_pb2.X509SVIDRequest(), metadata=(("workload.spiffe.io", "true"),)
                )
                try:
                    response = await asyncio.wait_for(call.read(), 5)
                    if response.svids:
                        call.cancel()
                        return
                except (TimeoutError, grpc.aio.AioRpcError):
                    pass
                call.cancel()
        if time.monotonic() > deadline:
            raise RuntimeError("spire-agent served no SVID in time")
        await asyncio.sleep(0.5)


async def fanout(spire: Spire, streams: int, channels: list[Any]) -> dict[str, Any]:
    from benchlib.fanout import workload_api_fanout

    async def rss() -> int:
        return rss_of(spire.agent.pid)

    async def change() -> float:
        return await asyncio.to_thread(spire.rotate, 1)

    fan = await workload_api_fanout(streams, channels, rss, change)
    return {
        "from_update_s": fan["from_change_s"],
        "spread_s": fan["spread_s"],
        "agent_rss_before_mb": fan["rss_before_mb"],
        "agent_rss_streams_mb": fan["rss_streams_mb"],
        "agent_bytes_per_stream": fan["bytes_per_stream"],
    }
