"""Secrets for SDS: secret names resolved for one caller to Envoy ``Secret`` resources.

This is the engine's resource source for the Secret type, and where authorization
happens: a TlsCertificate (which carries a private key) is built only for one of the
caller's own identities, or, for an ambient node proxy, for the identity of an ambient
workload on its node (the mesh file says which: :meth:`meshca.envoy.model.Mesh.
node_proxies_of`); anything else is PERMISSION_DENIED, never silently answered with the
caller's own certificate. Validation contexts hold public material; the one of
a service (the identities behind it) is served only to callers the mesh policy lets
call that service, the bundle to any authenticated caller.

It also keeps the store informed (retain/release per stream, so unused identities can
be dropped) and wakes exactly the streams a store event affects.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2
from envoy.type.matcher.v3 import string_pb2

from meshca.issuer import IssuerError, TrustBundle, X509Svid
from meshca.issuer.errors import BACKEND_UNAVAILABLE
from meshca.sds.bounded import BoundedSvids
from meshca.spiffe import SpiffeId
from meshca.store import BundleChanged, SecretStore, StoreEvent, SvidChanged
from meshca.util.logger import get_logger
from meshca.xds.auth import Caller, Forbidden, own_identity
from meshca.xds.engine import Resolution, Resource, ResourceError, StreamHandle
from meshca.xds.resources import (
    SECRET_TYPE,
    BundleRequest,
    CertificateRequest,
    NameProblem,
    OutboundValidationRequest,
    SecretNameError,
    SecretRequest,
    parse_secret_name,
)

ServiceIdentities = Callable[[str, str], tuple[SpiffeId, ...] | None]
MayReach = Callable[[SpiffeId, str, str], bool]  # (caller identity, namespace, service)
NodeProxies = Callable[[SpiffeId], frozenset[SpiffeId]]  # workload -> node proxies holding it

log = get_logger("meshca.sds")


def tls_certificate_secret(name: str, svid: X509Svid) -> secret_pb2.Secret:
    return secret_pb2.Secret(
        name=name,
        tls_certificate=common_pb2.TlsCertificate(
            certificate_chain=base_pb2.DataSource(inline_bytes=svid.chain_pem()),
            private_key=base_pb2.DataSource(inline_bytes=svid.private_key_pem()),
        ),
    )


def validation_context_secret(
    name: str, bundle: TrustBundle, peers: tuple[SpiffeId, ...] = ()
) -> secret_pb2.Secret:
    """The bundle, plus exact URI SAN matchers when the acceptable peers are known."""
    matchers = [
        common_pb2.SubjectAltNameMatcher(
            san_type=common_pb2.SubjectAltNameMatcher.URI,
            matcher=string_pb2.StringMatcher(exact=str(peer)),
        )
        for peer in peers
    ]
    return secret_pb2.Secret(
        name=name,
        validation_context=common_pb2.CertificateValidationContext(
            trusted_ca=base_pb2.DataSource(inline_bytes=bundle.pem()),
            match_typed_subject_alt_names=matchers,
        ),
    )


class _Watch:
    """What one stream watches: identities whose certificates it holds, and the bundle."""

    def __init__(self, stream: StreamHandle) -> None:
        self.stream = stream
        self.identities: frozenset[SpiffeId] = frozenset()
        self.bundle = False
        self.names: frozenset[str] = frozenset()


class SecretSource:
    """The Secret type for :class:`meshca.xds.engine.XdsEngine`."""

    type_url = SECRET_TYPE
    wildcard = False

    def __init__(
        self,
        store: SecretStore,
        service_identities: ServiceIdentities,
        may_reach: MayReach | None = None,
        node_proxies: NodeProxies | None = None,
    ) -> None:
        self.store = store
        self.trust_domain = store.issuer.trust_domain
        self.service_identities = service_identities
        # Whether an identity may call a service (the mesh policy): the identities behind
        # a service are told only to callers that may call it. None: every caller may.
        self.may_reach = may_reach
        # The node proxies that may hold an identity's key (ambient); None: no nodes.
        self.node_proxies = node_proxies
        self._watches: dict[int, _Watch] = {}
        self._cert_watchers: dict[SpiffeId, set[int]] = {}
        self._bundle_watchers: set[int] = set()
        self._name_refs: Counter[str] = Counter()
        # Kept while a stream watches the name, so a push neither parses nor builds again:
        self._requests: dict[str, SecretRequest] = {}
        # name -> {identity for 'default' (else None): (inputs, Resource)}
        self._cache: dict[str, dict[SpiffeId | None, tuple[tuple[object, ...], Resource]]] = {}
        self.bounded = BoundedSvids(store)
        self._unsubscribe = store.subscribe(self._on_store_event)

    def close(self) -> None:
        self._unsubscribe()

    # --- resolution and authorization --------------------------------------------
    async def resolve(self, caller: Caller, node: Any, names: frozenset[str] | None) -> Resolution:
        return {name: await self._resolve_one(caller, node, name) for name in names or ()}

    def _parse(self, name: str) -> SecretRequest:
        request = self._requests.get(name)
        if request is None:
            request = parse_secret_name(name, self.trust_domain)
            if self._name_refs[name] > 0:
                self._requests[name] = request
        return request

    async def _resolve_one(self, caller: Caller, node: Any, name: str) -> Resource | ResourceError:
        try:
            request = self._parse(name)
        except SecretNameError as exc:
            code = (
                grpc.StatusCode.INVALID_ARGUMENT
                if exc.problem is NameProblem.MALFORMED
                else grpc.StatusCode.NOT_FOUND
            )
            return ResourceError(code, str(exc))
        try:
            if isinstance(request, CertificateRequest):
                return await self._certificate(caller, node, request)
            if isinstance(request, BundleRequest):
                return self._bundle(request)
            return self._outbound(caller, request)
        except Forbidden as exc:
            return ResourceError(grpc.StatusCode.PERMISSION_DENIED, str(exc))

    def authorized_identity(
        self, caller: Caller, node: Any, request: CertificateRequest
    ) -> SpiffeId:
        """The identity whose key ``request`` names, if the caller may hold it; else Forbidden."""
        if request.identity is None:
            return own_identity(caller, node)
        if not caller.may_hold(request.identity) and not self._node_proxy_of(
            caller, request.identity
        ):
            raise Forbidden(
                f"caller {caller} may not obtain the private key of {request.identity} "
                f"(secret {request.name!r}): a caller receives only its own identity's key"
            )
        return request.identity

    def _node_proxy_of(self, caller: Caller, identity: SpiffeId) -> bool:
        """Whether the stream's node (its node.id, else any of the caller's identities)
        is the node proxy of a node where ``identity`` runs as an ambient workload."""
        if self.node_proxies is None:
            return False
        proxies = self.node_proxies(identity)
        if caller.node_matches is None:
            return any(caller.may_hold(proxy) for proxy in proxies)
        return any(proxy in caller.node_matches for proxy in proxies)

    async def _certificate(
        self, caller: Caller, node: Any, request: CertificateRequest
    ) -> Resource | ResourceError:
        identity = self.authorized_identity(caller, node, request)
        try:  # never outliving the caller's own certificate (meshca.sds.bounded)
            svid = await self.bounded.svid(caller, identity)
        except IssuerError as exc:
            # The detail (a Vault address, a refusal's wording) is for the operator only.
            log.warning("cannot issue a certificate for %s: %s", identity, exc)
            return ResourceError(
                grpc.StatusCode.UNAVAILABLE,
                f"cannot issue a certificate for {identity}: {BACKEND_UNAVAILABLE}",
            )
        key = identity if request.identity is None else None
        return self._cached(
            request.name, key, (svid,), lambda: tls_certificate_secret(request.name, svid)
        )

    def _bundle(self, request: BundleRequest) -> Resource | ResourceError:
        if request.trust_domain != self.trust_domain:
            return ResourceError(
                grpc.StatusCode.NOT_FOUND,
                f"secret name {request.name!r}: meshca serves only the bundle of trust domain "
                f"{self.trust_domain}",
            )
        bundle = self.store.bundle()
        return self._cached(
            request.name, None, (bundle,), lambda: validation_context_secret(request.name, bundle)
        )

    def _outbound(
        self, caller: Caller, request: OutboundValidationRequest
    ) -> Resource | ResourceError:
        service = f"{request.namespace}/{request.service}"
        peers = self.service_identities(request.namespace, request.service)
        if peers is None:
            return ResourceError(
                grpc.StatusCode.NOT_FOUND,
                f"secret name {request.name!r}: service {service} is not in the mesh file",
            )
        if not peers:
            return ResourceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"secret name {request.name!r}: service {service} lists no service accounts; "
                "refusing a validation context that would accept any identity",
            )
        if self.may_reach is not None and not any(
            self.may_reach(identity, request.namespace, request.service)
            for identity in caller.identities
        ):
            return ResourceError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"secret name {request.name!r}: caller {caller} may not call service {service} "
                "(mesh access policy), so it is not told who serves it",
            )
        bundle = self.store.bundle()
        return self._cached(
            request.name,
            None,
            (bundle, peers),
            lambda: validation_context_secret(request.name, bundle, peers),
        )

    def _cached(
        self,
        name: str,
        key: SpiffeId | None,
        inputs: tuple[object, ...],
        build: Callable[[], secret_pb2.Secret],
    ) -> Resource:
        """The Resource for ``inputs``, built once while any stream watches ``name``."""
        entries = self._cache.get(name)
        hit = entries.get(key) if entries is not None else None
        if hit is not None and all(a is b or a == b for a, b in zip(hit[0], inputs, strict=True)):
            return hit[1]
        resource = Resource.of(name, build())
        if self._name_refs[name] > 0:
            self._cache.setdefault(name, {})[key] = (inputs, resource)
        return resource

    # --- watches: retain/release and targeted wake-ups ------------------------------
    def _watched_by(
        self, caller: Caller, node: Any, names: frozenset[str]
    ) -> tuple[frozenset[SpiffeId], bool]:
        identities: set[SpiffeId] = set()
        bundle = False
        for name in names:
            try:
                request = self._parse(name)
                if isinstance(request, CertificateRequest):
                    identities.add(self.authorized_identity(caller, node, request))
                else:
                    bundle = True
            except (SecretNameError, Forbidden):
                continue  # refused when resolved; never retained
        return frozenset(identities), bundle

    def watch(self, stream: StreamHandle, names: frozenset[str] | None) -> None:
        watch = self._watches.get(stream.id)
        if watch is None:
            watch = self._watches[stream.id] = _Watch(stream)
        self._count_names(watch, names or frozenset())
        identities, bundle = self._watched_by(stream.caller, stream.node, watch.names)
        self._update(watch, identities, bundle)

    def unwatch(self, stream: StreamHandle) -> None:
        watch = self._watches.pop(stream.id, None)
        if watch is not None:
            self._count_names(watch, frozenset())
            self._update(watch, frozenset(), False)

    def _count_names(self, watch: _Watch, names: frozenset[str]) -> None:
        """Count who watches each name; a name nobody watches is forgotten."""
        for name in names - watch.names:
            self._name_refs[name] += 1
        for name in watch.names - names:
            self._name_refs[name] -= 1
            if self._name_refs[name] <= 0:
                del self._name_refs[name]
                self._requests.pop(name, None)
                self._cache.pop(name, None)
        watch.names = names

    def _update(self, watch: _Watch, identities: frozenset[SpiffeId], bundle: bool) -> None:
        stream_id = watch.stream.id
        for identity in identities - watch.identities:
            self._cert_watchers.setdefault(identity, set()).add(stream_id)
            self.store.retain(identity)
        for identity in watch.identities - identities:
            watchers = self._cert_watchers.get(identity, set())
            watchers.discard(stream_id)
            if not watchers:
                self._cert_watchers.pop(identity, None)
            self.store.release(identity)
        if bundle:
            self._bundle_watchers.add(stream_id)
        else:
            self._bundle_watchers.discard(stream_id)
        watch.identities, watch.bundle = identities, bundle

    def _on_store_event(self, event: StoreEvent) -> None:
        if isinstance(event, SvidChanged):
            affected = self._cert_watchers.get(event.spiffe_id, set())
        elif isinstance(event, BundleChanged):
            affected = self._bundle_watchers
        else:
            return
        for stream_id in list(affected):
            watch = self._watches.get(stream_id)
            if watch is not None:
                watch.stream.wake(SECRET_TYPE)
