"""SDS fan-out: N concurrent StreamSecrets streams, one trust-bundle change, every ACK timed.

Run: ``.venv/bin/python bench/sds_fanout.py [--streams 2000] [--transport uds|tcp]
[--cases bundle,envoy-like,issuance,burst,operator] [--max-opening 1000|0]
[--gc serve|default]``

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

The realistic cases (``--cases``; all but ``burst`` by default):
  envoy-like           the bundle fan-out again with one connection per stream, as each
                       Envoy has (mutual TLS on loopback; ``envoy_like_*`` figures)
  issuance             stream i asks for workload i's certificate (one caller holding all
                       the identities, ``--workloads``): new identities per second, in
                       wall time and per server CPU-second; then the same streams again
                       (already held: serving alone), and the same shape against a plain
                       grpc.aio servicer (the ceiling of a Python gRPC server)
  burst                every stream opened at once with no client-side bound, against
                       meshca and two plain grpc.aio servers (gRPC's default options; the
                       options meshca sets), multiplexed and one connection per stream:
                       answered, and the status codes of the refused
  operator             (not by default) the bundle change made as an operator makes it,
                       ``meshca ca rotate-root --step 1`` through the admin socket: from
                       the command's start to the last stream holding the new bundle
                       (goal: 10,000 streams within 2 s, 50,000 within 6 s) and to its
                       reply; ``operator_ratio_vs_in_process`` divides it by the
                       in-process change's last push (``push_last_s``) of the same run.
                       ``--gc default`` runs the server with Python's own GC settings
                       instead of those ``meshca serve`` sets, for comparison
``--max-opening 0`` opens the streams of every case at once. With ``--profile``, the
server's CPU seconds and cyclic-GC pauses are beside each figure anyway; set
``MESHCA_BENCH_PY_SPY=FILE`` with py-spy installed beside this Python to also record
every thread of the server (native frames included) during the operator case.
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
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
from benchlib.child import JsonChild
from benchlib.fanout import bounded, health_fanout
from benchlib.goclient import GoStreams, sdsclient
from benchlib.sampler import StackSampler
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from grpc_health.v1 import health_pb2

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


def workload_id(index: int) -> str:
    """The identity of the ``index``-th workload of the served-issuance case."""
    return f"spiffe://cluster.local/ns/bench/sa/w{index}"


def start_py_spy(output: Path) -> subprocess.Popen[bytes] | None:
    """py-spy (when MESHCA_BENCH_PY_SPY names an output file and py-spy is on PATH
    beside this Python) recording every thread of this process, native frames included."""
    spy = Path(sys.executable).parent / "py-spy"
    if not output.name or not spy.exists():
        return None
    return subprocess.Popen(
        [str(spy), "record", "--pid", str(os.getpid()), "--threads", "--native", "--idle",
         "--rate", "250", "--format", "raw", "--output", str(output)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def stop_py_spy(spy: subprocess.Popen[bytes] | None) -> None:
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=60)


class GcPauses:
    """The cyclic GC's pauses in this process: seconds in all, and full collections."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.full = 0
        self.by_generation = [[0, 0.0], [0, 0.0], [0, 0.0]]  # collections, seconds
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.thread_time()
        else:
            took = time.thread_time() - self._started
            self.seconds += took
            self.full += info["generation"] == 2
            self.by_generation[info["generation"]][0] += 1
            self.by_generation[info["generation"]][1] += took


class PlainSds(sds_pb2_grpc.SecretDiscoveryServiceServicer):  # type: ignore[misc]
    """The reference: a plain grpc.aio SDS servicer answering each first request with one
    fixed resource and ignoring ACKs (no authentication, no engine, no issuance)."""

    answer = discovery_pb2.DiscoveryResponse(version_info="1", nonce="1", type_url=SECRET_TYPE)
    answer.resources.add(type_url=SECRET_TYPE, value=b"\n\x06ROOTCA")

    async def StreamSecrets(self, requests: Any, context: Any) -> None:
        async for request in requests:
            if not request.response_nonce:
                await context.write(self.answer)


async def start_plain_servers(directory: Path) -> tuple[list[Any], dict[str, str]]:
    """Plain grpc.aio servers on Unix sockets: one with gRPC's default options, one with
    the options meshca's xDS server uses."""
    from meshca.xds.server_options import XDS_SERVER_OPTIONS

    servers, paths = [], {}
    for name, options in (("plain_default", []), ("plain_raised", XDS_SERVER_OPTIONS)):
        plain = grpc.aio.server(options=options)
        sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(PlainSds(), plain)
        path = directory / f"{name}.sock"
        plain.add_insecure_port(f"unix:{path}")
        await plain.start()
        servers.append(plain)
        paths[name] = str(path)
    return servers, paths


async def serve(
    data_dir: Path,
    socket_path: Path,
    workloads: int = 0,
    gc_mode: str = "serve",
    handshake_timeout: float = 5.0,
) -> None:
    """Run meshca serve in-process and obey one-line commands on stdin. ``gc_mode``:
    ``serve`` tunes the cyclic GC as ``meshca serve`` does once it serves, ``default``
    leaves Python's own settings, to compare the two."""
    from meshca.issuer import ActiveSigner
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
        uds_identities={
            os.getuid(): (
                SpiffeId.parse(CLIENT_ID),
                *(SpiffeId.parse(workload_id(i)) for i in range(workloads)),
            )
        },
        grace=0.0,
        # one client process stands in for thousands of proxies of one identity and uid
        max_streams_per_caller=1_000_000,
        max_names_per_caller=1_000_000,
        uds_max_connections_per_uid=1_000_000,
        max_connections=1_000_000,
        handshake_timeout=handshake_timeout,
    )
    server = MeshcaServer(config)
    await server.start()
    if gc_mode == "serve":  # what 'meshca serve' does once it serves
        from meshca.serve.gc_tuning import settle_after_start_up

        settle_after_start_up()
    await server.health.set(HEALTH_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    loop = asyncio.get_running_loop()

    def reply(document: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(document) + "\n")
        sys.stdout.flush()

    plain_servers, plain_paths = await start_plain_servers(socket_path.parent)
    reply({"port": server.tcp_port, "uds": str(socket_path), **plain_paths})
    health_status = health_pb2.HealthCheckResponse.SERVING
    sampler = StackSampler()
    gc_pauses = GcPauses()
    while True:
        line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
        if line in ("", "quit"):
            break
        if line == "rss":
            gc.collect()
            reply({"rss": rss_bytes(), "streams": server.stats.active_streams})
        elif line == "bundle":
            authority = server.authority
            assert isinstance(authority, ActiveSigner)
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
        elif line == "sample-start":  # --profile: sample the event loop's stack
            sampler.start()
            spy = start_py_spy(Path(os.environ.get("MESHCA_BENCH_PY_SPY", "")))
            reply({"sampling": True})
        elif line.startswith("sample-stop "):
            stop_py_spy(spy)
            reply({"samples": sampler.stop(Path(line.split(maxsplit=1)[1]))})
        elif line == "cpu":  # this process's CPU seconds (user + system) so far
            reply(
                {
                    "cpu": time.process_time(),
                    "held": len(server.store.identities()),
                    "gc_s": gc_pauses.seconds,
                    "gc_full": gc_pauses.full,
                    "gc_by_generation": gc_pauses.by_generation,
                }
            )
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
    for plain in plain_servers:
        await plain.stop(0)
    await server.stop(0)


# --- the client (this process) -----------------------------------------------------------


class ServerProcess(JsonChild):
    def __init__(
        self,
        root: Path,
        workloads: int = 0,
        cpu: int | None = None,
        gc_mode: str = "serve",
        handshake_timeout: float = 5.0,
    ) -> None:
        pin = ["taskset", "-c", str(cpu)] if cpu is not None and shutil.which("taskset") else []
        super().__init__(
            [
                *pin,
                sys.executable,
                __file__,
                "--role",
                "server",
                "--data-dir",
                str(root / "data"),
                "--socket",
                str(root / "sds.sock"),
                "--workloads",
                str(workloads),
                "--gc",
                gc_mode,
                "--handshake-timeout",
                str(handshake_timeout),
            ],
            "server",
        )


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


async def sds_fanout(
    args: argparse.Namespace, server: ServerProcess, channels: list[Any]
) -> dict[str, Any]:
    before = await server.ask("rss")
    stubs = [sds_pb2_grpc.SecretDiscoveryServiceStub(c) for c in channels]
    streams = [SdsStream(stubs[i % len(stubs)]) for i in range(args.streams)]
    opened = time.monotonic()
    await bounded([s.subscribe() for s in streams], args.max_opening)
    subscribe_all = time.monotonic() - opened
    await asyncio.sleep(0.5)  # let the server settle before measuring memory
    during = await server.ask("rss")
    pushes = [asyncio.ensure_future(s.await_push()) for s in streams]
    cpu_before, client_before = await server.ask("cpu"), time.process_time()
    change = await server.ask("bundle")
    await asyncio.wait_for(asyncio.gather(*pushes), 120)
    seen = await server.ask(f"acks {2 * args.streams}")  # every subscription and push ACKed
    cpu_after, client_after = await server.ask("cpu"), time.process_time()
    if seen["acks"] < 2 * args.streams:
        raise SystemExit(f"the server saw {seen['acks']} ACKs of {2 * args.streams}")
    changed_at = change["changed_at"]
    push = [s.pushed_at - changed_at for s in streams]
    last_ack = seen["at"] - changed_at
    last_ack_sent = max(s.acked_at for s in streams) - changed_at
    server_stats = await server.ask("stats")
    operator = await operator_fanout(args, server, streams) if "operator" in args.cases else {}
    for stream in streams:
        stream.call.cancel()
    return {
        **operator,
        "push_last_s": round(max(push), 4),
        # CPU seconds from just before the change to the last ACK: the server process
        # (every thread), the client process, and the server's cyclic-GC pauses
        "push_server_cpu_s": round(cpu_after["cpu"] - cpu_before["cpu"], 3),
        "push_client_cpu_s": round(client_after - client_before, 3),
        "push_server_gc_s": round(cpu_after["gc_s"] - cpu_before["gc_s"], 3),
        "push_server_gc_full": cpu_after["gc_full"] - cpu_before["gc_full"],
        "push_server_gc_by_generation": gc_delta(cpu_before, cpu_after),
        "push_first_s": round(min(push), 4),
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


def gc_delta(before: dict[str, Any], after: dict[str, Any]) -> list[list[float]]:
    """[collections, CPU seconds] per generation between two ``cpu`` answers."""
    return [
        [a[0] - b[0], round(a[1] - b[1], 3)]
        for a, b in zip(after["gc_by_generation"], before["gc_by_generation"], strict=True)
    ]


def client_tls_files(root: Path) -> tuple[Path, Path, Path]:
    """The bundle, a client chain and its key, as files (0600), for a client in another
    process."""
    from meshca.backends.local import load_local_ca
    from meshca.issuer import Issuer
    from meshca.spiffe import SpiffeId
    from meshca.util.files import PRIVATE, atomic_write

    ca = load_local_ca(root / "data")
    svid = Issuer(ca.authority()).issue(SpiffeId.parse(CLIENT_ID))
    files = (root / "client-bundle.pem", root / "client-chain.pem", root / "client-key.pem")
    contents = (ca.bundle.pem(), svid.chain_pem(), svid.private_key_pem())
    for path, data in zip(files, contents, strict=True):
        atomic_write(path, data, PRIVATE)
    return files


async def go_cases(
    args: argparse.Namespace, root: Path, server: ServerProcess, binary: str
) -> dict[str, Any]:
    """The bundle and operator cases with every stream held by the compiled client (one
    process, a stand-in for Envoys): its CPU is a fraction of the Python client's, so
    the figures are the server's. Multiplexed on ``--channels`` connections over
    ``--transport``; with ``envoy-like`` in ``--cases`` also one mTLS connection per
    stream (``envoy_like_*``). Ratios: the operator case to the in-process change of the
    same run, on the same streams."""
    layouts = [("", args.channels, args.transport)]
    if "envoy-like" in args.cases:
        layouts.append(("envoy_like_", args.streams, "tcp"))
    result: dict[str, Any] = {"client": "go"}
    tls = client_tls_files(root)
    for prefix, connections, transport in layouts:
        acks_before = (await server.ask("stats"))["acks"]
        before = await server.ask("rss")
        go = await go_streams(args, server, binary, connections, transport, tls, args.max_opening)
        try:
            hello = go.hello
            opened = hello["opened"]
            if opened < args.streams:
                raise SystemExit(f"the Go client opened {opened} streams: failed {hello['failed']}")
            await asyncio.sleep(0.5)
            during = await server.ask("rss")
            cpu_before, go_before = await server.ask("cpu"), await go.ask("cpu")
            change = await server.ask("bundle")
            pushed = await go.ask("wait 1 120")
            seen = await server.ask(f"acks {acks_before + 2 * opened}")
            cpu_after, go_after = await server.ask("cpu"), await go.ask("cpu")
            if pushed["received"] < opened:
                raise SystemExit(f"{pushed['received']} of {opened} streams received the change")
            changed_at = change["changed_at"]
            figures: dict[str, Any] = {
                "push_last_s": round(pushed["last"] - changed_at, 4),
                "push_first_s": round(pushed["first"] - changed_at, 4),
                "push_p50_s": round(pushed["p50"] - changed_at, 4),
                "push_p99_s": round(pushed["p99"] - changed_at, 4),
                "push_to_last_ack_s": round(seen["at"] - changed_at, 4),
                "push_server_cpu_s": round(cpu_after["cpu"] - cpu_before["cpu"], 3),
                "push_client_cpu_s": round(go_after["cpu"] - go_before["cpu"], 3),
                "push_server_gc_s": round(cpu_after["gc_s"] - cpu_before["gc_s"], 3),
                "push_server_gc_by_generation": gc_delta(cpu_before, cpu_after),
                "subscribe_all_s": round(hello["open_s"], 4),
                "subscribe_p50_s": round(hello["subscribe_p50_s"], 4),
                "subscribe_p99_s": round(hello["subscribe_p99_s"], 4),
                "server_rss_before_mb": round(before["rss"] / 2**20, 1),
                "server_rss_streams_mb": round(during["rss"] / 2**20, 1),
                "server_bytes_per_stream": round((during["rss"] - before["rss"]) / args.streams),
                "server_active_streams": during["streams"],
            }
            if "operator" in args.cases and not prefix:  # one root rotation per server
                await asyncio.sleep(0.5)
                figures.update(await go_operator(args, server, go, figures["push_last_s"]))
        finally:
            go.stop()
        result.update({prefix + name: value for name, value in figures.items()})
        await asyncio.sleep(0.5)
    if "burst" in args.cases:
        result.update(await go_burst(args, server, binary, tls))
    return result


async def go_streams(
    args: argparse.Namespace,
    server: ServerProcess,
    binary: str,
    connections: int,
    transport: str,
    tls: tuple[Path, Path, Path],
    max_opening: int,
) -> GoStreams:
    """The Go client holding ``--streams`` SDS streams on ``connections`` connections:
    over the Unix socket, or (``tcp``) with mutual TLS to 127.0.0.1, where the server
    listens (the certificate's name is still checked as localhost): a client that
    resolves localhost tries ::1 first, refused, on each connection (Go's took 22 s
    instead of 3 s to open 2,000 connections that way)."""
    if transport == "uds":
        target, files = f"unix:{server.hello['uds']}", None
    else:
        target, files = f"127.0.0.1:{server.hello['port']}", tls
    return await asyncio.to_thread(
        GoStreams,
        binary,
        target,
        streams=args.streams,
        connections=connections,
        max_opening=max_opening,
        tls=files,
        node_id=CLIENT_ID,
    )


async def go_burst(
    args: argparse.Namespace, server: ServerProcess, binary: str, tls: tuple[Path, Path, Path]
) -> dict[str, Any]:
    """Every stream opened at once by the Go client, multiplexed (``--channels`` over the
    Unix socket) and one mTLS connection per stream: how many were answered, the status
    codes of the others, the seconds to open them all, and the server's CPU seconds per
    stream opened (the TLS handshake, for one connection per stream)."""
    results: dict[str, Any] = {}
    for layout, connections, transport in (
        ("multiplexed", args.channels, "uds"),
        ("envoy_like", args.streams, "tcp"),
    ):
        cpu_before = await server.ask("cpu")
        go = await go_streams(args, server, binary, connections, transport, tls, max_opening=0)
        cpu_after = await server.ask("cpu")
        go.stop()
        hello = go.hello
        server_cpu = cpu_after["cpu"] - cpu_before["cpu"]
        results[f"burst_go_{layout}_meshca"] = {
            "answered": hello["opened"],
            "failed": hello["failed"],
            "s": round(hello["open_s"], 2),
            "server_cpu_ms_per_stream": round(1000 * server_cpu / max(1, hello["opened"]), 3),
            "client_cpu_ms_per_stream": round(1000 * hello["cpu"] / max(1, hello["opened"]), 3),
        }
        await asyncio.sleep(1.0)
    return results


async def go_operator(
    args: argparse.Namespace, server: ServerProcess, go: GoStreams, in_process_last: float
) -> dict[str, Any]:
    """:func:`operator_fanout` on the Go client's streams."""
    if args.profile:
        await server.ask("sample-start")
    cpu_before, go_before = await server.ask("cpu"), await go.ask("cpu")
    started = time.monotonic()
    command = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshca", "ca", "rotate-root", "--step", "1",
        "--timeout", "120s", "--json", "--data-dir", str(args.data_dir),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    waiting = asyncio.ensure_future(go.ask("wait 2 120"))
    out, err = await command.communicate()
    replied = time.monotonic()
    if command.returncode != 0:
        raise SystemExit(f"meshca ca rotate-root failed: {err.decode().strip()}")
    pushed = await waiting
    cpu_after, go_after = await server.ask("cpu"), await go.ask("cpu")
    if args.profile:
        path = args.profile / f"operator-go-{args.streams}.stacks"
        await server.ask(f"sample-stop {path}")
    return {
        "operator_start_to_last_push_s": round(pushed["last"] - started, 4),
        "operator_start_to_first_push_s": round(pushed["first"] - started, 4),
        "operator_first_to_last_push_s": round(pushed["last"] - pushed["first"], 4),
        "operator_start_to_reply_s": round(replied - started, 4),
        "operator_server_cpu_s": round(cpu_after["cpu"] - cpu_before["cpu"], 3),
        "operator_client_cpu_s": round(go_after["cpu"] - go_before["cpu"], 3),
        "operator_server_gc_s": round(cpu_after["gc_s"] - cpu_before["gc_s"], 3),
        "operator_server_gc_full": cpu_after["gc_full"] - cpu_before["gc_full"],
        "operator_server_gc_by_generation": gc_delta(cpu_before, cpu_after),
        "operator_reply_bytes": len(out),
        "operator_ratio_vs_in_process": round((pushed["last"] - started) / in_process_last, 2),
    }


async def operator_fanout(
    args: argparse.Namespace, server: ServerProcess, streams: list[SdsStream]
) -> dict[str, Any]:
    """The same bundle change made as an operator makes it: ``meshca ca rotate-root
    --step 1`` (a new root into the bundle) through the running server's admin socket.
    Timed from the moment the command starts to the last stream holding the new bundle,
    and to the command's reply; compared with the in-process change of the same run."""
    pushes = [asyncio.ensure_future(s.await_push()) for s in streams]
    if args.profile:
        await server.ask("sample-start")
    cpu_before, client_before = await server.ask("cpu"), time.process_time()
    started = time.monotonic()
    command = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshca", "ca", "rotate-root", "--step", "1",
        "--timeout", "120s", "--json", "--data-dir", str(args.data_dir),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await command.communicate()
    replied = time.monotonic()
    if command.returncode != 0:
        raise SystemExit(f"meshca ca rotate-root failed: {err.decode().strip()}")
    await asyncio.wait_for(asyncio.gather(*pushes), 120)
    last = max(s.pushed_at for s in streams)
    cpu_after, client_after = await server.ask("cpu"), time.process_time()
    if args.profile:
        path = args.profile / f"operator-{args.streams}.stacks"
        await server.ask(f"sample-stop {path}")
        print(
            f"event-loop stacks of the operator case: {path} (command started at "
            f"{started:.4f}, replied {replied:.4f}, first push "
            f"{min(s.pushed_at for s in streams):.4f}, last {last:.4f})",
            file=sys.stderr,
        )
    return {
        "operator_start_to_last_push_s": round(last - started, 4),
        # the command's own start-up and the server's work before the first push; then
        # the fan-out itself (compare push_last_s - push_first_s of the in-process change)
        "operator_start_to_first_push_s": round(min(s.pushed_at for s in streams) - started, 4),
        "operator_first_to_last_push_s": round(last - min(s.pushed_at for s in streams), 4),
        "operator_start_to_reply_s": round(replied - started, 4),
        # CPU seconds from the command's start to the last push and the reply, whichever
        # is later: the server process, this client process (the command's own process
        # is apart), the server's cyclic-GC pauses
        "operator_server_cpu_s": round(cpu_after["cpu"] - cpu_before["cpu"], 3),
        "operator_client_cpu_s": round(client_after - client_before, 3),
        "operator_server_gc_s": round(cpu_after["gc_s"] - cpu_before["gc_s"], 3),
        "operator_server_gc_full": cpu_after["gc_full"] - cpu_before["gc_full"],
        "operator_server_gc_by_generation": gc_delta(cpu_before, cpu_after),
        "operator_reply_bytes": len(out),
    }


# --- the realistic cases ------------------------------------------------------------------


async def envoy_like_fanout(
    args: argparse.Namespace, root: Path, server: ServerProcess
) -> dict[str, Any]:
    """The bundle fan-out again, each stream on a connection of its own, as each Envoy
    has: mutual TLS on loopback (the Unix socket admits only a few connections per uid)."""
    one_each = argparse.Namespace(**{**vars(args), "channels": args.streams, "transport": "tcp"})
    channels = make_channels(one_each, root, server.hello)
    try:
        result = await sds_fanout(one_each, server, channels)
    finally:
        for channel in channels:
            await channel.close()
    return {f"envoy_like_{name}": value for name, value in result.items()}


async def served_issuance(
    args: argparse.Namespace, server: ServerProcess, channels: list[Any]
) -> dict[str, Any]:
    """New identities over SDS: stream ``i`` asks for workload ``i``'s certificate (one
    caller holding every identity), so each first response is an issuance. Timed from
    the first open to the last certificate received, and in the server's CPU seconds."""
    stubs = [sds_pb2_grpc.SecretDiscoveryServiceStub(c) for c in channels]
    calls: list[Any] = []
    latencies: list[float] = []

    async def open_one(stubs: list[Any], index: int) -> None:
        name = workload_id(index)
        call = stubs[index % len(stubs)].StreamSecrets()
        calls.append(call)
        sent = time.monotonic()
        await call.write(
            discovery_pb2.DiscoveryRequest(
                type_url=SECRET_TYPE,
                resource_names=[name],
                node=base_pb2.Node(id=name, cluster="bench"),
            )
        )
        response = await call.read()
        if response is grpc.aio.EOF or not response.resources:
            raise RuntimeError(f"{name}: stream ended or sent nothing: {await call.code()}")
        latencies.append(time.monotonic() - sent)
        await call.write(
            discovery_pb2.DiscoveryRequest(
                type_url=SECRET_TYPE,
                resource_names=[name],
                version_info=response.version_info,
                response_nonce=response.nonce,
            )
        )

    async def one_pass(stubs: list[Any]) -> tuple[float, float, int]:
        """(seconds, server CPU seconds, identities newly held) of opening every stream."""
        calls.clear()
        latencies.clear()
        before = await server.ask("cpu")
        started = time.monotonic()
        await bounded([open_one(stubs, i) for i in range(args.workloads)], args.max_opening)
        elapsed = time.monotonic() - started
        after = await server.ask("cpu")
        for call in calls:
            call.cancel()
        return elapsed, after["cpu"] - before["cpu"], after["held"] - before["held"]

    elapsed, server_cpu, issued = await one_pass(stubs)
    if issued < args.workloads:
        raise SystemExit(f"the server issued {issued} identities of {args.workloads}")
    p50, p99 = quantile(latencies, 0.5), quantile(latencies, 0.99)
    await asyncio.sleep(0.5)
    # The same streams again: every certificate is held already, so this is the cost of
    # serving alone (gRPC, the engine, authorization), without issuance.
    again, again_cpu, _ = await one_pass(stubs)
    await asyncio.sleep(0.5)
    # The reference: the same streams against a plain grpc.aio servicer (one connection
    # per meshca channel, straight to its socket), what any Python gRPC server costs.
    address = f"unix:{server.hello['plain_raised']}"
    local = [("grpc.use_local_subchannel_pool", 1)]
    plain_channels = [grpc.aio.insecure_channel(address, options=local) for _ in channels]
    plain_stubs = [sds_pb2_grpc.SecretDiscoveryServiceStub(c) for c in plain_channels]
    plain, plain_cpu, _ = await one_pass(plain_stubs)
    for channel in plain_channels:
        await channel.close()
    n = args.workloads
    return {
        "issuance_identities": n,
        "issuance_s": round(elapsed, 4),
        "issuance_per_s": round(n / elapsed, 1),
        "issuance_server_cpu_s": round(server_cpu, 4),
        "issuance_per_server_cpu_s": round(n / server_cpu, 1),
        "issuance_p50_s": round(p50, 4),
        "issuance_p99_s": round(p99, 4),
        "held_per_s": round(n / again, 1),
        "held_per_server_cpu_s": round(n / again_cpu, 1),
        "plain_grpc_per_s": round(n / plain, 1),
        "plain_grpc_per_server_cpu_s": round(n / plain_cpu, 1),
    }


async def open_all_at_once(channels: list[Any], streams: int) -> dict[str, Any]:
    """Open ``streams`` ROOTCA streams at once, with no client-side bound; how many were
    answered, and the status codes that ended the others."""
    stubs = [sds_pb2_grpc.SecretDiscoveryServiceStub(c) for c in channels]
    calls: list[Any] = []

    async def one(index: int) -> str:
        call = stubs[index % len(stubs)].StreamSecrets()
        calls.append(call)
        try:
            await call.write(
                discovery_pb2.DiscoveryRequest(
                    type_url=SECRET_TYPE, resource_names=["ROOTCA"], node=SdsStream.node
                )
            )
            response = await call.read()
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
        return "EOF" if response is grpc.aio.EOF else "OK"

    started = time.monotonic()
    outcomes = await asyncio.gather(*(one(i) for i in range(streams)))
    elapsed = time.monotonic() - started
    for call in calls:
        call.cancel()
    failed = Counter(o for o in outcomes if o != "OK")
    return {"answered": outcomes.count("OK"), "failed": dict(failed), "s": round(elapsed, 2)}


async def burst_opens(
    args: argparse.Namespace, root: Path, server: ServerProcess
) -> dict[str, Any]:
    """Every stream opened at once, against meshca and against plain grpc.aio servers
    (gRPC's default options, and the options meshca's xDS server sets), multiplexed on a
    few connections and one connection per stream (as Envoys connect)."""
    local = [("grpc.use_local_subchannel_pool", 1)]
    results: dict[str, Any] = {}
    for layout, connections in (("multiplexed", args.channels), ("envoy_like", args.streams)):
        for target in ("meshca", "plain_default", "plain_raised"):
            if target == "meshca":
                transport = "tcp" if layout == "envoy_like" else args.transport
                shaped = argparse.Namespace(
                    **{**vars(args), "channels": connections, "transport": transport}
                )
                channels = make_channels(shaped, root, server.hello)
            else:
                address = f"unix:{server.hello[target]}"
                channels = [
                    grpc.aio.insecure_channel(address, options=local) for _ in range(connections)
                ]
            try:
                results[f"burst_{layout}_{target}"] = await open_all_at_once(channels, args.streams)
            finally:
                for channel in channels:
                    await channel.close()
            await asyncio.sleep(0.5)
    return results


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
        args.data_dir = root / "data"
        server = ServerProcess(
            root,
            args.workloads,
            args.server_cpu,
            gc_mode=args.gc,
            handshake_timeout=args.handshake_timeout,
        )
        if args.client == "go":
            binary = sdsclient()
            if binary is None:
                return {"streams": args.streams, "skipped": "no Go client"}
            return {
                "streams": args.streams,
                "channels": args.channels,
                "transport": args.transport,
                **(await go_cases(args, root, server, binary)),
            }
        channels = make_channels(args, root, server.hello)
        result: dict[str, Any] = {
            "streams": args.streams,
            "channels": args.channels,
            "transport": args.transport,
        }
        if "issuance" in args.cases:
            result.update(await served_issuance(args, server, channels))
            await asyncio.sleep(0.5)
        result.update(await sds_fanout(args, server, channels))
        await asyncio.sleep(0.5)
        if "envoy-like" in args.cases:
            result.update(await envoy_like_fanout(args, root, server))
            await asyncio.sleep(0.5)
        if "burst" in args.cases:
            result.update(await burst_opens(args, root, server))
        try:
            baseline = await health_fanout(
                server.ask,
                HEALTH_SERVICE,
                args.streams,
                channels,
                max_opening=args.max_opening,
                timeout=120,
            )
        except grpc.aio.AioRpcError as exc:  # the figures measured so far still count
            result["baseline_error"] = f"{exc.code().name}: {exc.details()}"
        else:
            result["baseline_health_fanout_s"] = round(baseline, 4)
            result["ratio_vs_baseline"] = round(result["push_to_last_ack_s"] / baseline, 2)
        if "operator" in args.cases:  # against the in-process bundle change of this run
            result["operator_ratio_vs_in_process"] = round(
                result["operator_start_to_last_push_s"] / result["push_last_s"], 2
            )
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
    if "skipped" in result:
        print(f"SDS fan-out: skipped: {result['skipped']}")
        print(json.dumps(result))
        return
    held_by = "the Go client" if result.get("client") == "go" else "this Python process"
    print(
        f"SDS fan-out: {n} streams on {result['channels']} {result['transport']} connections, "
        f"held by {held_by}"
    )
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
    if "baseline_error" in result:
        print(f"  baseline (health Watch)    failed: {result['baseline_error']}")
    elif "baseline_health_fanout_s" in result:
        print(
            f"  baseline (health Watch)    {result['baseline_health_fanout_s']:.3f} s "
            f"-> ratio {result['ratio_vs_baseline']:.2f}"
        )
    report_realistic(result)
    if "operator_start_to_last_push_s" in result:
        print(
            f"  meshca ca rotate-root      start -> last push "
            f"{result['operator_start_to_last_push_s']:.3f} s, -> reply "
            f"{result['operator_start_to_reply_s']:.3f} s (goal at 10,000 streams: 2 s); "
            f"ratio to the in-process change ({result['push_last_s']:.3f} s) "
            f"{result['operator_ratio_vs_in_process']:.2f}"
        )
        print(
            f"    of which: start -> first push {result['operator_start_to_first_push_s']:.3f} s "
            f"(the command's start-up, the server's work); first -> last push "
            f"{result['operator_first_to_last_push_s']:.3f} s (in-process: "
            f"{result['push_last_s'] - result['push_first_s']:.3f} s)"
        )
        print(
            f"    CPU seconds: server {result['operator_server_cpu_s']:.2f} "
            f"(GC {result['operator_server_gc_s']:.2f}), client "
            f"{result['operator_client_cpu_s']:.2f}; in-process change: server "
            f"{result['push_server_cpu_s']:.2f} (GC {result['push_server_gc_s']:.2f}), client "
            f"{result['push_client_cpu_s']:.2f}"
        )
    print(json.dumps(result))


def report_realistic(result: dict[str, Any]) -> None:
    for name, burst in result.items():
        if name.startswith("burst_"):
            print(
                f"  all at once: {name[6:]:<26} {burst['answered']} answered, "
                f"failed {burst['failed'] or 'none'} ({burst['s']:.1f} s)"
            )
    if "issuance_per_s" in result:
        print(
            f"  new identities over SDS    {result['issuance_per_s']:.0f}/s "
            f"({result['issuance_identities']} streams, one identity each; "
            f"{result['issuance_per_server_cpu_s']:.0f} per server CPU-second; "
            f"p50 / p99 {result['issuance_p50_s'] * 1000:.0f} / "
            f"{result['issuance_p99_s'] * 1000:.0f} ms)"
        )
        print(
            f"  same streams, already held {result['held_per_s']:.0f}/s "
            f"({result['held_per_server_cpu_s']:.0f} per server CPU-second: serving alone)"
        )
        print(
            f"  plain grpc.aio, same shape {result['plain_grpc_per_s']:.0f}/s "
            f"({result['plain_grpc_per_server_cpu_s']:.0f} per server CPU-second: the ceiling "
            "of any Python gRPC server here)"
        )
    if "envoy_like_push_to_last_ack_s" in result:
        print(
            f"  one connection per stream  bundle change -> last ACK "
            f"{result['envoy_like_push_to_last_ack_s']:.3f} s; subscribe all "
            f"{result['envoy_like_subscribe_all_s']:.2f} s; "
            f"{result['envoy_like_server_bytes_per_stream'] / 1024:.1f} KB per stream"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--channels", type=int, default=0, help="default: one per 250 streams")
    parser.add_argument("--transport", choices=("uds", "tcp"), default="uds")
    parser.add_argument(
        "--cases",
        default="bundle,envoy-like,issuance",
        help=(
            "comma-separated: bundle (always), envoy-like, issuance, burst, operator (the "
            "bundle change made through 'meshca ca rotate-root --step 1')"
        ),
    )
    parser.add_argument(
        "--gc",
        choices=("serve", "default"),
        default="serve",
        help="the server's cyclic GC: as meshca serve sets it, or Python's default",
    )
    parser.add_argument(
        "--workloads", type=int, default=0, help="issuance case: identities (default: --streams)"
    )
    parser.add_argument(
        "--max-opening",
        type=int,
        default=1000,
        help="streams being opened at once (0: no bound, every stream at once)",
    )
    parser.add_argument("--server-cpu", type=int, help="pin the server process to this CPU")
    parser.add_argument(
        "--profile",
        type=Path,
        help="write the server event loop's sampled stacks during the operator case here",
    )
    parser.add_argument(
        "--client",
        choices=("python", "go"),
        default="python",
        help=(
            "who holds the streams of the bundle and operator cases (and envoy-like): this "
            "Python process, or bench/goclient's compiled client (built once; skipped "
            "without Go)"
        ),
    )
    parser.add_argument(
        "--handshake-timeout",
        type=float,
        default=5.0,
        help="the server's TLS handshake timeout in seconds (meshca serve's default: 5)",
    )
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
        asyncio.run(
            serve(args.data_dir, args.socket, args.workloads, args.gc, args.handshake_timeout)
        )
        return
    if args.streams < 1:
        parser.error("--streams must be at least 1")
    args.channels = args.channels or max(1, args.streams // 250)
    args.cases = set(args.cases.split(","))
    if "issuance" in args.cases:
        args.workloads = args.workloads or args.streams
    report(asyncio.run(client(args)))


if __name__ == "__main__":
    main()
