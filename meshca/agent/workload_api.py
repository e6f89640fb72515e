"""The SPIFFE Workload API (``SpiffeWorkloadAPI``) on the agent's socket.

Per the SPIFFE Workload Endpoint and Workload API specs: every call must carry the
``workload.spiffe.io: true`` metadata header (refused with INVALID_ARGUMENT otherwise,
which keeps a browser or a confused proxy from reaching it through an SSRF), a caller
with no identity gets PERMISSION_DENIED, and the streaming calls send a new message
whenever an SVID or the bundle changes. The messages are py-spiffe's generated ones.

The caller's identities come from the same authenticator as SDS (the socket's peer);
the SVIDs from the same secret store, so a rotation reaches SDS streams and Workload
API streams together.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio
from cryptography.hazmat.primitives import serialization
from google.protobuf import struct_pb2
from spiffe._proto import workload_pb2, workload_pb2_grpc

from meshca.agent.jwt import JwtSvids
from meshca.issuer import IssuerError, TrustBundle, X509Svid
from meshca.issuer.jwt_svid import JwtError
from meshca.spiffe import SpiffeId
from meshca.store import BundleChanged, SecretStore, StoreEvent, SvidChanged
from meshca.util.logger import get_logger
from meshca.xds.auth import AuthError, CallerAuthenticator

log = get_logger("meshca.agent.workload_api")

Context = grpc.aio.ServicerContext[Any, Any]
HEADER = "workload.spiffe.io"
SERVICE_NAME = "SpiffeWorkloadAPI"
MAX_CACHED_RESPONSES = 1024


def _der(certs: Any) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.DER) for c in certs)


def x509_svid_message(svid: X509Svid, bundle: TrustBundle) -> workload_pb2.X509SVID:
    assert svid.private_key is not None
    key = svid.private_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return workload_pb2.X509SVID(
        spiffe_id=str(svid.spiffe_id),
        x509_svid=_der(svid.chain),
        x509_svid_key=key,
        bundle=_der(bundle),
    )


class WorkloadApiServicer(workload_pb2_grpc.SpiffeWorkloadAPIServicer):
    def __init__(
        self, store: SecretStore, authenticator: CallerAuthenticator, jwt: JwtSvids
    ) -> None:
        self.store = store
        self.authenticator = authenticator
        self.jwt = jwt
        self.streams = 0
        self._x509_cache: dict[
            tuple[SpiffeId, ...],
            tuple[tuple[tuple[X509Svid, ...], TrustBundle], workload_pb2.X509SVIDResponse],
        ] = {}

    async def _identities(self, context: Context) -> tuple[SpiffeId, ...]:
        metadata = dict(context.invocation_metadata() or ())
        if metadata.get(HEADER) != "true":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"security header missing from request: {HEADER}: true",
            )
        try:
            caller = self.authenticator.authenticate(context)
        except AuthError as exc:
            log.warning("refused a Workload API call: %s", exc)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        if not caller.identities:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no identity issued")
        return caller.identities

    def _store_changes(
        self, relevant: Callable[[StoreEvent], bool]
    ) -> Callable[[Callable[[], None]], Callable[[], None]]:
        def subscribe(wake: Callable[[], None]) -> Callable[[], None]:
            return self.store.subscribe(lambda event: wake() if relevant(event) else None)

        return subscribe

    async def _watch(
        self,
        context: Context,
        identities: tuple[SpiffeId, ...],
        build: Callable[[], Any],
        subscribe: Callable[[Callable[[], None]], Callable[[], None]],
    ) -> None:
        """Send ``build()`` now and after every change ``subscribe`` reports, until the
        caller leaves; an unchanged message is not sent again."""
        changed = asyncio.Event()
        unsubscribe = subscribe(changed.set)
        for identity in identities:
            self.store.retain(identity)
        self.streams += 1
        last: Any = None
        try:
            while True:
                changed.clear()
                try:
                    message = await build()
                except IssuerError as exc:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
                if message is not last and message != last:
                    await context.write(message)
                    last = message
                await changed.wait()
        finally:
            self.streams -= 1
            unsubscribe()
            for identity in identities:
                self.store.release(identity)

    async def _x509_response(
        self, identities: tuple[SpiffeId, ...]
    ) -> workload_pb2.X509SVIDResponse:
        svids = tuple([await self.store.svid(identity) for identity in identities])
        bundle = self.store.bundle()
        # Every stream of these identities gets the same message, built once per change.
        key = (svids, bundle)
        cached = self._x509_cache.get(identities)
        if cached is not None and cached[0] == key:
            return cached[1]
        message = workload_pb2.X509SVIDResponse(svids=[x509_svid_message(s, bundle) for s in svids])
        if len(self._x509_cache) >= MAX_CACHED_RESPONSES:
            self._x509_cache.clear()
        self._x509_cache[identities] = (key, message)
        return message

    async def FetchX509SVID(self, request: Any, context: Context) -> None:
        identities = await self._identities(context)

        def relevant(event: StoreEvent) -> bool:
            return isinstance(event, BundleChanged) or (
                isinstance(event, SvidChanged) and event.spiffe_id in identities
            )

        await self._watch(
            context,
            identities,
            lambda: self._x509_response(identities),
            self._store_changes(relevant),
        )

    async def _bundles_response(self) -> workload_pb2.X509BundlesResponse:
        bundle = self.store.bundle()
        return workload_pb2.X509BundlesResponse(bundles={bundle.trust_domain.id: _der(bundle)})

    async def FetchX509Bundles(self, request: Any, context: Context) -> None:
        await self._identities(context)
        await self._watch(
            context,
            (),
            self._bundles_response,
            self._store_changes(lambda e: isinstance(e, BundleChanged)),
        )

    # JWT-SVIDs ---------------------------------------------------------------------------
    async def FetchJWTSVID(
        self, request: workload_pb2.JWTSVIDRequest, context: Context
    ) -> workload_pb2.JWTSVIDResponse:
        identities = await self._identities(context)
        audience = [a for a in request.audience if a]
        if not audience:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        if request.spiffe_id:
            wanted = [i for i in identities if str(i) == request.spiffe_id]
            if not wanted:
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    "no identity issued for the requested SPIFFE ID",
                )
            identities = tuple(wanted)
        svids = []
        for identity in identities:
            try:
                token = await self.jwt.svid(identity, audience)
            except JwtError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except IssuerError as exc:
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            svids.append(workload_pb2.JWTSVID(spiffe_id=str(identity), svid=token))
        return workload_pb2.JWTSVIDResponse(svids=svids)

    async def _jwt_bundles_response(self) -> workload_pb2.JWTBundlesResponse:
        td = self.store.issuer.trust_domain
        return workload_pb2.JWTBundlesResponse(bundles={td.id: self.jwt.bundle})

    async def FetchJWTBundles(self, request: Any, context: Context) -> None:
        await self._identities(context)
        await self._watch(context, (), self._jwt_bundles_response, self.jwt.subscribe)

    async def ValidateJWTSVID(
        self, request: workload_pb2.ValidateJWTSVIDRequest, context: Context
    ) -> workload_pb2.ValidateJWTSVIDResponse:
        await self._identities(context)
        if not request.audience:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        if not request.svid:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "svid must be specified")
        try:
            spiffe_id, claims = self.jwt.validate(request.svid, request.audience)
        except JwtError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        struct = struct_pb2.Struct()
        struct.update(claims)
        return workload_pb2.ValidateJWTSVIDResponse(spiffe_id=str(spiffe_id), claims=struct)


def add_workload_api_to_server(servicer: WorkloadApiServicer, server: grpc.aio.Server) -> None:
    workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
