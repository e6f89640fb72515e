"""A real SDS server for tests, and clients with chosen identities.

``async with sds_harness(tmp_path) as h:`` starts a grpc.aio server on 127.0.0.1 with
the Secret Discovery Service over mutual TLS, its certificates issued by a real local
CA created in ``tmp_path``; ``h.mtls_channel(identity)`` connects as that identity. It
also listens in plaintext on 127.0.0.1 (a caller with no certificate at all) and,
with ``uds=True``, on a Unix socket through meshca's SO_PEERCRED relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.rpc import status_pb2

from meshca.backends.local import LocalCa, init_local_ca
from meshca.envoy.mesh import AccessPolicy, Mesh, Service
from meshca.issuer import Issuer, X509Svid
from meshca.issuer.keys import private_key_pem
from meshca.sds.service import SecretDiscoveryServicer, add_sds_to_server
from meshca.spiffe import SpiffeId, TrustDomain
from meshca.store import SecretStore
from meshca.xds.ads import AggregatedDiscoveryServicer, add_ads_to_server
from meshca.xds.auth import CallerAuthenticator
from meshca.xds.engine import ResourceSource, XdsEngine
from meshca.xds.resources import SECRET_TYPE
from meshca.xds.stats import XdsStats

TRUST_DOMAIN = TrustDomain("cluster.local")
SERVER_ID = SpiffeId.from_kubernetes("meshca", "meshca", TRUST_DOMAIN)
SERVER_NAME = "localhost"
# A client that never reads: no window growth, so the server's writes to it block early.
NO_WINDOW_GROWTH = (("grpc.http2.bdp_probe", 0),)
TIMEOUT = 10.0
CLIENT_TTL = timedelta(days=2)  # a bootstrap certificate longer-lived than served SVIDs

DEFAULT_SERVICES = (
    Service(
        name="bookstore",
        namespace="bookstore",
        ports=(),
        service_accounts=("bookstore-v1", "bookstore-v2"),
    ),
    Service(name="bookbuyer", namespace="bookbuyer", ports=(), service_accounts=("bookbuyer",)),
)


def k8s(namespace: str, account: str) -> SpiffeId:
    return SpiffeId.from_kubernetes(namespace, account, TRUST_DOMAIN)


# bookbuyer may call bookstore (so it may learn who serves it), and nothing else is allowed
DEFAULT_POLICIES = (AccessPolicy("bookstore/bookstore", (k8s("bookbuyer", "bookbuyer"),)),)


@dataclass
class MeshRef:
    """The current mesh, swappable under a running servicer."""

    mesh: Mesh

    def service_identities(self, namespace: str, service: str) -> tuple[SpiffeId, ...] | None:
        return self.mesh.service_identities(namespace, service)

    def may_reach(self, caller: SpiffeId, namespace: str, service: str) -> bool:
        return self.mesh.may_reach(caller, namespace, service)

    def node_proxies(self, identity: SpiffeId) -> frozenset[SpiffeId]:
        return self.mesh.node_proxies_of(identity)


@dataclass
class SdsHarness:
    """A running server and what it was built from; ``close`` stops everything."""

    ca: LocalCa
    issuer: Issuer
    store: SecretStore
    servicer: SecretDiscoveryServicer
    server: grpc.aio.Server
    port: int
    plain_port: int
    bundle_pem: bytes
    mesh_ref: MeshRef
    ads_engine: XdsEngine
    uds_path: Path | None = None
    _channels: list[grpc.aio.Channel] = field(default_factory=list)

    @property
    def stats(self) -> XdsStats:
        return self.servicer.stats

    def set_mesh(self, mesh: Mesh) -> None:
        """Replace the mesh (as a reload of the mesh file would) and tell the servicer."""
        self.mesh_ref.mesh = mesh
        self.servicer.resources_changed()

    def _track(self, channel: grpc.aio.Channel) -> grpc.aio.Channel:
        self._channels.append(channel)
        return channel

    def client_svid(self, identity: SpiffeId, ttl: timedelta = CLIENT_TTL) -> X509Svid:
        """A client certificate for ``identity``; it outlives what the server issues (24 h),
        whose SVIDs never outlive the certificate that asks for them."""
        return self.issuer.issue(identity, ttl=ttl)

    def mtls_channel(
        self,
        identity: SpiffeId | None = None,
        svid: X509Svid | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> Any:
        """A channel presenting a client certificate for ``identity`` (or ``svid``)."""
        if svid is None:
            assert identity is not None
            svid = self.client_svid(identity)
        assert svid.private_key is not None
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.bundle_pem,
            private_key=private_key_pem(svid.private_key),
            certificate_chain=svid.chain_pem(),
        )
        return self.tls_channel(credentials, options)

    def tls_channel_without_certificate(self) -> Any:
        return self.tls_channel(grpc.ssl_channel_credentials(root_certificates=self.bundle_pem))

    def tls_channel(
        self, credentials: grpc.ChannelCredentials, options: Sequence[tuple[str, Any]] = ()
    ) -> Any:
        """A channel to the mutual-TLS port with any ``credentials``."""
        every = [("grpc.ssl_target_name_override", SERVER_NAME), *options]
        return self._track(
            grpc.aio.secure_channel(f"127.0.0.1:{self.port}", credentials, options=every)
        )

    def plaintext_channel(self) -> Any:
        return self._track(grpc.aio.insecure_channel(f"127.0.0.1:{self.plain_port}"))

    def uds_channel(self) -> Any:
        assert self.uds_path is not None, "start the harness with uds=True"
        return self._track(grpc.aio.insecure_channel(f"unix:{self.uds_path}"))

    def stub(self, channel: Any) -> Any:
        return sds_pb2_grpc.SecretDiscoveryServiceStub(channel)

    def ads_stub(self, channel: Any) -> Any:
        return ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)

    async def close_channels(self) -> None:
        for channel in self._channels:
            await channel.close()
        self._channels.clear()


@asynccontextmanager
async def sds_harness(
    tmp_path: Path,
    *,
    services: Sequence[Service] = DEFAULT_SERVICES,
    policies: Sequence[AccessPolicy] = DEFAULT_POLICIES,
    uid_identities: Mapping[int, Sequence[SpiffeId]] | None = None,
    uds: bool = False,
    ads_sources: Sequence[ResourceSource] = (),
    absent_types: Iterable[str] = (),
    mesh: Mesh | None = None,
) -> AsyncIterator[SdsHarness]:
    """Also serves ADS: an engine with ``ads_sources`` followed by the Secret source
    (``absent_types``: the ADS engine's types whose unknown names are absent). ``mesh``
    replaces the one made of ``services`` and ``policies``."""
    ca = init_local_ca(tmp_path / "data", TRUST_DOMAIN)
    issuer = Issuer(ca.authority())
    bundle_pem = ca.bundle.pem()
    server_svid = issuer.issue(SERVER_ID, dns_names=(SERVER_NAME,))
    assert server_svid.private_key is not None
    async with contextlib.AsyncExitStack() as cleanup:  # undone in reverse, even half-built
        store = SecretStore(issuer)
        cleanup.callback(store.stop)
        door: Any = None
        if uds:
            from meshca.xds.uds import UdsFrontDoor  # the server's relay

            socket_dir = Path(tempfile.mkdtemp(prefix="sds-", dir="/tmp"))
            cleanup.callback(shutil.rmtree, socket_dir, True)
            door = UdsFrontDoor(socket_dir / "sds.sock")
            cleanup.push_async_callback(door.close)
        authenticator = CallerAuthenticator(
            TRUST_DOMAIN,
            peer_creds=door.peer_creds if door is not None else None,
            uid_identities=uid_identities,
        )
        mesh_ref = MeshRef(
            mesh or Mesh(TRUST_DOMAIN, services=tuple(services), policies=tuple(policies))
        )
        servicer = SecretDiscoveryServicer(
            store,
            authenticator,
            mesh_ref.service_identities,
            may_reach=mesh_ref.may_reach,
            node_proxies=mesh_ref.node_proxies,
        )
        cleanup.callback(servicer.close)
        server = grpc.aio.server()
        add_sds_to_server(servicer, server)
        ads_engine = XdsEngine(
            [*ads_sources, servicer.secrets], servicer.stats, absent_types=absent_types
        )
        add_ads_to_server(AggregatedDiscoveryServicer(ads_engine, authenticator), server)
        credentials = grpc.ssl_server_credentials(
            [(private_key_pem(server_svid.private_key), server_svid.chain_pem())],
            root_certificates=bundle_pem,
            require_client_auth=True,
        )
        port = server.add_secure_port("127.0.0.1:0", credentials)
        plain_port = server.add_insecure_port("127.0.0.1:0")
        if door is not None:
            server.add_insecure_port(door.prepare())
        await server.start()
        cleanup.push_async_callback(server.stop, None)
        if door is not None:
            await door.start()
        harness = SdsHarness(
            ca,
            issuer,
            store,
            servicer,
            server,
            port,
            plain_port,
            bundle_pem,
            mesh_ref,
            ads_engine,
            uds_path=door.public_path if door is not None else None,
        )
        cleanup.push_async_callback(harness.close_channels)
        yield harness


# --- requests and responses ------------------------------------------------------------


def node(node_id: str = "", **metadata: str) -> Any:
    result = base_pb2.Node(id=node_id, cluster="test")
    for key, value in metadata.items():
        result.metadata.fields[key].string_value = value
    return result


def sotw(
    names: Iterable[str] = (),
    *,
    nonce: str = "",
    version: str = "",
    node_id: str | None = None,
    error: str | None = None,
    type_url: str = SECRET_TYPE,
) -> Any:
    request = discovery_pb2.DiscoveryRequest(
        resource_names=list(names),
        type_url=type_url,
        response_nonce=nonce,
        version_info=version,
    )
    if node_id is not None:
        request.node.CopyFrom(node(node_id))
    if error is not None:
        request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return request


def delta(
    subscribe: Iterable[str] = (),
    unsubscribe: Iterable[str] = (),
    *,
    nonce: str = "",
    initial: Mapping[str, str] | None = None,
    node_id: str | None = None,
    error: str | None = None,
    type_url: str = SECRET_TYPE,
) -> Any:
    request = discovery_pb2.DeltaDiscoveryRequest(
        type_url=type_url,
        resource_names_subscribe=list(subscribe),
        resource_names_unsubscribe=list(unsubscribe),
        initial_resource_versions=dict(initial or {}),
        response_nonce=nonce,
    )
    if node_id is not None:
        request.node.CopyFrom(node(node_id))
    if error is not None:
        request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return request


def bodies(response: Any) -> list[Any]:
    """The packed resources (``Any``) of a DiscoveryResponse or DeltaDiscoveryResponse."""
    return [
        item.resource if isinstance(item, discovery_pb2.Resource) else item
        for item in response.resources
    ]


def secrets_of(response: Any) -> dict[str, Any]:
    """``name -> Secret`` of a DiscoveryResponse or DeltaDiscoveryResponse."""
    secrets = [secret_pb2.Secret.FromString(body.value) for body in bodies(response)]
    return {secret.name: secret for secret in secrets}


class Stream:
    """One client stream (SotW or Delta) with reads that fail loudly instead of hanging."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self._pending: asyncio.Future[Any] | None = None

    def _read(self) -> asyncio.Future[Any]:
        if self._pending is None:
            self._pending = asyncio.ensure_future(self.call.read())
        return self._pending

    async def send(self, request: Any) -> None:
        """Write ``request``. A server that ends the call before reading (a refused
        caller) makes gRPC fail the write itself with INTERNAL; what the client is told
        is the call's own status, which is raised instead."""
        try:
            await self.call.write(request)
        except grpc.aio.AioRpcError as exc:
            code = await self.call.code()
            if code in (grpc.StatusCode.OK, exc.code()):
                raise
            raise grpc.aio.AioRpcError(
                code,
                await self.call.initial_metadata(),
                await self.call.trailing_metadata(),
                await self.call.details(),
            ) from exc

    async def recv(self, timeout: float = TIMEOUT) -> Any:
        response = await asyncio.wait_for(asyncio.shield(self._read()), timeout)
        self._pending = None
        assert response is not grpc.aio.EOF, "the server ended the stream"
        return response

    async def error(self, timeout: float = TIMEOUT) -> grpc.aio.AioRpcError:
        """Read until the call fails; returns the error (fails the test if it does not)."""
        try:
            while True:
                response = await asyncio.wait_for(asyncio.shield(self._read()), timeout)
                self._pending = None
                assert response is not grpc.aio.EOF, "the stream ended without an error"
        except grpc.aio.AioRpcError as exc:
            return exc

    async def nothing_within(self, seconds: float) -> bool:
        """True when no response arrives within ``seconds`` (used only to check silence)."""
        done, _ = await asyncio.wait({self._read()}, timeout=seconds)
        return not done

    def cancel(self) -> None:
        self.call.cancel()


async def open_sotw(stub: Any, *requests: Any) -> Stream:
    """A state-of-the-world stream on an SDS or an ADS stub."""
    method = getattr(stub, "StreamSecrets", None) or stub.StreamAggregatedResources
    stream = Stream(method())
    for request in requests:
        await stream.send(request)
    return stream


async def open_delta(stub: Any, *requests: Any) -> Stream:
    """A delta stream on an SDS or an ADS stub."""
    method = getattr(stub, "DeltaSecrets", None) or stub.DeltaAggregatedResources
    stream = Stream(method())
    for request in requests:
        await stream.send(request)
    return stream


async def wait_until(predicate: Any, timeout: float = TIMEOUT, what: str = "condition") -> None:
    """Poll ``predicate`` (plain or async) on the loop until it holds (bounded, never a
    timing assertion)."""

    async def holds() -> bool:
        result = predicate()
        return bool(await result if inspect.isawaitable(result) else result)

    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while not await holds():
                await asyncio.sleep(0.01)
    assert await holds(), f"timed out waiting for {what}"
