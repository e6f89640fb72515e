"""meshca agent: CSR signing over gRPC, and Workload API fan-out after a rotation.

Run: ``.venv/bin/python bench/agent.py [--agents 8] [--seconds 5] [--streams 1000]``
(``--smoke``: tiny counts, for the test that runs every bench, unless given;
``--streams 0``: signing figures only; ``--profile FILE``: a cProfile of meshca serve's
event loop while it signs).

A child process hosts ``meshca serve`` (mutual TLS and the attestation listener on
loopback) and one ``meshca agent`` (sidecar mode) on a Unix socket, both in-process,
and obeys one-line commands on stdin. This process is the client.

Figures (signing is reported twice: per wall-clock second, and per CPU-second of the
server process, utime + stime from /proc/PID/stat over the same interval; on 2 shared
cores the wall figure also pays for the bench's client threads, the CPU figure is the
server's own cost per call):
  csr_per_s            SignWorkload calls/s at meshca serve from ``--agents`` concurrent
                       agents (each its own agent SVID and connection, one thread each)
  csr_per_server_cpu_s the same calls per CPU-second of the meshca serve process
  sign_csr_per_s       baseline: ``Issuer.sign_csr`` in this process, same CSR, one core
  sign_csr_per_cpu_s   the same per CPU-second of the thread that signs
  csr_ratio            csr_per_s / sign_csr_per_s (goal >= 0.5)
  csr_ratio_per_cpu    csr_per_server_cpu_s / sign_csr_per_cpu_s (goal >= 0.5)
  plain_grpc_per_s     the floor: a grpc.aio unary method in the same process that only
                       reads the caller's certificate and answers as many bytes, behind
                       the same mutual TLS, from as many clients (and per server CPU-s);
                       csr_over_plain_grpc(_per_cpu) = SignWorkload's share of it
  batch_csr_per_s      the same agents sending BatchSignWorkload calls of ``--batch`` CSRs
                       (what ``meshca agent`` sends when several SVIDs are due at once),
                       counted per CSR; batch_csr_per_server_cpu_s, batch_csr_ratio and
                       batch_csr_ratio_per_cpu as above (a separate figure: the single-CSR
                       one stays the headline)
  fanout_s             from a renewal in the agent until every one of ``--streams``
                       ``FetchX509SVID`` streams has the new SVID
  baseline_health_s    the same fan-out of gRPC health ``Watch`` status changes over the
                       same connections; ``fanout_ratio`` = fanout_s / baseline_health_s
  agent_bytes_per_stream  RSS growth of the child while the streams are open, / N
  fanout_spread_s      first to last stream receiving the new SVID (the push itself)
SPIRE (spire-server + spire-agent v1.13.3, built once from the Go module proxy by
``bench/spire_build.sh`` into ~/.cache/meshca/spire-<version>/bin; see
``benchlib/spire.py``) runs in the same run without ``--smoke``: its signing rate
(``MintX509SVID`` from as many concurrent clients) and its Workload API fan-out to as
many streams, with the ratios meshca/SPIRE (signing: ``meshca_over_spire_signing`` per
wall second, ``meshca_over_spire_signing_per_server_cpu`` per spire-server CPU-second).
Without Go it says "skipped: no Go"; with ``--smoke`` it is skipped (a first build takes
many minutes). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import functools
import gc
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from benchlib import spire
from benchlib.child import JsonChild
from benchlib.fanout import health_fanout, workload_api_fanout
from benchlib.rate import Rate, concurrent_calls
from grpc_health.v1 import health_pb2

WORKLOAD = "spiffe://cluster.local/ns/bench/sa/web"
HEALTH_SERVICE = "bench"
PLAIN_REPLY = b"\x00" * 1500  # about a SvidResponse: leaf, CA and root DER
DEFAULTS = {"agents": 8, "seconds": 5.0, "streams": 1000, "channels": 10, "batch": 16}
SMOKE = {"agents": 2, "seconds": 0.5, "streams": 20, "channels": 2, "batch": 4}  # --smoke


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --- the child: meshca serve + meshca agent, in-process ---------------------------------


async def host(root: Path) -> None:
    from meshca.agent.runtime import AgentConfig, MeshcaAgent
    from meshca.attest.tokens import TokenStore
    from meshca.backends.local import init_local_ca
    from meshca.serve.config import ServeConfig
    from meshca.serve.server import MeshcaServer
    from meshca.spiffe import SpiffeId, TrustDomain

    raise_fd_limit()
    data = root / "data"
    init_local_ca(data, TrustDomain("cluster.local"))
    server = MeshcaServer(
        ServeConfig(
            data_dir=data,
            listen=("127.0.0.1", 0),
            attest_listen=("127.0.0.1", 0),
            grace=0.0,
        )
    )
    await server.start()
    plain, plain_port = await plain_server(server)
    tokens = TokenStore(data)
    identity = SpiffeId.parse(WORKLOAD)
    token_file = root / "agent.token"
    token_file.write_text(tokens.create(identity)[0])
    agent = MeshcaAgent(
        AgentConfig(
            server=f"localhost:{server.tcp_port}",
            attest_server=f"localhost:{server.attest_port}",
            bundle=server.store.bundle(),
            data_dir=root / "agent-data",
            socket=root / "agent.sock",
            token_file=token_file,
            poll_interval=3600.0,
        )
    )
    await agent.start()
    await agent.store.svid(identity)
    await agent.health.set(HEALTH_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    loop = asyncio.get_running_loop()

    def reply(document: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(document) + "\n")
        sys.stdout.flush()

    reply(
        {
            "port": server.tcp_port,
            "plain_port": plain_port,
            "attest_port": server.attest_port,
            "socket": str(agent.config.socket),
            "bundle": server.store.bundle().pem().decode(),
        }
    )
    status = health_pb2.HealthCheckResponse.SERVING
    profile: cProfile.Profile | None = None
    while True:
        line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
        if line in ("", "quit"):
            break
        if line == "profile":  # cProfile of the event loop's thread, until "profile-dump"
            profile = cProfile.Profile()
            profile.enable()
            reply({})
        elif line.startswith("profile-dump ") and profile is not None:
            profile.disable()
            profile.dump_stats(line.split(" ", 1)[1])
            profile = None
            reply({})
        elif line == "token":
            reply({"token": tokens.create(identity)[0]})
        elif line == "rss":
            gc.collect()
            reply({"rss": rss_bytes()})
        elif line == "rotate":
            changed_at = time.monotonic()
            svid = await agent.store.renew(identity)
            reply({"changed_at": changed_at, "serial": svid.serial})
        elif line == "health":
            status = (
                health_pb2.HealthCheckResponse.NOT_SERVING
                if status == health_pb2.HealthCheckResponse.SERVING
                else health_pb2.HealthCheckResponse.SERVING
            )
            changed_at = time.monotonic()
            await agent.health.set(HEALTH_SERVICE, status)
            reply({"changed_at": changed_at})
    await agent.stop()
    await plain.stop(0)
    await server.stop(0)


async def plain_server(server: Any) -> tuple[grpc.aio.Server, int]:
    """The floor: a grpc.aio unary method that does nothing but read the caller's
    certificate (as the CSR API must) and answer a SvidResponse's worth of bytes, behind
    the same mutual TLS as meshca serve, in the same process."""
    from meshca.serve.tls import ServingCredentials

    async def echo(request: bytes, context: Any) -> bytes:
        context.auth_context()
        return PLAIN_REPLY

    plain = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(echo)
    plain.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("bench.Plain", {"Echo": handler}),)
    )
    credentials = ServingCredentials(
        await server.store.svid(server.server_id), server.store.bundle()
    )
    port = plain.add_secure_port("127.0.0.1:0", credentials.server_credentials())
    await plain.start()
    return plain, port


class Child(JsonChild):
    def __init__(self, root: Path) -> None:
        super().__init__(
            [sys.executable, __file__, "--role", "host", "--root", str(root)], "meshca"
        )


# --- CSR signing throughput ---------------------------------------------------------------


def workload_csr_der() -> bytes:
    from cryptography.hazmat.primitives import serialization

    from meshca.issuer.authority import workload_csr
    from meshca.issuer.keys import generate_private_key
    from meshca.spiffe import SpiffeId

    csr = workload_csr(generate_private_key(), SpiffeId.parse(WORKLOAD), ())
    return csr.public_bytes(serialization.Encoding.DER)


def sign_csr_rate(seconds: float, csr: bytes) -> tuple[float, float]:
    """The baseline: Issuer.sign_csr in this process, one thread; (per wall-clock second,
    per CPU-second of that thread)."""
    from meshca.backends.local import init_local_ca, load_local_ca
    from meshca.issuer import Issuer
    from meshca.spiffe import SpiffeId, TrustDomain

    with tempfile.TemporaryDirectory() as tmp:
        init_local_ca(Path(tmp) / "ca", TrustDomain("cluster.local"))
        issuer = Issuer(load_local_ca(Path(tmp) / "ca").authority())
        spiffe_id = SpiffeId.parse(WORKLOAD)
        count, started, cpu = 0, time.perf_counter(), time.thread_time()
        while time.perf_counter() - started < seconds:
            issuer.sign_csr(spiffe_id, csr)
            count += 1
        return count / (time.perf_counter() - started), count / (time.thread_time() - cpu)


def attested_client(child: Child) -> tuple[Any, Any]:
    """A CSR API client of the bench's ``meshca serve`` and what its join token got it
    (an agent SVID and the trust bundle): one agent, its own connection."""
    from meshca.agent.ca_client import CaClient
    from meshca.issuer import TrustBundle
    from meshca.issuer.keys import generate_private_key
    from meshca.spiffe import TrustDomain

    td = TrustDomain("cluster.local")
    client = CaClient(
        f"localhost:{child.hello['port']}",
        td,
        TrustBundle.from_pem(td, child.hello["bundle"].encode()),
        attest_server=f"localhost:{child.hello['attest_port']}",
    )
    return client, client.attest(child.ask_sync("token")["token"], generate_private_key())


def csr_rate(
    child: Child,
    agents: int,
    seconds: float,
    csr: bytes,
    profile: Path | None = None,
    batch: int = 0,
) -> Rate:
    """SignWorkload calls from ``agents`` threads (each its own agent SVID and connection);
    with ``batch``, BatchSignWorkload calls of that many CSRs each, counted per CSR."""
    from meshca.spiffe import SpiffeId

    spiffe_id = SpiffeId.parse(WORKLOAD)
    clients = []
    for _ in range(agents):
        client, signed = attested_client(child)
        client.use(signed.svid, signed.bundle)
        client.sign(spiffe_id, csr)  # connect and warm up
        clients.append(client)
    if batch:
        entries = [(spiffe_id, csr, None)] * batch
        calls = [functools.partial(client.sign_batch, entries) for client in clients]
    else:
        calls = [functools.partial(client.sign, spiffe_id, csr) for client in clients]
    if profile is not None:
        child.ask_sync("profile")
    try:
        return concurrent_calls(calls, seconds, server_pid=child.process.pid, weight=max(batch, 1))
    finally:
        if profile is not None:
            child.ask_sync(f"profile-dump {profile.resolve()}")
        for client in clients:
            client.close()


def plain_rate(child: Child, agents: int, seconds: float, csr: bytes) -> Rate:
    """The floor: the plain unary method of :func:`plain_server` from as many threads,
    each with its own agent SVID and connection, sending a CSR's worth of bytes."""
    channels, calls = [], []
    for _ in range(agents):
        client, signed = attested_client(child)
        client.close()
        svid = signed.svid
        credentials = grpc.ssl_channel_credentials(
            signed.bundle.pem(), svid.private_key_pem(), svid.chain_pem()
        )
        channel = grpc.secure_channel(f"localhost:{child.hello['plain_port']}", credentials)
        call = channel.unary_unary("/bench.Plain/Echo")
        call(csr, timeout=30)  # connect and warm up
        channels.append(channel)
        calls.append(functools.partial(call, csr, timeout=30))
    try:
        return concurrent_calls(calls, seconds, server_pid=child.process.pid)
    finally:
        for channel in channels:
            channel.close()


# --- Workload API fan-out -----------------------------------------------------------------


async def fanout(child: Child, streams: int, channels: list[Any]) -> dict[str, Any]:
    async def rss() -> int:
        return int((await child.ask("rss"))["rss"])

    async def change() -> float:
        return float((await child.ask("rotate"))["changed_at"])

    try:
        fan = await workload_api_fanout(streams, channels, rss, change)
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from None
    return {
        "fanout_s": fan["from_change_s"],
        "fanout_spread_s": fan["spread_s"],
        "agent_rss_before_mb": fan["rss_before_mb"],
        "agent_rss_streams_mb": fan["rss_streams_mb"],
        "agent_bytes_per_stream": fan["bytes_per_stream"],
    }


async def spire_peer(args: argparse.Namespace, csr: bytes, meshca: dict[str, Any]) -> Any:
    """SPIRE's figures in this run, with meshca/SPIRE ratios; or why it is skipped."""
    if shutil.which("go") is None:
        return "skipped: no Go"
    if args.smoke:
        return "skipped: --smoke (run without it to build and measure SPIRE)"
    bin_dir, why = await asyncio.to_thread(spire.binaries)
    if bin_dir is None:
        return why
    root = Path(tempfile.mkdtemp(prefix="mca-spire-", dir="/tmp"))
    peer = spire.Spire(bin_dir, root)
    channels: list[Any] = []
    fan: dict[str, Any] = {}
    try:
        await asyncio.to_thread(peer.start)
        await spire.wait_for_svid(peer)
        rate = await asyncio.to_thread(peer.mint_rate, args.agents, args.seconds, csr)
        if args.streams:
            options = [("grpc.use_local_subchannel_pool", 1)]
            channels = [
                grpc.aio.insecure_channel(f"unix:{peer.agent_socket}", options=options)
                for _ in range(args.channels)
            ]
            fan = await spire.fanout(peer, args.streams, channels)
    except (RuntimeError, OSError, grpc.RpcError, TimeoutError) as exc:
        return f"failed: {exc} (logs in {root})"
    finally:
        for channel in channels:
            await channel.close()
        await asyncio.to_thread(peer.stop)
    shutil.rmtree(root, ignore_errors=True)
    per_cpu = rate.per_server_cpu_s or 0.0
    result: dict[str, Any] = {
        "version": spire.SPIRE_VERSION,
        "mint_per_s": round(rate.per_s, 1),
        "mint_per_server_cpu_s": round(per_cpu, 1),
        "mint_server_cpu_s": round(rate.server_cpu_s or 0.0, 2),
        "mint_client_cpu_s": round(rate.client_cpu_s, 2),
        "mint_vs_meshca_sign_csr": round(rate.per_s / meshca["sign_csr_per_s"], 3),
        "meshca_over_spire_signing": round(meshca["csr_per_s"] / rate.per_s, 2),
        "meshca_over_spire_signing_per_server_cpu": round(
            meshca["csr_per_server_cpu_s"] / per_cpu, 2
        )
        if per_cpu
        else None,
    }
    if "batch_csr_per_s" in meshca:
        result["meshca_batch_over_spire_signing"] = round(meshca["batch_csr_per_s"] / rate.per_s, 2)
        result["meshca_batch_over_spire_signing_per_server_cpu"] = (
            round(meshca["batch_csr_per_server_cpu_s"] / per_cpu, 2) if per_cpu else None
        )
    if fan:
        per_stream = fan["agent_bytes_per_stream"]
        result.update(fan)
        result["meshca_over_spire_fanout_spread"] = round(
            meshca["fanout_spread_s"] / max(fan["spread_s"], 1e-6), 2
        )
        result["meshca_over_spire_bytes_per_stream"] = (
            round(meshca["agent_bytes_per_stream"] / per_stream, 2) if per_stream > 0 else None
        )
    return result


async def signing(args: argparse.Namespace, child: Child, csr: bytes) -> dict[str, Any]:
    baseline, baseline_cpu = sign_csr_rate(args.seconds, csr)
    rate = await asyncio.to_thread(csr_rate, child, args.agents, args.seconds, csr, args.profile)
    per_cpu = rate.per_server_cpu_s or 0.0
    result = {
        "agents": args.agents,
        "csr_per_s": round(rate.per_s, 1),
        "csr_per_server_cpu_s": round(per_cpu, 1),
        "csr_server_cpu_s": round(rate.server_cpu_s or 0.0, 2),
        "csr_client_cpu_s": round(rate.client_cpu_s, 2),
        "csr_seconds": round(rate.seconds, 2),
        "sign_csr_per_s": round(baseline, 1),
        "sign_csr_per_cpu_s": round(baseline_cpu, 1),
        "csr_ratio": round(rate.per_s / baseline, 3),
        "csr_ratio_per_cpu": round(per_cpu / baseline_cpu, 3),
        "goal_csr_ratio_0_5": rate.per_s / baseline >= 0.5,
        "goal_csr_ratio_per_cpu_0_5": per_cpu / baseline_cpu >= 0.5,
    }
    floor = await asyncio.to_thread(plain_rate, child, args.agents, args.seconds, csr)
    floor_cpu = floor.per_server_cpu_s or 0.0
    result.update(
        {
            "plain_grpc_per_s": round(floor.per_s, 1),
            "plain_grpc_per_server_cpu_s": round(floor_cpu, 1),
            "csr_over_plain_grpc": round(rate.per_s / floor.per_s, 3),
            "csr_over_plain_grpc_per_cpu": round(per_cpu / floor_cpu, 3) if floor_cpu else None,
        }
    )
    if args.batch:
        batched = await asyncio.to_thread(
            csr_rate, child, args.agents, args.seconds, csr, None, args.batch
        )
        batch_cpu = batched.per_server_cpu_s or 0.0
        result.update(
            {
                "batch": args.batch,
                "batch_csr_per_s": round(batched.per_s, 1),
                "batch_csr_per_server_cpu_s": round(batch_cpu, 1),
                "batch_server_cpu_s": round(batched.server_cpu_s or 0.0, 2),
                "batch_client_cpu_s": round(batched.client_cpu_s, 2),
                "batch_csr_ratio": round(batched.per_s / baseline, 3),
                "batch_csr_ratio_per_cpu": round(batch_cpu / baseline_cpu, 3),
            }
        )
    return result


async def fanout_figures(args: argparse.Namespace, child: Child) -> dict[str, Any]:
    """The Workload API fan-out and its health-Watch baseline over the same connections."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [
        grpc.aio.insecure_channel(f"unix:{child.hello['socket']}", options=options)
        for _ in range(args.channels)
    ]
    try:
        result = {"streams": args.streams, "channels": args.channels}
        result.update(await fanout(child, args.streams, channels))
        await asyncio.sleep(0.3)
        health = await health_fanout(
            child.ask, HEALTH_SERVICE, args.streams, channels, max_opening=500, timeout=300
        )
        result["baseline_health_s"] = round(health, 4)
        result["fanout_ratio"] = round(result["fanout_s"] / health, 2)
        return result
    finally:
        for channel in channels:
            await channel.close()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    raise_fd_limit()
    load_start = [round(x, 2) for x in os.getloadavg()]
    root = Path(tempfile.mkdtemp(prefix="mca-agent-bench-"))
    child: Child | None = None
    try:
        child = Child(root)
        csr = workload_csr_der()
        result: dict[str, Any] = {"load_average_start": load_start}
        result.update(await signing(args, child, csr))
        if args.streams:
            result.update(await fanout_figures(args, child))
        result["spire"] = await spire_peer(args, csr, result)
        result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        return result
    finally:
        if child is not None:
            child.stop()
        shutil.rmtree(root, ignore_errors=True)


def report(result: dict[str, Any]) -> None:
    peer = result["spire"]
    print(
        f"CSR signing at meshca serve over gRPC, {result['agents']} concurrent agents "
        f"({result['csr_seconds']} s: meshca serve used {result['csr_server_cpu_s']} CPU-s, "
        f"the bench's client threads {result['csr_client_cpu_s']} CPU-s)"
    )
    print("                                   per wall s   per server CPU-s")
    print(
        f"  gRPC SignWorkload (mutual TLS)   {result['csr_per_s']:10.0f}   "
        f"{result['csr_per_server_cpu_s']:16.0f}"
    )
    print(
        f"  in-process sign_csr (1 thread)   {result['sign_csr_per_s']:10.0f}   "
        f"{result['sign_csr_per_cpu_s']:16.0f}  (per CPU-s of its thread)"
    )
    print(
        f"  ratio (goal >= 0.5)              {result['csr_ratio']:10.2f}   "
        f"{result['csr_ratio_per_cpu']:16.2f}"
    )
    print(
        f"  plain grpc.aio unary, same mTLS  {result['plain_grpc_per_s']:10.0f}   "
        f"{result['plain_grpc_per_server_cpu_s']:16.0f}  (the floor: no signing)"
    )
    print(
        f"  SignWorkload / plain             {result['csr_over_plain_grpc']:10.2f}   "
        f"{result['csr_over_plain_grpc_per_cpu']:16.2f}"
    )
    if "batch" in result:
        print(
            f"  gRPC BatchSignWorkload, {result['batch']:2d}/call "
            f"{result['batch_csr_per_s']:10.0f}   "
            f"{result['batch_csr_per_server_cpu_s']:16.0f}  (CSRs; server used "
            f"{result['batch_server_cpu_s']} CPU-s)"
        )
        print(
            f"  batch ratio (goal >= 0.5)        {result['batch_csr_ratio']:10.2f}   "
            f"{result['batch_csr_ratio_per_cpu']:16.2f}"
        )
    if isinstance(peer, dict):
        print(
            f"  SPIRE MintX509SVID (no TLS)      {peer['mint_per_s']:10.0f}   "
            f"{peer['mint_per_server_cpu_s']:16.0f}  (spire-server used "
            f"{peer['mint_server_cpu_s']} CPU-s)"
        )
        print(
            f"  meshca/SPIRE (goal >= 1)         {peer['meshca_over_spire_signing']:10.2f}   "
            f"{peer['meshca_over_spire_signing_per_server_cpu']:16.2f}"
        )
        if "meshca_batch_over_spire_signing" in peer:
            print(
                f"  meshca batch/SPIRE (goal >= 1)   "
                f"{peer['meshca_batch_over_spire_signing']:10.2f}   "
                f"{peer['meshca_batch_over_spire_signing_per_server_cpu']:16.2f}"
            )
    if "fanout_s" in result:
        print(
            f"Workload API fan-out: {result['streams']} FetchX509SVID streams on "
            f"{result['channels']} connections"
        )
        print(f"  renewal -> last stream   {result['fanout_s']:.3f} s")
        print(
            f"  baseline (health Watch)  {result['baseline_health_s']:.3f} s "
            f"-> ratio {result['fanout_ratio']:.2f}"
        )
        print(
            f"  agent memory per stream  {result['agent_bytes_per_stream'] / 1024:.1f} KB "
            f"(RSS {result['agent_rss_before_mb']} -> {result['agent_rss_streams_mb']} MB)"
        )
    print(f"load average {result['load_average_start']} -> {result['load_average_end']}")
    if not isinstance(peer, dict):
        print(f"SPIRE: {peer}")
        return
    if "spread_s" in peer:
        print(f"SPIRE {peer['version']} fan-out in the same run")
        print(
            f"  first -> last stream           {peer['spread_s']:.3f} s (meshca "
            f"{result['fanout_spread_s']:.3f} s -> ratio "
            f"{peer['meshca_over_spire_fanout_spread']})"
        )
        print(
            f"  entry update -> last stream    {peer['from_update_s']:.3f} s (includes the "
            "agent's sync with the server)"
        )
        print(
            f"  spire-agent memory per stream  {peer['agent_bytes_per_stream'] / 1024:.1f} KB "
            f"-> meshca/SPIRE {peer['meshca_over_spire_bytes_per_stream']}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=("client", "host"), default="client")
    parser.add_argument("--root", type=Path)
    parser.add_argument("--agents", type=int, help="concurrent signing clients (8)")
    parser.add_argument("--seconds", type=float, help="of each signing measure (5)")
    parser.add_argument("--streams", type=int, help="Workload API streams (1000; 0: no fan-out)")
    parser.add_argument("--channels", type=int, help="connections the streams share (10)")
    parser.add_argument(
        "--batch", type=int, help="CSRs per BatchSignWorkload call (16; 0: no batch figure)"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="write a cProfile of meshca serve's event loop during SignWorkload here",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny counts (the bench test)")
    args = parser.parse_args()
    if args.role == "host":
        asyncio.run(host(args.root))
        return
    defaults = SMOKE if args.smoke else DEFAULTS
    for name, value in defaults.items():  # what is given on the command line is kept
        if getattr(args, name) is None:
            setattr(args, name, value)
    result = asyncio.run(main_async(args))
    report(result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
