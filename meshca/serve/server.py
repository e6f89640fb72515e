"""``meshca serve`` wiring: CA -> issuer -> secret store -> SDS and ADS -> gRPC server.

One asyncio process: the gRPC server (SDS, ADS, health, reflection) listens on TCP with
mutual TLS and/or, behind the Unix-socket front door, on a private socket. ADS serves
each proxy the clusters, endpoints, listeners and routes generated from the mesh file
for its identity, with the same secrets as SDS (one Secret source for both). meshca's
serving certificate is an SVID from its own store, renewed like any other; new
handshakes pick up the renewed certificate and the current bundle.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc
from cryptography import x509
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from meshca.attest.attestor import Attestor, JoinTokenAttestor
from meshca.attest.entries import EntryStore
from meshca.attest.kube_tokens import KubeTokenAttestor, KubeTokenVerifier
from meshca.attest.records import AgentRecords
from meshca.attest.tokens import TokenStore
from meshca.backends.jwt_key import PublishedJwtAuthorities
from meshca.backends.local import load_local_ca
from meshca.backends.opened import OpenedBackend
from meshca.ca_api.istio import IstioCertificateServicer, add_istio_ca
from meshca.ca_api.service import SERVICE_NAME as AGENT_CA_SERVICE
from meshca.ca_api.service import AgentCaServicer, add_agent_ca_to_server
from meshca.ca_api.sightings import AgentSightings
from meshca.ca_api.sightings_file import sightings_path
from meshca.envoy.mesh import Mesh
from meshca.issuer import Issuer, IssuerError, TtlPolicy
from meshca.issuer.policy import check_signing_ca
from meshca.sds.service import SecretDiscoveryServicer, add_sds_to_server
from meshca.serve.ads import MeshAds
from meshca.serve.agent_acks import AgentAcks
from meshca.serve.bundle_poll import bundle_poll
from meshca.serve.config import ServeConfig, ServeError
from meshca.serve.engine_acks import EveryStream
from meshca.serve.health import HealthMonitor, start_health_listener
from meshca.serve.listeners import grpc_server_options, quiet_loop_errors, raise_open_file_limit
from meshca.serve.mesh_reload import MeshFile
from meshca.serve.metrics import Metrics, MetricsServer
from meshca.serve.rotation import RotationOptions, RotationService, open_rotation
from meshca.serve.sightings_saver import SightingsSaver
from meshca.serve.tls import ServingCredentials, default_dns_names
from meshca.spiffe import SpiffeId, TrustDomain
from meshca.store import (
    DEFAULT_RENEW_BACKOFF,
    BundleChanged,
    SecretStore,
    StoreEvent,
    SvidChanged,
)
from meshca.util.aio import run_until_signalled
from meshca.util.durations import format_duration
from meshca.util.formats import serial_hex
from meshca.util.logger import get_logger
from meshca.util.netaddr import format_address
from meshca.xds.ads import AggregatedDiscoveryServicer, add_ads_to_server
from meshca.xds.auth import CallerAuthenticator
from meshca.xds.limits import CallerLimits
from meshca.xds.server_options import XDS_SERVER_OPTIONS
from meshca.xds.stats import XdsStats
from meshca.xds.uds import DEFAULT_SOCKET_MODE, UdsFrontDoor

if TYPE_CHECKING:
    from meshca.serve.kube import KubeSource

log = get_logger("meshca.server")

SDS_SERVICE = "envoy.service.secret.v3.SecretDiscoveryService"
BACKEND_SERVICE = "meshca.backend"  # gRPC health: NOT_SERVING while the backend cannot sign
ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"


class MeshcaServer:
    """The running server. ``start()`` then ``stop()``; ``run()`` does both around signals."""

    def __init__(self, config: ServeConfig, *, backend: OpenedBackend | None = None) -> None:
        """Wire every part, one constructor per concern, in dependency order. Checks that
        refuse a configuration (ServeError) run before anything is opened."""
        self.config = config
        self.backend = backend or load_local_ca(config.data_dir).opened()
        self.authority = self.backend.authority
        self.trust_domain: TrustDomain = self.authority.trust_domain
        self.server_id = config.server_identity(self.trust_domain)
        self._check_signing_ca()
        self.metrics = Metrics(self.backend.name)
        self.issuer = self._new_issuer()
        self.store = self._new_store()
        self.mesh_file = self._new_mesh_file()
        self.kube = self._new_kube_source()
        self._mesh = self.mesh_file.mesh if self.mesh_file else Mesh.empty(self.trust_domain)
        self.stats = XdsStats()
        self.front_door = self._new_front_door()
        self.authenticator = self._new_authenticator()
        # One budget per caller over SDS and ADS together (docs/serve.md, "Limits").
        self.limits = CallerLimits(config.max_streams_per_caller, config.max_names_per_caller)
        self.servicer = self._new_sds()
        self.ads = MeshAds(lambda: self._mesh, self.servicer.secrets, self.stats, self.limits)
        self.ads_servicer = AggregatedDiscoveryServicer(
            self.ads.engine, self.authenticator, self.servicer.credentials
        )
        # What attested agents fetched and presented: root rotation waits on it too.
        self.agent_records = AgentRecords(config.data_dir)
        self.agent_sightings = AgentSightings()
        self.rotation = self._new_rotation()
        self.sightings_saver = self._new_sightings_saver()
        self.bundle_poll = bundle_poll(  # a backend's own roots (Vault); None: local CA
            self.backend, self.store, self.rotation, interval=config.backend_poll_interval
        )
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]  # not in stubs
        self.health_monitor = self._new_health_monitor()
        self.metrics_server = self._new_metrics_server()
        self.kube_tokens = self._new_kube_tokens()
        self.agent_ca = self._agent_ca()
        self.istio_ca = (
            IstioCertificateServicer(self.agent_ca, self.kube_tokens)
            if self.kube_tokens is not None
            else None
        )
        # listeners, bound by start()
        self.attest_port: int | None = None
        self._attest_server: grpc.aio.Server | None = None
        self._attest_credentials: ServingCredentials | None = None
        self.health_port: int | None = None
        self._health_server: grpc.aio.Server | None = None
        self.credentials: ServingCredentials | None = None
        self.tcp_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._stop_recovery: Callable[[], None] | None = None
        self._stopped = asyncio.Event()

    # construction, one concern each ---------------------------------------------------
    def _check_signing_ca(self) -> None:
        """The start-up CA-lifetime rule, once, for every backend whose CA signs here
        (a backend that signs remotely, Vault per-workload, keeps its CA's lifetime)."""
        signer = self.backend.signer
        if signer is None:
            return
        leaf_ttl = self.config.leaf_ttl
        try:
            check_signing_ca(signer.signer.certificate, leaf_ttl)
        except IssuerError as exc:
            raise ServeError(
                f"refusing to serve with --leaf-ttl {format_duration(leaf_ttl)}: "
                f"the active signing CA: {exc}"
            ) from None

    def _new_issuer(self) -> Issuer:
        config = self.config
        try:
            policy = TtlPolicy(default=config.leaf_ttl, maximum=config.max_leaf_ttl)
        except IssuerError as exc:
            raise ServeError(f"--leaf-ttl: {exc}") from None
        return Issuer(self.authority, policy, issue_observers=[self.metrics.observe_issue])

    def _new_store(self) -> SecretStore:
        config = self.config
        dns = config.server_dns
        if dns is None:
            dns = default_dns_names(config.server_namespace)
        return SecretStore(
            self.issuer,
            ttl=config.leaf_ttl,
            dns_names={self.server_id: tuple(dns)},
            idle_ttl=config.idle_ttl,
            backoff=config.renew_backoff or DEFAULT_RENEW_BACKOFF,
        )

    def _new_mesh_file(self) -> MeshFile | None:
        config = self.config
        if config.mesh_file is None:
            return None
        return MeshFile(
            config.mesh_file,
            self.trust_domain,
            self._mesh_changed,
            interval=config.mesh_poll_interval,
        )

    def _new_kube_source(self) -> KubeSource | None:
        """``--kubernetes``: the mesh from the API server (its client library loads only
        here, never for a mesh file)."""
        if not self.config.kubernetes:
            return None
        from meshca.serve.kube import KubeSource

        return KubeSource.open(self.config, self.trust_domain, self._mesh_changed)

    def _new_front_door(self) -> UdsFrontDoor | None:
        config = self.config
        if config.uds is None:
            return None
        mode = DEFAULT_SOCKET_MODE if config.uds_mode is None else config.uds_mode
        mapped = frozenset(config.uds_identities)
        return UdsFrontDoor(
            config.uds,
            mode=mode,
            private_dir=config.uds_private_dir,
            max_per_uid=config.uds_max_connections_per_uid,
            admits=mapped.__contains__,  # unmapped uids are closed at once
        )

    def _new_authenticator(self) -> CallerAuthenticator:
        return CallerAuthenticator(
            self.trust_domain,
            peer_creds=self.front_door.peer_creds if self.front_door else None,
            uid_identities=dict(self.config.uds_identities),
            bundle=lambda: self.store.bundle(),  # client certificates must chain to it now
        )

    def _new_sds(self) -> SecretDiscoveryServicer:
        # ADS serves the same Secret source (self.servicer.secrets), for one mesh.
        return SecretDiscoveryServicer(
            self.store,
            self.authenticator,
            self._service_identities,
            self.stats,
            self.limits,
            may_reach=self._may_reach,
            node_proxies=self._node_proxies,
        )

    def _new_rotation(self) -> RotationService | None:
        """The CA source the backend declares (the local CA's, Vault's intermediate's)."""
        config = self.config
        return open_rotation(
            config.data_dir,
            self.backend,
            self.store,
            EveryStream((self.servicer.engine, self.ads.engine)),
            config.leaf_ttl,
            RotationOptions.of(config),
            agents=AgentAcks(self.agent_records, self.agent_sightings, self._signing_chains),
        )

    def _new_sightings_saver(self) -> SightingsSaver | None:
        """The agents' ACKs, saved in the data directory by the server that rotates (the
        one that waits on them; a replica beside it leaves the file alone)."""
        if self.rotation is None:
            return None
        saver = SightingsSaver(self.agent_sightings, sightings_path(self.config.data_dir))
        saver.load(self.trust_domain)
        return saver

    def _signing_chains(self) -> list[tuple[x509.Certificate, ...]]:
        """Every signing CA's chain meshca knows (the rotation slots, else the active
        one): how an agent's presented SVID is traced to its root."""
        if self.rotation is not None:
            manager = self.rotation.manager
            cas = [manager.ca(record.id).signer for record in manager.journal.slots]
        elif self.backend.signer is not None:
            cas = [self.backend.signer.signer]
        else:
            return []
        return [(ca.certificate, *ca.intermediates) for ca in cas]

    def _new_health_monitor(self) -> HealthMonitor:
        """One health state for the main server and the plaintext health listener."""
        config = self.config
        monitor = HealthMonitor(
            self.health,
            self.backend,
            self.store,
            services=(SDS_SERVICE, ADS_SERVICE),
            backend_service=BACKEND_SERVICE,
            serving_id=self.server_id if config.listen is not None else None,
            interval=config.health_interval,
        )
        self.issuer.issue_observers.append(monitor.issue_result)
        return monitor

    def _new_metrics_server(self) -> MetricsServer:
        self.metrics.watch(
            stats=self.stats,
            engines={"sds": self.servicer.engine, "ads": self.ads.engine},
            store=self.store,
            backend=self.backend,
            health=self.health_monitor,
        )
        return MetricsServer(self.metrics)

    def _new_kube_tokens(self) -> KubeTokenVerifier | None:
        """Kubernetes service-account tokens, verified against the API server
        (``--kubernetes`` or ``--kube-tokens``: in-cluster, or ``--kubeconfig``)."""
        config = self.config
        if not config.kube_api:
            return None
        from meshca.kube.client import KubeApi, KubeConfigError, load_config  # the client
        from meshca.kube.identity import KubeIdentityApi

        try:
            api = KubeIdentityApi(KubeApi(load_config(config.kubeconfig)[0]))
        except KubeConfigError as exc:
            flag = "--kubernetes" if config.kubernetes else "--kube-tokens"
            raise ServeError(f"{flag}: {exc}") from None
        return KubeTokenVerifier(
            api,
            self.trust_domain,
            audience=config.kube_token_audience,
            node_agents=config.kube_node_agents,
            node_proxy=config.kube_node_proxy,
        )

    def _agent_ca(self) -> AgentCaServicer:
        """The CSR API for ``meshca agent``: join tokens (and Kubernetes tokens) and agent
        records in the data directory, signing through the same issuer as SDS."""
        config = self.config
        attestors: list[Attestor] = [JoinTokenAttestor(TokenStore(config.data_dir))]
        if self.kube_tokens is not None:
            attestors.append(KubeTokenAttestor(self.kube_tokens))
        try:
            return AgentCaServicer(
                self.issuer,
                self.agent_records,
                attestors,
                agent_ttl=config.agent_ttl,
                agent_max_age=config.agent_max_age,
                jwt=(
                    self.rotation.manager.jwt.authorities
                    if self.rotation is not None
                    else PublishedJwtAuthorities(config.data_dir)
                ),
                entries=EntryStore(config.data_dir),
                kube=self.kube_tokens,
                sightings=self.agent_sightings,
            )
        except ValueError as exc:
            raise ServeError(f"--agent-ttl / --agent-max-age: {exc}") from None

    async def _start_attest_listener(self) -> None:
        """TLS without client certificates, serving the CSR API only: an agent's first
        call carries a join token, not a certificate (gRPC cannot make client
        certificates optional on one port, so this is a port of its own)."""
        if self.config.attest_listen is None:
            return
        self.store.retain(self.server_id)
        svid = await self.store.svid(self.server_id)
        self._attest_credentials = ServingCredentials(svid, self.store.bundle())
        server = grpc.aio.server()
        add_agent_ca_to_server(self.agent_ca, server)
        if self.istio_ca is not None:  # Istio's CA API: bearer tokens, no client certificate
            add_istio_ca(self.istio_ca, server)
        host, port = self.config.attest_listen
        address = format_address(host, port)
        try:
            self.attest_port = server.add_secure_port(
                address, self._attest_credentials.server_credentials(require_client_auth=False)
            )
        except RuntimeError:
            raise ServeError(
                f"--attest-listen: cannot listen on {address}: the address is in use or not "
                "available"
            ) from None
        await server.start()
        self._attest_server = server

    # mesh ---------------------------------------------------------------------------
    @property
    def mesh(self) -> Mesh:
        return self._mesh

    def _service_identities(self, namespace: str, service: str) -> tuple[SpiffeId, ...] | None:
        return self._mesh.service_identities(namespace, service)

    def _may_reach(self, caller: SpiffeId, namespace: str, service: str) -> bool:
        return self._mesh.may_reach(caller, namespace, service)

    def _node_proxies(self, identity: SpiffeId) -> frozenset[SpiffeId]:
        return self._mesh.node_proxies_of(identity)

    def _mesh_changed(self, mesh: Mesh) -> None:
        self._mesh = mesh
        self.servicer.resources_changed()
        self.ads.mesh_changed()

    # serving certificate ----------------------------------------------------------------
    def _store_event(self, event: StoreEvent) -> None:
        for credentials in (self.credentials, self._attest_credentials):
            if credentials is None:
                continue
            if isinstance(event, SvidChanged) and event.spiffe_id == self.server_id:
                credentials.update(svid=event.svid)
            elif isinstance(event, BundleChanged):
                credentials.update(bundle=event.bundle)
        if isinstance(event, SvidChanged) and event.spiffe_id == self.server_id:
            log.info("serving certificate renewed: serial=%s", serial_hex(event.svid.serial))
        elif isinstance(event, BundleChanged):
            log.info("trust bundle changed: %d roots", len(event.bundle))

    # lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        config = self.config
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # until judged
        if self.kube is not None:  # never serve a mesh with part of the cluster missing
            self._mesh = await self.kube.first_mesh()
        self.store.start()
        self._unsubscribe = self.store.subscribe(self._store_event)
        if self.backend.health is not None:  # renewals that failed run when it is back
            loop = asyncio.get_running_loop()

            def recovered() -> None:  # in the thread that saw the backend answer
                loop.call_soon_threadsafe(self.store.retry_failing_now)

            self._stop_recovery = self.backend.health.on_recovery(recovered)
        quiet_loop_errors(asyncio.get_running_loop())
        files = raise_open_file_limit()
        if self.front_door is not None:
            self.front_door.max_connections = min(self.front_door.max_connections, files // 8)
        server = grpc.aio.server(options=[*XDS_SERVER_OPTIONS, *grpc_server_options(config, files)])
        add_sds_to_server(self.servicer, server)
        add_ads_to_server(self.ads_servicer, server)
        add_agent_ca_to_server(self.agent_ca, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                SDS_SERVICE,
                ADS_SERVICE,
                AGENT_CA_SERVICE,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        if config.listen is not None:
            self.store.retain(self.server_id)  # never swept as idle
            svid = await self.store.svid(self.server_id)
            self.credentials = ServingCredentials(svid, self.store.bundle())
            host, port = config.listen
            address = format_address(host, port)
            try:
                self.tcp_port = server.add_secure_port(
                    address, self.credentials.server_credentials()
                )
            except RuntimeError:
                raise ServeError(
                    f"cannot listen on {address}: the address is in use or not available"
                ) from None
        if self.front_door is not None:
            server.add_insecure_port(self.front_door.prepare())
        await server.start()
        self._server = server
        if self.front_door is not None:
            try:
                await self.front_door.start()
            except OSError:
                await self.stop(0)
                raise
        if self.mesh_file is not None:
            self.mesh_file.start()
        if self.sightings_saver is not None:
            self.sightings_saver.start()
        if self.rotation is not None:
            await self.rotation.start()
        if self.bundle_poll is not None:
            self.bundle_poll.start()
        await self.health_monitor.start()
        await self._start_side_listeners()
        try:
            await self._start_attest_listener()
        except ServeError:
            await self.stop(0)
            raise
        log.info(
            "serving %s: tcp=%s uds=%s leaf-ttl=%s",
            self.trust_domain,
            (
                format_address(config.listen[0], self.tcp_port)
                if config.listen is not None and self.tcp_port is not None
                else "-"
            ),
            config.uds or "-",
            format_duration(config.leaf_ttl),
        )

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let streams finish for ``grace`` seconds, then close everything."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        await self.health_monitor.stop()
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(self.config.grace if grace is None else grace)
        if self._health_server is not None:
            await self._health_server.stop(0)
        if self._attest_server is not None:
            await self._attest_server.stop(0)
        if self.kube_tokens is not None:
            await self.kube_tokens.close()
        await self.metrics_server.close()
        if self.front_door is not None:
            await self.front_door.close()
        if self.mesh_file is not None:
            await self.mesh_file.stop()
        if self.kube is not None:
            await self.kube.stop()
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._stop_recovery is not None:
            self._stop_recovery()
        if self.bundle_poll is not None:
            await self.bundle_poll.stop()
        if self.rotation is not None:
            await self.rotation.close()
        if self.sightings_saver is not None:
            await self.sightings_saver.close()
        self.servicer.close()
        self.store.stop()
        log.info("stopped")

    async def _start_side_listeners(self) -> None:
        """The plaintext health listener and /metrics, when configured."""
        config = self.config
        flag = ""
        try:
            if config.health_listen is not None:
                flag = "--health-listen"
                self._health_server, self.health_port = await start_health_listener(
                    self.health, *config.health_listen
                )
            if config.metrics_listen is not None:
                flag = "--metrics-listen"
                await self.metrics_server.start(*config.metrics_listen)
        except OSError as exc:
            await self.stop(0)
            raise ServeError(f"{flag}: {exc.strerror or exc}") from None

    async def run(self, on_ready: Callable[[MeshcaServer], None] | None = None) -> None:
        """Start, then serve until SIGTERM or SIGINT, then stop gracefully."""
        ready = (lambda: on_ready(self)) if on_ready is not None else None
        await run_until_signalled(self.start, self.stop, ready, log=log)
