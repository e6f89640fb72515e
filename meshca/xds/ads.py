"""The Aggregated Discovery Service: the same engine, several resource types on one stream.

Give it an engine built with one source per type, in the order Envoy needs them
(clusters, endpoints, listeners, routes, secrets); each request names its type URL.
The Secret source of the SDS servicer can be shared (``SecretDiscoveryServicer.secrets``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Coroutine
from typing import Any

import grpc.aio
from envoy.service.discovery.v3 import ads_pb2_grpc

from meshca.xds.auth import Caller, CallerAuthenticator, Context, authenticate_or_abort
from meshca.xds.credentials import CredentialWatch
from meshca.xds.engine import XdsEngine
from meshca.xds.wire import add_discovery_service

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"


class AggregatedDiscoveryServicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """StreamAggregatedResources (SotW) and DeltaAggregatedResources over ``engine``."""

    def __init__(
        self,
        engine: XdsEngine,
        authenticator: CallerAuthenticator,
        credentials: CredentialWatch | None = None,
    ) -> None:
        self.engine = engine
        self.authenticator = authenticator
        self.credentials = credentials  # ends streams whose client certificate lapses

    async def StreamAggregatedResources(
        self, request_iterator: AsyncIterator[Any], context: Context
    ) -> None:
        caller = await authenticate_or_abort(self.authenticator, self.engine.stats, context)
        await self._serve(caller, self.engine.run_sotw(caller, request_iterator, context), context)

    async def DeltaAggregatedResources(
        self, request_iterator: AsyncIterator[Any], context: Context
    ) -> None:
        caller = await authenticate_or_abort(self.authenticator, self.engine.stats, context)
        await self._serve(caller, self.engine.run_delta(caller, request_iterator, context), context)

    async def _serve(
        self, caller: Caller, call: Coroutine[Any, Any, None], context: Context
    ) -> None:
        if self.credentials is None:
            await call
        else:
            await self.credentials.serve(caller, call, context)


def add_ads_to_server(servicer: AggregatedDiscoveryServicer, server: grpc.aio.Server) -> None:
    add_discovery_service(
        server,
        ADS_SERVICE,
        sotw=servicer.StreamAggregatedResources,
        delta=servicer.DeltaAggregatedResources,
    )
