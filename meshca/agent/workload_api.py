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
import logging
from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio
from cryptography.hazmat.primitives import serialization
from spiffe._proto import workload_pb2, workload_pb2_grpc

from meshca.issuer import IssuerError, TrustBundle, X509Svid
from meshca.spiffe import SpiffeId
from meshca.store import BundleChanged, SecretStore, StoreEvent, SvidChanged
from meshca.xds.auth import AuthError, CallerAuthenticator

log = logging.getLogger("meshca.agent.workload_api")

Context = grpc.aio.ServicerContext[Any, Any]
HEADER = "workload.spiffe.io"
SERVICE_NAME = "SpiffeWorkloadAPI"


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
    def __init__(self, store: SecretStore, authenticator: CallerAuthenticator) -> None:
        self.store = store
        self.authenticator = authenticator
        self.streams = 0

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

    async def _watch(
        self,
        context: Context,
        identities: tuple[SpiffeId, ...],
        build: Callable[[], Any],
        relevant: Callable[[StoreEvent], bool],
    ) -> None:
        """Send ``build()`` now and after every relevant change, until the caller leaves."""
        changed = asyncio.Event()

        def listen(event: StoreEvent) -> None:
            if relevant(event):
                changed.set()

        unsubscribe = self.store.subscribe(listen)
        for identity in identities:
            self.store.retain(identity)
        self.streams += 1
        last: bytes | None = None
        try:
            while True:
                changed.clear()
                try:
                    message = await build()
                except IssuerError as exc:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
                data = message.SerializeToString(deterministic=True)
                if data != last:
                    await context.write(message)
                    last = data
                await changed.wait()
        finally:
            self.streams -= 1
            unsubscribe()
            for identity in identities:
                self.store.release(identity)

    async def _x509_response(
        self, identities: tuple[SpiffeId, ...]
    ) -> workload_pb2.X509SVIDResponse:
        svids = [await self.store.svid(identity) for identity in identities]
        bundle = self.store.bundle()
        return workload_pb2.X509SVIDResponse(svids=[x509_svid_message(s, bundle) for s in svids])

    async def FetchX509SVID(self, request: Any, context: Context) -> None:
        identities = await self._identities(context)

        def relevant(event: StoreEvent) -> bool:
            return isinstance(event, BundleChanged) or (
                isinstance(event, SvidChanged) and event.spiffe_id in identities
            )

        await self._watch(context, identities, lambda: self._x509_response(identities), relevant)

    async def _bundles_response(self) -> workload_pb2.X509BundlesResponse:
        bundle = self.store.bundle()
        return workload_pb2.X509BundlesResponse(bundles={bundle.trust_domain.id: _der(bundle)})

    async def FetchX509Bundles(self, request: Any, context: Context) -> None:
        await self._identities(context)
        await self._watch(
            context, (), self._bundles_response, lambda e: isinstance(e, BundleChanged)
        )


def add_workload_api_to_server(servicer: WorkloadApiServicer, server: grpc.aio.Server) -> None:
    workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
