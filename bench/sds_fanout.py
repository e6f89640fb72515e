"""SDS fan-out: N concurrent StreamSecrets streams, one trust-bundle change, every ACK timed.

Run: ``.venv/bin/python bench/sds_fanout.py [--streams 2000] [--transport uds|tcp]``

A ``meshca serve`` server (``MeshcaServer``, in-process in a child process of its own)
holds the streams; this process is the client: grpc.aio over ``--channels`` separate
connections (the Unix socket through meshca's relay, or mutual TLS on loopback). Each
stream subscribes to ``ROOTCA`` and ACKs. Then the server adds a root to the trust
bundle (the first step of a CA rotation) and every stream receives the new bundle and
ACKs it. A small control channel (the child's stdin/stdout) triggers the change and
reads the server's memory; both processes read the same system-wide monotonic clock.

Figures:
  push_to_last_ack     from the bundle change until the server has received every
                       stream's ACK (goal: 10,000 streams within 3 s)
  push p50/p99         per stream, from the change to the new bundle's arrival
  subscribe p50/p99    per stream, from its first request to its first response
  memory per stream    server RSS growth while the streams are open, / N (goal < 50 KB)
  baseline             the same fan-out of a trivial message over the same connections:
                       gRPC's own health service pushing a status change to N ``Watch``
                       streams. ``ratio`` = push_to_last_ack / baseline.
The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshca.xds.resources import SECRET_TYPE

CLIENT_ID = "spiffe://cluster.local/ns/bench/sa/client"
HEALTH_SERVICE = "bench"
GOAL_SECONDS = 3.0
GOAL_BYTES_PER_STREAM = 50 * 1024


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# --- the server process ----------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def serve(data_dir: Path, socket_path: Path) -> None:
    """Run meshca serve in-process and obey one-line commands on stdin."""
    from meshca.issuer import SignerAuthority
    from meshca.issuer.keys import generate_private_key
    from meshca.issuer.profile import build_ca
    from meshca.serve.config import ServeConfig
    from meshca.serve.server import MeshcaServer
    from meshca.spiffe import SpiffeId

    raise_fd_limit()
    config = ServeConfig(
        data_dir=data_dir,
        listen=("127.0.0.1", 0),
        uds=socket_path,
        uds_identities={os.getuid(): (SpiffeId.parse(CLIENT_ID),)},
        grace=0.0,
    )
    server = MeshcaServer(config)
    await server.start()
    await server.health.set(HEALTH_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    loop = asyncio.get_running_loop()

    def reply(document: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(document) + "\n")
        sys.stdout.flush()

    reply({"port": server.tcp_port, "uds": str(socket_path)})
    health_status = health_pb2.HealthCheckResponse.SERVING
    while True:
        line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
        if line in ("", "quit"):
            break
        if line == "rss":
            gc.collect()
            reply({"rss": rss_bytes(), "streams": server.stats.active_streams})
        elif line == "bundle":
            authority = server.authority
            assert isinstance(authority, SignerAuthority)
            key = generate_private_key()
            new_root = build_ca(server.trust_domain, key, timedelta(days=3650))
            bundle = server.store.bundle().with_root(new_root)
            authority.activate(authority.signer, bundle)
            changed_at = time.monotonic()
            server.store.refresh_bundle()  # notifies every watching stream
            reply({"changed_at": changed_at, "notified_at": time.monotonic()})
        elif line == "health":
            health_status = (
                health_pb2.HealthCheckResponse.NOT_SERVING
                if health_status == health_pb2.HealthCheckResponse.SERVING
                else health_pb2.HealthCheckResponse.SERVING
            )
            changed_at = time.monotonic()
            await server.health.set(HEALTH_SERVICE, health_status)
            reply({"changed_at": changed_at})
        elif line.startswith("acks "):  # wait until the server has seen this many ACKs
            target = int(line.split()[1])
            deadline = time.monotonic() + 120
            while sum(server.stats.acks.values()) < target and time.monotonic() < deadline:
                await asyncio.sleep(0.001)
            reply({"at": time.monotonic(), "acks": sum(server.stats.acks.values())})
        elif line == "stats":
            latency = server.stats.ack_latency
            reply(
                {
                    "acks": sum(server.stats.acks.values()),
                    "nacks": sum(server.stats.nacks.values()),
                    "server_ack_latency_p50": latency.quantile(0.5),
                    "server_ack_latency_p99": latency.quantile(0.99),
                }
            )
    await server.stop(0)


# --- the client (this process) -----------------------------------------------------------


class ServerProcess:
    def __init__(self, root: Path) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--role",
                "server",
                "--data-dir",
                str(root / "data"),
                "--socket",
                str(root / "sds.sock"),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.hello = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"the server process exited ({self.process.wait()})")
        return dict(json.loads(line))

    async def ask(self, command: str) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return await asyncio.to_thread(self._read)

    def stop(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.write("quit\n")
            self.process.stdin.flush()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def make_channels(args: argparse.Namespace, root: Path, hello: dict[str, Any]) -> list[Any]:
    options = [("grpc.use_local_subchannel_pool", 1)]  # one connection per channel
    if args.transport == "uds":
        return [
            grpc.aio.insecure_channel(f"unix:{hello['uds']}", options=options)
            for _ in range(args.channels)
        ]
    from meshca.backends.local import load_local_ca
    from meshca.issuer import Issuer
    from meshca.spiffe import SpiffeId

    ca = load_local_ca(root / "data")
    svid = Issuer(ca.authority()).issue(SpiffeId.parse(CLIENT_ID))
    credentials = grpc.ssl_channel_credentials(
        ca.bundle.pem(), svid.private_key_pem(), svid.chain_pem()
    )
    return [
        grpc.aio.secure_channel(f"localhost:{hello['port']}", credentials, options=options)
        for _ in range(args.channels)
    ]


class SdsStream:
    """One proxy's stream: subscribe to ROOTCA, ACK every response, note the times."""

    node = base_pb2.Node(id=CLIENT_ID, cluster="bench")

    def __init__(self, stub: Any) -> None:
        self.stub = stub
        self.call: Any = None
        self.subscribe_latency = 0.0
        self.pushed_at = 0.0
        self.acked_at = 0.0

    async def subscribe(self) -> None:
        self.call = self.stub.StreamSecrets()
        sent = time.monotonic()
        await self.call.write(
            discovery_pb2.DiscoveryRequest(
                type_url=SECRET_TYPE, resource_names=["ROOTCA"], node=self.node
            )
        )
        response = await self.call.read()
        self.subscribe_latency = time.monotonic() - sent
        await self._ack(response)

    async def await_push(self) -> None:
        response = await self.call.read()
        self.pushed_at = time.monotonic()
        await self._ack(response)
        self.acked_at = time.monotonic()

    async def _ack(self, response: Any) -> None:
        if response is grpc.aio.EOF or not response.resources:
            raise RuntimeError(f"stream ended or sent nothing: {await self.call.code()}")
        await self.call.write(
            discovery_pb2.DiscoveryRequest(
                type_url=SECRET_TYPE,
                resource_names=["ROOTCA"],
                version_info=response.version_info,
                response_nonce=response.nonce,
            )
        )


async def bounded(coroutines: list[Any], limit: int) -> None:
    semaphore = asyncio.Semaphore(limit)

    async def run(coroutine: Any) -> None:
        async with semaphore:
            await coroutine

    await asyncio.gather(*(run(c) for c in coroutines))


async def sds_fanout(
    args: argparse.Namespace, server: ServerProcess, channels: list[Any]
) -> dict[str, Any]:
    before = await server.ask("rss")
    stubs = [sds_pb2_grpc.SecretDiscoveryServiceStub(c) for c in channels]
    streams = [SdsStream(stubs[i % len(stubs)]) for i in range(args.streams)]
    opened = time.monotonic()
    await bounded([s.subscribe() for s in streams], 1000)
    subscribe_all = time.monotonic() - opened
    await asyncio.sleep(0.5)  # let the server settle before measuring memory
    during = await server.ask("rss")
    pushes = [asyncio.ensure_future(s.await_push()) for s in streams]
    change = await server.ask("bundle")
    await asyncio.wait_for(asyncio.gather(*pushes), 120)
    seen = await server.ask(f"acks {2 * args.streams}")  # every subscription and push ACKed
    if seen["acks"] < 2 * args.streams:
        raise SystemExit(f"the server saw {seen['acks']} ACKs of {2 * args.streams}")
    changed_at = change["changed_at"]
    push = [s.pushed_at - changed_at for s in streams]
    last_ack = seen["at"] - changed_at
    last_ack_sent = max(s.acked_at for s in streams) - changed_at
    server_stats = await server.ask("stats")
    for stream in streams:
        stream.call.cancel()
    return {
        "push_to_last_ack_s": round(last_ack, 4),
        "push_to_last_ack_sent_s": round(last_ack_sent, 4),
        "push_p50_s": round(quantile(push, 0.5), 4),
        "push_p99_s": round(quantile(push, 0.99), 4),
        "notify_s": round(change["notified_at"] - changed_at, 4),
        "subscribe_all_s": round(subscribe_all, 4),
        "subscribe_p50_s": round(quantile([s.subscribe_latency for s in streams], 0.5), 4),
        "subscribe_p99_s": round(quantile([s.subscribe_latency for s in streams], 0.99), 4),
        "server_rss_before_mb": round(before["rss"] / 2**20, 1),
        "server_rss_streams_mb": round(during["rss"] / 2**20, 1),
        "server_bytes_per_stream": round((during["rss"] - before["rss"]) / args.streams),
        "server_active_streams": during["streams"],
        **{k: v for k, v in server_stats.items() if v is not None},
    }


async def health_fanout(
    args: argparse.Namespace, server: ServerProcess, channels: list[Any]
) -> float:
    """The baseline: gRPC's health service pushing one status change to N watchers."""
    stubs = [health_pb2_grpc.HealthStub(c) for c in channels]
    calls: list[Any] = []
    request = health_pb2.HealthCheckRequest(service=HEALTH_SERVICE)

    async def first(stub: Any) -> None:
        call = stub.Watch(request)  # created when admitted, like the SDS streams
        calls.append(call)
        await call.read()

    await bounded([first(stubs[i % len(stubs)]) for i in range(args.streams)], 1000)
    arrivals: list[float] = []

    async def next_status(call: Any) -> None:
        await call.read()
        arrivals.append(time.monotonic())

    waiting = [asyncio.ensure_future(next_status(c)) for c in calls]
    await asyncio.sleep(0.2)
    change = await server.ask("health")
    await asyncio.wait_for(asyncio.gather(*waiting), 120)
    for call in calls:
        call.cancel()
    return max(arrivals) - change["changed_at"]


async def client(args: argparse.Namespace) -> dict[str, Any]:
    raise_fd_limit()
    root = Path(tempfile.mkdtemp(prefix="mca-bench-"))
    server: ServerProcess | None = None
    try:
        subprocess.run(
            [sys.executable, "-m", "meshca", "init", "--data-dir", str(root / "data")],
            check=True,
            capture_output=True,
        )
        server = ServerProcess(root)
        channels = make_channels(args, root, server.hello)
        result: dict[str, Any] = {
            "streams": args.streams,
            "channels": args.channels,
            "transport": args.transport,
        }
        result.update(await sds_fanout(args, server, channels))
        await asyncio.sleep(0.5)
        baseline = await health_fanout(args, server, channels)
        result["baseline_health_fanout_s"] = round(baseline, 4)
        result["ratio_vs_baseline"] = round(result["push_to_last_ack_s"] / baseline, 2)
        result["goal_all_acked_within_3s"] = (
            args.streams < 10_000 or result["push_to_last_ack_s"] <= GOAL_SECONDS
        )
        result["goal_under_50kb_per_stream"] = (
            result["server_bytes_per_stream"] <= GOAL_BYTES_PER_STREAM
        )
        for channel in channels:
            await channel.close()
        return result
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


def report(result: dict[str, Any]) -> None:
    n = result["streams"]
    print(f"SDS fan-out: {n} streams on {result['channels']} {result['transport']} connections")
    print(
        f"  bundle change -> last ACK   {result['push_to_last_ack_s']:.3f} s "
        f"(goal at 10,000 streams: {GOAL_SECONDS:.0f} s)"
    )
    print(
        f"  push latency p50 / p99     {result['push_p50_s'] * 1000:.0f} / "
        f"{result['push_p99_s'] * 1000:.0f} ms"
    )
    print(
        f"  subscribe p50 / p99        {result['subscribe_p50_s'] * 1000:.0f} / "
        f"{result['subscribe_p99_s'] * 1000:.0f} ms (all {n} in {result['subscribe_all_s']:.2f} s)"
    )
    print(
        f"  server memory per stream   {result['server_bytes_per_stream'] / 1024:.1f} KB "
        f"(RSS {result['server_rss_before_mb']} -> {result['server_rss_streams_mb']} MB; "
        f"goal < {GOAL_BYTES_PER_STREAM // 1024} KB)"
    )
    print(
        f"  baseline (health Watch)    {result['baseline_health_fanout_s']:.3f} s "
        f"-> ratio {result['ratio_vs_baseline']:.2f}"
    )
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--channels", type=int, default=0, help="default: one per 250 streams")
    parser.add_argument("--transport", choices=("uds", "tcp"), default="uds")
    parser.add_argument("--role", choices=("client", "server"), default="client")
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--socket", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny counts: checks that it runs (make test does)"
    )
    args = parser.parse_args()
    if args.smoke:
        args.streams = 4
    if args.role == "server":
        asyncio.run(serve(args.data_dir, args.socket))
        return
    if args.streams < 1:
        parser.error("--streams must be at least 1")
    args.channels = args.channels or max(1, args.streams // 250)
    report(asyncio.run(client(args)))


if __name__ == "__main__":
    main()
