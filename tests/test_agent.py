"""``meshca agent``: the SPIFFE Workload API (py-spiffe as the client) and SDS on its
Unix socket, keys made in the agent, rotations pushed, and service through a meshca
outage. meshca serve and the agent run in-process; the gRPC is real."""

from __future__ import annotations

import asyncio
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from spiffe import WorkloadApiClient, X509Source
from spiffe._proto import workload_pb2, workload_pb2_grpc

from meshca.agent.runtime import MeshcaAgent
from meshca.issuer import IssuerError
from meshca.issuer.keys import public_keys_equal
from tests.ca_api_harness import CaApi, agent_for, ca_api
from tests.serve_harness import fetch, kube_id, short_tempdir

WORKLOAD = kube_id("shop", "web")
OTHER = kube_id("shop", "db")


@dataclass
class Running:
    api: CaApi
    agent: MeshcaAgent
    root: Path

    @property
    def endpoint(self) -> str:
        return f"unix://{self.agent.config.socket}"


@pytest.fixture
async def running() -> AsyncIterator[Running]:
    with short_tempdir() as root:
        async with ca_api(root) as api, agent_for(api, root, WORKLOAD) as agent:
            yield Running(api, agent, root)


async def test_py_spiffe_fetches_an_svid_whose_key_never_left_the_agent(
    running: Running,
) -> None:
    socket = running.agent.config.socket
    assert stat.S_IMODE(socket.stat().st_mode) == 0o600
    with WorkloadApiClient(running.endpoint) as client:
        svid = await asyncio.to_thread(client.fetch_x509_svid, 10)
        bundles = await asyncio.to_thread(client.fetch_x509_bundles, 10)
    assert str(svid.spiffe_id) == str(WORKLOAD)
    # The key is the agent's: meshca's store never held a key for this identity.
    assert running.api.server.store.cached(WORKLOAD) is None
    held = running.agent.store.cached(WORKLOAD)
    assert held is not None and held.private_key is not None
    assert public_keys_equal(svid.leaf.public_key(), held.private_key.public_key())
    bundle = bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
    assert bundle is not None and len(bundle.x509_authorities) == 1


async def test_a_rotation_reaches_a_streaming_x509_source(running: Running) -> None:
    source = await asyncio.to_thread(
        X509Source, socket_path=running.endpoint, timeout_in_seconds=10
    )
    try:
        first = source.get_x509_context().default_svid.leaf.serial_number
        renewed = await running.agent.store.renew(WORKLOAD)
        for _ in range(200):
            if source.get_x509_context().default_svid.leaf.serial_number == renewed.serial:
                break
            await asyncio.sleep(0.05)
        assert source.get_x509_context().default_svid.leaf.serial_number == renewed.serial != first
    finally:
        await asyncio.to_thread(source.close)


async def test_calls_without_the_security_header_are_refused(running: Running) -> None:
    async with grpc.aio.insecure_channel(f"unix:{running.agent.config.socket}") as channel:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        call = stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "workload.spiffe.io" in (info.value.details() or "")


async def test_sds_on_the_agent_socket_serves_the_workload_and_nobody_else(
    running: Running,
) -> None:
    async with grpc.aio.insecure_channel(f"unix:{running.agent.config.socket}") as channel:
        for name in ("default", str(WORKLOAD), "ROOTCA", "spiffe://cluster.local"):
            secrets = await fetch(channel, [name])
            assert secrets[0].name == name
        (own,) = await fetch(channel, ["default"])
        chain = own.tls_certificate.certificate_chain.inline_bytes
        assert chain.startswith(running.agent.store.cached(WORKLOAD).chain_pem())  # type: ignore[union-attr]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await fetch(channel, [str(OTHER)])
    assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED


async def test_cached_svids_are_served_while_meshca_is_down(running: Running) -> None:
    with WorkloadApiClient(running.endpoint) as client:
        before = await asyncio.to_thread(client.fetch_x509_svid, 10)
    await running.api.server.stop(0)
    with pytest.raises(IssuerError):  # meshca is gone: renewing fails...
        await running.agent.store.renew(WORKLOAD)
    with pytest.raises(IssuerError):
        await running.agent.poll_once()
    with WorkloadApiClient(running.endpoint) as client:
        after = await asyncio.to_thread(client.fetch_x509_svid, 10)
    assert after.leaf.serial_number == before.leaf.serial_number  # ...the cached SVID is served


async def test_a_renewal_in_a_worker_thread_wakes_the_renewal_loop_through_its_loop(
    running: Running,
) -> None:
    """``renew_now`` runs in a worker thread while the renewal loop waits on the event
    loop; asyncio's debug mode refuses a wake-up queued from another thread, which is what
    setting the loop's event directly from there did (the loop could sleep on past it)."""
    loop = asyncio.get_running_loop()
    loop.set_debug(True)
    try:
        credential = running.agent.credential
        before = credential.renewals
        await asyncio.to_thread(credential.renew_now)
        assert credential.renewals == before + 1
    finally:
        loop.set_debug(False)


async def test_the_agent_follows_ca_and_root_rotations_without_stranding_itself(
    running: Running,
) -> None:
    agent, server = running.agent, running.api.server
    assert server.rotation is not None
    operations = server.rotation.operations
    source = await asyncio.to_thread(
        X509Source, socket_path=running.endpoint, timeout_in_seconds=10
    )
    try:
        # A new signing CA: the next poll renews the agent SVID and the workload's.
        await operations.rotate()
        await agent.poll_once()
        signer = server.authority.current()[0]  # type: ignore[attr-defined]
        agent_svid = agent.credential.svid
        workload = agent.store.cached(WORKLOAD)
        assert agent_svid is not None and workload is not None
        assert agent_svid.intermediates == signer.chain == workload.intermediates
        # The root, one step at a time, the agent polling between steps.
        for step in range(1, 6):
            await operations.rotate_root(step=step, rollback=False, timeout=timedelta(seconds=5))
            await agent.poll_once()
            assert agent.client.bundle == server.store.bundle()
        assert len(server.store.bundle()) == 1
        # After the old root is gone the agent still renews (its SVID is under the new
        # root) and the Workload API stream has delivered the new bundle and SVID.
        await asyncio.to_thread(agent.credential.renew_now)
        svid = await agent.store.renew(WORKLOAD)
        for _ in range(200):
            context = source.get_x509_context()
            if context.default_svid.leaf.serial_number == svid.serial:
                break
            await asyncio.sleep(0.05)
        bundle = context.x509_bundle_set.get_bundle_for_trust_domain(
            context.default_svid.spiffe_id.trust_domain
        )
        assert context.default_svid.leaf.serial_number == svid.serial
        assert bundle is not None and set(bundle.x509_authorities) == set(server.store.bundle())
    finally:
        await asyncio.to_thread(source.close)


async def test_a_restarted_agent_resumes_without_a_new_token(running: Running) -> None:
    """The agent SVID is kept (0600) in the agent's data directory; the token was spent."""
    first = running.agent.credential.svid
    assert first is not None
    saved = running.agent.config.data_dir / "agent"
    assert {p.name: p.stat().st_mode & 0o777 for p in saved.iterdir()} == {
        "agent-svid.pem": 0o600,
        "agent-key.pem": 0o600,
    }
    await running.agent.stop()
    restarted = MeshcaAgent(running.agent.config)  # same token file: already used
    await restarted.start()
    try:
        assert restarted.credential.svid is not None
        assert restarted.credential.svid.spiffe_id == first.spiffe_id
        assert restarted.credential.svid.serial != first.serial  # renewed, not re-attested
        with WorkloadApiClient(running.endpoint) as client:
            svid = await asyncio.to_thread(client.fetch_x509_svid, 10)
        assert str(svid.spiffe_id) == str(WORKLOAD)
    finally:
        await restarted.stop()


async def test_the_agent_exposes_prometheus_metrics(running: Running) -> None:
    """Wired as 'meshca agent --metrics-listen' wires it: serve's registry and endpoint."""
    from meshca.agent.metrics import BACKEND
    from meshca.serve.metrics import Metrics, MetricsServer

    await running.agent.stop()
    metrics = Metrics(BACKEND)
    config = replace(running.agent.config, metrics_listen=("127.0.0.1", 0))
    agent = MeshcaAgent(config, metrics=metrics, metrics_server=MetricsServer(metrics))
    await agent.start()
    try:
        await agent.store.svid(WORKLOAD)
        assert agent.metrics_server is not None and agent.metrics_server.port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", agent.metrics_server.port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        text = (await reader.read()).decode()
        writer.close()
    finally:
        await agent.stop()
    assert text.startswith("HTTP/1.1 200")
    assert 'meshca_certificates_issued_total{backend="agent",result="success"}' in text
    for name in (
        "meshca_agent_svid_expiry_timestamp_seconds",
        "meshca_agent_reattest_by_timestamp_seconds",
        "meshca_agent_meshca_reachable 1.0",
        'meshca_agent_streams{api="workload_api"}',
        "meshca_served_certificates 1.0",
    ):
        assert name in text, name
