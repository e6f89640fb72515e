"""The gRPC Secret Discovery Service: StreamSecrets, DeltaSecrets, FetchSecrets.

A thin shell: it authenticates the caller (UNAUTHENTICATED when that fails) and hands
the call to the xDS engine with the Secret source. Protocol rules live in
:mod:`meshca.xds.engine`, authorization in :mod:`meshca.sds.secrets`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio
from envoy.service.secret.v3 import sds_pb2_grpc

from meshca.sds.secrets import MayReach, NodeProxies, SecretSource
from meshca.spiffe import SpiffeId
from meshca.store import BundleChanged, SecretStore, StoreEvent
from meshca.util.logger import get_logger
from meshca.xds.auth import Caller, CallerAuthenticator, Context, authenticate_or_abort
from meshca.xds.credentials import CredentialWatch
from meshca.xds.engine import XdsEngine
from meshca.xds.limits import CallerLimits
from meshca.xds.resources import SECRET_TYPE
from meshca.xds.stats import XdsStats
from meshca.xds.wire import add_discovery_service

log = get_logger("meshca.sds")

SDS_SERVICE = "envoy.service.secret.v3.SecretDiscoveryService"


class SecretDiscoveryServicer(sds_pb2_grpc.SecretDiscoveryServiceServicer):  # type: ignore[misc]
    """Serves the store's secrets to authenticated callers over all three SDS RPCs."""

    def __init__(
        self,
        store: SecretStore,
        authenticator: CallerAuthenticator,
        service_identities: Callable[[str, str], tuple[SpiffeId, ...] | None],
        stats: XdsStats | None = None,
        limits: CallerLimits | None = None,
        may_reach: MayReach | None = None,
        node_proxies: NodeProxies | None = None,
    ) -> None:
        self.store = store
        self.authenticator = authenticator
        self.stats = stats or XdsStats()
        self.secrets = SecretSource(store, service_identities, may_reach, node_proxies)
        self.engine = XdsEngine([self.secrets], self.stats, limits=limits)
        # ends a stream whose client certificate expires or leaves the bundle's trust
        self.credentials = CredentialWatch(store.bundle)
        self._unsubscribe = store.subscribe(self._on_store_event)

    def resources_changed(self) -> None:
        """An input other than the store changed (the mesh file): recompute every stream."""
        self.engine.wake_all()

    def close(self) -> None:
        """Stop listening to the store (the server is shutting down)."""
        self.secrets.close()
        self._unsubscribe()

    def _on_store_event(self, event: StoreEvent) -> None:
        if isinstance(event, BundleChanged):
            self.credentials.bundle_changed()

    async def _authenticate(self, context: Context) -> Caller:
        return await authenticate_or_abort(self.authenticator, self.stats, context)

    async def StreamSecrets(self, request_iterator: AsyncIterator[Any], context: Context) -> None:
        caller = await self._authenticate(context)
        await self.credentials.serve(
            caller,
            self.engine.run_sotw(caller, request_iterator, context, default_type_url=SECRET_TYPE),
            context,
        )

    async def DeltaSecrets(self, request_iterator: AsyncIterator[Any], context: Context) -> None:
        caller = await self._authenticate(context)
        await self.credentials.serve(
            caller,
            self.engine.run_delta(caller, request_iterator, context, default_type_url=SECRET_TYPE),
            context,
        )

    async def FetchSecrets(self, request: Any, context: Context) -> Any:
        caller = await self._authenticate(context)
        return await self.engine.fetch(caller, request, context, default_type_url=SECRET_TYPE)


def add_sds_to_server(servicer: SecretDiscoveryServicer, server: grpc.aio.Server) -> None:
    add_discovery_service(
        server,
        SDS_SERVICE,
        sotw=servicer.StreamSecrets,
        delta=servicer.DeltaSecrets,
        fetch=servicer.FetchSecrets,
    )
