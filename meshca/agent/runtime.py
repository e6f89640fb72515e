"""``meshca agent``'s wiring: credential -> CSR client -> secret store -> SDS and the
Workload API on one Unix socket.

Start-up: load the saved agent SVID (or attest with the join token), then listen. Then
three things run until stopped: the agent SVID's renewal, a poll of meshca's bundle and
signing CA (``--poll-interval``), and the store's own renewal of workload SVIDs at
half-life with jitter. When meshca is down, renewals back off and the cached SVIDs keep
being served until they expire; nothing is written to disk but the agent's own SVID.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from meshca.agent.authority import RemoteAuthority
from meshca.agent.ca_client import (
    JOIN_TOKEN,
    CaClient,
    CaRefused,
    CaUnavailable,
    ServerState,
)
from meshca.agent.callers import NodeAuthenticator, SidecarAuthenticator
from meshca.agent.credential import AgentCredential, AgentError
from meshca.agent.jwt import JwtSvids
from meshca.agent.metrics import MetricsEndpoint, MetricsRegistry, register_agent_collector
from meshca.agent.workload_api import WorkloadApiServicer, add_workload_api_to_server
from meshca.ca_api.sightings import root_sha256
from meshca.issuer import Issuer, IssuerError, TrustBundle, TtlPolicy
from meshca.sds.service import SecretDiscoveryServicer, add_sds_to_server
from meshca.spiffe import SpiffeId
from meshca.store import SecretStore
from meshca.util.aio import run_until_signalled
from meshca.util.logger import get_logger
from meshca.xds.auth import CallerAuthenticator
from meshca.xds.stats import XdsStats
from meshca.xds.uds import UdsFrontDoor

log = get_logger("meshca.agent")

DEFAULT_SOCKET_MODE = 0o600
DEFAULT_POLL_INTERVAL = 5.0
WARM_RETRY = 2.0


@dataclass(frozen=True)
class AgentConfig:
    server: str  # HOST:PORT of meshca serve's mutual-TLS listener
    attest_server: str | None  # HOST:PORT of its --attest-listen (None: same as server)
    bundle: TrustBundle  # roots to trust meshca with until it sends its own
    data_dir: Path  # where the agent SVID is kept
    socket: Path
    token_file: Path | None = None
    attestor: str = JOIN_TOKEN  # or "k8s": the token file holds a projected SA token
    socket_mode: int = DEFAULT_SOCKET_MODE
    leaf_ttl: timedelta | None = None  # None: meshca's leaf TTL
    poll_interval: float = DEFAULT_POLL_INTERVAL
    metrics_listen: tuple[str, int] | None = None  # Prometheus /metrics (plain HTTP)
    private_dir: Path | None = None  # the front door's (tests: a short path)


class MeshcaAgent:
    def __init__(
        self,
        config: AgentConfig,
        *,
        metrics: MetricsRegistry | None = None,
        metrics_server: MetricsEndpoint | None = None,
    ) -> None:
        self.config = config
        self.client = CaClient(
            config.server,
            config.bundle.trust_domain,
            config.bundle,
            attest_server=config.attest_server,
        )
        self.credential = AgentCredential(
            self.client, config.data_dir, config.token_file, attestor=config.attestor
        )
        self.authority = RemoteAuthority(self.client, config.leaf_ttl)
        self.metrics_server = metrics_server
        self.poll_failures = 0
        observers = [metrics.observe_issue] if metrics is not None else []
        self.issuer = Issuer(self.authority, TtlPolicy(), issue_observers=observers)
        if metrics is not None:
            register_agent_collector(metrics.registry, self)
        self.store = SecretStore(self.issuer, ttl=config.leaf_ttl)
        self.jwt = JwtSvids(self.client)
        self.front_door = UdsFrontDoor(
            config.socket, mode=config.socket_mode, private_dir=config.private_dir
        )
        self.stats = XdsStats()
        self.identity: SpiffeId | None = None  # sidecar mode's one identity
        self.node: NodeAuthenticator | None = None  # node mode's entries
        self.sds: SecretDiscoveryServicer | None = None
        self.workload_api: WorkloadApiServicer | None = None
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]  # not in stubs
        self._server: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False
        self._reported: tuple[TrustBundle | None, tuple[bytes, ...]] = (None, ())

    async def start(self) -> None:
        try:
            await asyncio.to_thread(self.credential.establish)
        except (CaRefused, CaUnavailable) as exc:
            raise AgentError(f"cannot attest at meshca: {exc}") from None
        state = await asyncio.to_thread(self.client.fetch_bundle, (), self._held_roots())
        self.jwt.update_bundle(state.jwt_bundle)
        self._apply_bundle(state)  # the --trust-bundle file may be older than meshca's
        authenticator: CallerAuthenticator
        if state.node:
            self.node = NodeAuthenticator(self.client.trust_domain, self.front_door.peer_creds)
            self.node.update(state.entries)
            authenticator = self.node
        else:
            if len(state.entitled) != 1:
                raise AgentError(
                    "a sidecar-mode agent needs exactly one workload identity; meshca "
                    f"entitles it to {len(state.entitled)}"
                )
            self.identity = state.entitled[0]
            authenticator = SidecarAuthenticator(self.identity, self.front_door.peer_creds)
        self.sds = SecretDiscoveryServicer(self.store, authenticator, lambda ns, svc: None)
        self.workload_api = WorkloadApiServicer(self.store, authenticator, self.jwt)
        self.store.start()
        if self.identity is not None:  # sidecar: the agent exists for it, never idle
            self.store.retain(self.identity)
        server = grpc.aio.server()
        add_sds_to_server(self.sds, server)
        add_workload_api_to_server(self.workload_api, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        server.add_insecure_port(self.front_door.prepare())
        await server.start()
        self._server = server
        await self.front_door.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        if self.config.metrics_listen is not None and self.metrics_server is not None:
            try:
                await self.metrics_server.start(*self.config.metrics_listen)
            except OSError as exc:
                await self.stop()
                raise AgentError(f"--metrics-listen: {exc.strerror or exc}") from None
        self._tasks = [
            asyncio.create_task(self.credential.run(), name="agent-svid"),
            asyncio.create_task(self._poll(), name="agent-poll"),
        ]
        if self.identity is not None:
            self._tasks.append(asyncio.create_task(self._warm(), name="agent-warm"))
        log.info("serving %s on unix:%s", self.serving, self.config.socket)

    @property
    def serving(self) -> str:
        if self.identity is not None:
            return str(self.identity)
        entries = self.node.entries if self.node is not None else ()
        return f"{len(entries)} registration entries (node mode)"

    async def _warm(self) -> None:
        """Get the workload's SVID before anyone asks, so it is cached if meshca goes down."""
        assert self.identity is not None
        while True:
            try:
                await self.store.svid(self.identity)
                return
            except IssuerError as exc:
                log.warning("cannot get the SVID of %s yet: %s", self.identity, exc)
                await asyncio.sleep(WARM_RETRY)

    async def poll_once(self) -> None:
        """Follow meshca: a changed bundle is pushed to every stream; SVIDs from a CA
        meshca no longer signs with are renewed at once (so a root rotation's last step,
        which drops the old root, finds nothing of this agent still under it)."""
        state = await asyncio.to_thread(self.client.fetch_bundle, self.jwt.kids, self._held_roots())
        self.jwt.update_bundle(state.jwt_bundle)
        if self.node is not None:
            self.node.update(state.entries)
        self._apply_bundle(state)
        svid = self.credential.svid
        if svid is not None and not state.issued(svid):
            await asyncio.to_thread(self.credential.renew_now)
        stale = [sid for sid in self.store.identities() if not self._current(sid, state)]
        for spiffe_id in stale:
            await self.store.renew(spiffe_id)

    def _apply_bundle(self, state: ServerState) -> None:
        """Push the fetched bundle to every stream when it differs from what they hold
        (not from the client's bundle: a renewal's answer updates that one alone)."""
        if state.bundle != self.store.bundle():
            self.client.use(bundle=state.bundle)
            self.store.refresh_bundle()
            log.info("trust bundle changed: %d roots", len(state.bundle))

    def _held_roots(self) -> tuple[bytes, ...]:
        """The SHA-256 of each root of the bundle every stream holds (the store notifies
        them as it adopts a bundle): reported at the next poll, the ACK a root rotation
        waits for."""
        bundle = self.store.bundle()
        if self._reported[0] is not bundle:
            self._reported = (bundle, tuple(root_sha256(root) for root in bundle))
        return self._reported[1]

    def _current(self, spiffe_id: SpiffeId, state: ServerState) -> bool:
        svid = self.store.cached(spiffe_id)
        return svid is None or state.issued(svid)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_interval)
            try:
                await self.poll_once()
                if self.poll_failures:
                    log.info("meshca reachable again after %d failed poll(s)", self.poll_failures)
                self.poll_failures = 0
            except IssuerError as exc:
                self.poll_failures += 1
                if self.poll_failures == 1:
                    log.warning("cannot reach meshca (%s): serving cached SVIDs", exc)

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.metrics_server is not None:
            await self.metrics_server.close()
        await self.front_door.close()
        if self._server is not None:
            await self._server.stop(0)
        if self.sds is not None:
            self.sds.close()
        self.store.stop()
        self.client.close()

    async def run(self, on_ready: Callable[[MeshcaAgent], None] | None = None) -> None:
        """Start, then serve until SIGTERM or SIGINT, then stop."""
        ready = (lambda: on_ready(self)) if on_ready is not None else None
        await run_until_signalled(self.start, self.stop, ready)
