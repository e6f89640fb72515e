"""Who is calling: the authenticated identities of a gRPC caller, and what its node claims.

A caller is authenticated by its transport, never by what it says in a request:

* mutual TLS: the gRPC TLS layer has verified the client certificate against the trust
  bundle; its SPIFFE ID (the X.509-SVID's URI SAN) is the caller's only identity;
* a Unix socket: meshca's relay recorded the connecting process's SO_PEERCRED, and the
  configuration maps its uid to the identities it may obtain.

The Envoy ``node`` is only a claim. A claim naming another identity is refused
(:class:`Forbidden`). Recognised claims:

* ``node.id`` that is a SPIFFE ID (``spiffe://...``): must be one of the caller's;
* ``node.id`` in Istio's form ``<type>~<ip>~<pod>.<ns>~<ns>.svc.<domain>``: ``<ns>``
  must be the namespace of one of the caller's ``/ns/<ns>/sa/<sa>`` identities;
* Istio node metadata ``NAMESPACE`` / ``SERVICE_ACCOUNT``: must match one of the
  caller's Kubernetes identities.

Any other ``node.id`` (a hostname, ``envoy-1``) names no identity and is accepted.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol

import grpc
import grpc.aio
from cryptography import x509

from meshca.issuer.bundle import TrustBundle
from meshca.issuer.errors import ChainError, KeyTypeError, SvidError
from meshca.issuer.keys import key_type_of
from meshca.issuer.svid import spiffe_id_of
from meshca.issuer.verify import verify_chain
from meshca.spiffe import SCHEME, SpiffeId, SpiffeIdError, TrustDomain
from meshca.util.logger import get_logger
from meshca.util.logs import Throttle, bind, suppressed_note
from meshca.xds.stats import XdsStats

log = get_logger("meshca.sds")  # refused calls keep the logger name they had

Context = grpc.aio.ServicerContext[Any, Any]
_request_ids = itertools.count(1)
WARNING_INTERVAL = 10.0  # seconds between repeated warnings about one caller or host
_auth_warnings = Throttle(WARNING_INTERVAL)  # refused calls: one warning per peer host

MTLS = "mtls"
UDS = "uds"


# How many identities a caller's description names: a uid may hold thousands, and the
# description goes into log lines and into refusals sent as gRPC metadata (16 KB at most).
SHOWN_IDENTITIES = 3


class IdentitySet:
    """A caller's identities, indexed once so each check costs the same whatever their
    number: membership, and lookup by Kubernetes namespace and service account."""

    def __init__(self, identities: tuple[SpiffeId, ...]) -> None:
        self.ordered = identities
        self.members = frozenset(identities)
        self._by_namespace: dict[str, tuple[SpiffeId, ...]] | None = None
        self._by_account: dict[tuple[str, str], tuple[SpiffeId, ...]] | None = None

    def in_namespace(self, namespace: str, account: str | None) -> tuple[SpiffeId, ...]:
        """The Kubernetes identities ``/ns/<namespace>/sa/<account>`` (any account when None)."""
        if self._by_namespace is None or self._by_account is None:
            by_namespace: dict[str, list[SpiffeId]] = {}
            by_account: dict[tuple[str, str], list[SpiffeId]] = {}
            for spiffe_id in self.ordered:
                kubernetes = spiffe_id.kubernetes
                if kubernetes is not None:
                    by_namespace.setdefault(kubernetes[0], []).append(spiffe_id)
                    by_account.setdefault(kubernetes, []).append(spiffe_id)
            self._by_namespace = {k: tuple(v) for k, v in by_namespace.items()}
            self._by_account = {k: tuple(v) for k, v in by_account.items()}
        if account is None:
            return self._by_namespace.get(namespace, ())
        return self._by_account.get((namespace, account), ())

    def describe(self) -> str:
        """The first few identities, and how many more: bounded whatever the number."""
        shown = ",".join(str(i) for i in self.ordered[:SHOWN_IDENTITIES])
        more = len(self.ordered) - SHOWN_IDENTITIES
        return f"{shown} and {more} more" if more > 0 else shown


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: the identities whose keys it may obtain, and how it came.

    ``node``/``node_matches``: the node its stream declared and the identities that node
    is consistent with, checked once per stream (:meth:`with_node`) and reused by every
    resolve and push on it.
    """

    identities: tuple[SpiffeId, ...]
    transport: str
    peer: str
    index: IdentitySet | None = field(default=None, repr=False, compare=False)
    node: Any = field(default=None, repr=False, compare=False)
    node_matches: tuple[SpiffeId, ...] | None = field(default=None, repr=False, compare=False)
    uid: int | None = None  # Unix socket: the kernel's word for who is calling
    # mutual TLS: the client certificate chain (leaf first) that authenticated the call;
    # what the caller obtains never outlives it (meshca.sds.bounded, meshca.xds.credentials)
    chain: tuple[x509.Certificate, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.index is None or self.index.ordered is not self.identities:
            object.__setattr__(self, "index", IdentitySet(self.identities))

    @property
    def identity_set(self) -> IdentitySet:
        assert self.index is not None
        return self.index

    def may_hold(self, spiffe_id: SpiffeId) -> bool:
        return spiffe_id in self.identity_set.members

    @property
    def not_after(self) -> datetime | None:
        """When the credential that authenticated the call expires (None: a Unix-socket
        caller, authenticated afresh by the kernel on every connection)."""
        return self.chain[0].not_valid_after_utc if self.chain else None

    @property
    def account(self) -> str:
        """Whom per-caller limits count against: the uid, or the certificate's identity."""
        if self.uid is not None:
            return f"uid {self.uid}"
        return self.describe_identities()

    def with_node(self, node: Any) -> Caller:
        """This caller bound to its stream's ``node`` once that node was checked;
        Forbidden when the node claims an identity not the caller's."""
        matching = node_identities(self, node)
        return replace(self, node=node, node_matches=matching)

    def describe_identities(self) -> str:
        return self.identity_set.describe()

    def __str__(self) -> str:
        return f"{self.describe_identities()} ({self.transport} {self.peer})"


class AuthError(Exception):
    """The caller could not be authenticated (gRPC UNAUTHENTICATED)."""


class Forbidden(Exception):
    """An authenticated caller asked for, or claimed, what is not its own (PERMISSION_DENIED)."""


@dataclass(frozen=True)
class PeerCred:
    uid: int
    gid: int
    pid: int


class PeerCredLookup(Protocol):
    def lookup(self, peer: str) -> PeerCred | None:
        """The credentials of the Unix-socket caller relayed as gRPC peer ``peer``, if any."""
        ...


class CallerAuthenticator:
    """Turns a gRPC call's transport facts into a :class:`Caller`, or raises AuthError."""

    def __init__(
        self,
        trust_domain: TrustDomain,
        peer_creds: PeerCredLookup | None = None,
        uid_identities: Mapping[int, Sequence[SpiffeId]] | None = None,
        bundle: Callable[[], TrustBundle] | None = None,
    ) -> None:
        self.trust_domain = trust_domain
        self.bundle = bundle  # the current trust bundle a client certificate must chain to
        self.peer_creds = peer_creds
        self.uid_identities: dict[int, tuple[SpiffeId, ...]] = {}
        for uid, identities in (uid_identities or {}).items():
            for spiffe_id in identities:
                if not spiffe_id.is_member_of(trust_domain):
                    raise ValueError(
                        f"uid {uid} is mapped to {spiffe_id}, outside the trust domain "
                        f"{trust_domain}"
                    )
            self.uid_identities[uid] = tuple(dict.fromkeys(identities))
        self._uid_index = {uid: IdentitySet(ids) for uid, ids in self.uid_identities.items()}

    def authenticate(self, context: grpc.aio.ServicerContext[Any, Any]) -> Caller:
        peer = context.peer() or ""
        cred = self.peer_creds.lookup(peer) if self.peer_creds is not None else None
        if cred is not None:
            return self._unix_caller(cred)
        return self._tls_caller(context, peer)

    def _unix_caller(self, cred: PeerCred) -> Caller:
        described = f"uid={cred.uid} pid={cred.pid}"
        identities = self.uid_identities.get(cred.uid)
        if not identities:
            raise AuthError(f"Unix-socket caller {described} is not mapped to any identity")
        return Caller(identities, UDS, described, self._uid_index[cred.uid], uid=cred.uid)

    def _tls_caller(self, context: grpc.aio.ServicerContext[Any, Any], peer: str) -> Caller:
        auth = context.auth_context()
        pems = list(auth.get("x509_pem_cert", ()))
        if not pems:
            raise AuthError(f"caller {peer} presented no client certificate")
        try:
            leaf = x509.load_pem_x509_certificate(pems[0])
            presented = b"".join(auth.get("x509_pem_cert_chain", ()))
            above = x509.load_pem_x509_certificates(presented) if presented.strip() else []
            chain = (leaf, *(c for c in above if c != leaf))
            spiffe_id = spiffe_id_of(leaf)
            key_type_of(leaf.public_key())  # the key policy CSRs are held to
        except KeyTypeError as exc:
            raise AuthError(
                f"caller {peer}: client certificate refused by the key policy: {exc}"
            ) from None
        except (SvidError, ValueError) as exc:
            raise AuthError(
                f"caller {peer}: client certificate is not an X.509-SVID: {exc}"
            ) from None
        if not spiffe_id.is_member_of(self.trust_domain):
            raise AuthError(
                f"caller {peer}: {spiffe_id} is outside the trust domain {self.trust_domain}"
            )
        if spiffe_id.is_agent:  # an agent SVID is for the CSR API, never a workload's key
            raise AuthError(f"caller {peer}: {spiffe_id} is an agent SVID, not a workload's")
        caller = Caller((spiffe_id,), MTLS, peer, chain=chain)
        if self.bundle is not None:
            problem = credential_problem(caller, self.bundle(), datetime.now(UTC))
            if problem is not None:
                raise AuthError(f"caller {peer}: {problem}")
        return caller


def credential_problem(caller: Caller, bundle: TrustBundle, now: datetime) -> str | None:
    """Why ``caller``'s client certificate does not authenticate it now (expired, or no
    longer chaining to ``bundle`` after a root rotation); None if it does."""
    if not caller.chain:
        return None
    leaf, *intermediates = caller.chain
    if now >= leaf.not_valid_after_utc:
        return f"its client certificate expired at {leaf.not_valid_after_utc.isoformat()}"
    try:
        verify_chain(leaf, intermediates, bundle, now=now)
    except ChainError as exc:
        return f"its client certificate no longer chains to the trust bundle: {exc}"
    return None


@dataclass(frozen=True)
class NodeClaims:
    """What a node says about who it is; None where it says nothing."""

    spiffe_id: SpiffeId | None = None
    namespace: str | None = None
    service_account: str | None = None


def _metadata_string(node: Any, key: str) -> str | None:
    fields = node.metadata.fields
    if key in fields and fields[key].WhichOneof("kind") == "string_value":
        value = fields[key].string_value
        return str(value) if value else None
    return None


def node_claims(node: Any) -> NodeClaims:
    """The identity claims in an Envoy ``Node`` (see the module docstring); Forbidden if garbled."""
    if node is None:
        return NodeClaims()
    node_id = str(node.id)
    spiffe_id = None
    namespace = _metadata_string(node, "NAMESPACE")
    if node_id.lower().startswith(SCHEME):
        try:
            spiffe_id = SpiffeId.parse(node_id)
        except SpiffeIdError as exc:
            shown = bounded_text(node_id)
            raise Forbidden(f"node.id {shown!r} is not a valid SPIFFE ID: {exc}") from None
    elif node_id.count("~") == 3:
        _, _, pod_domain, dns_domain = node_id.split("~")
        istio_ns = dns_domain.split(".svc.", 1)[0] if ".svc." in dns_domain else ""
        pod_ns = pod_domain.rpartition(".")[2] if "." in pod_domain else ""
        if not istio_ns or pod_ns != istio_ns:
            raise Forbidden(
                f"node.id {bounded_text(node_id)!r} does not have Istio's form "
                "<type>~<ip>~<pod>.<ns>~<ns>.svc.<domain>"
            )
        if namespace is not None and namespace != istio_ns:
            raise Forbidden(
                f"node.id {bounded_text(node_id)!r} names namespace {istio_ns} but node metadata "
                f"NAMESPACE is {bounded_text(namespace)}"
            )
        namespace = istio_ns
    return NodeClaims(spiffe_id, namespace, _metadata_string(node, "SERVICE_ACCOUNT"))


def _matches(spiffe_id: SpiffeId, claims: NodeClaims) -> bool:
    if claims.spiffe_id is not None and spiffe_id != claims.spiffe_id:
        return False
    if claims.namespace is None and claims.service_account is None:
        return True
    kubernetes = spiffe_id.kubernetes
    if kubernetes is None:
        return False
    namespace, account = kubernetes
    return (claims.namespace in (None, namespace)) and (claims.service_account in (None, account))


def _claimed(caller: Caller, claims: NodeClaims) -> tuple[SpiffeId, ...]:
    """The caller's identities consistent with ``claims``, found through its index."""
    identities = caller.identity_set
    if claims.spiffe_id is not None:
        if claims.spiffe_id in identities.members and _matches(claims.spiffe_id, claims):
            return (claims.spiffe_id,)
        return ()
    if claims.namespace is not None:
        return identities.in_namespace(claims.namespace, claims.service_account)
    if claims.service_account is not None:  # an account without a namespace: rare
        return tuple(i for i in identities.ordered if _matches(i, claims))
    return identities.ordered


def node_identities(caller: Caller, node: Any) -> tuple[SpiffeId, ...]:
    """The caller's identities consistent with what its node claims; Forbidden if none is."""
    if caller.node_matches is not None and caller.node is node:
        return caller.node_matches  # checked once when the stream declared its node
    matching = _claimed(caller, node_claims(node))
    if not matching:
        node_id = str(getattr(node, "id", ""))
        raise Forbidden(f"node {bounded_text(node_id)!r} claims an identity not the caller's")
    return matching


def bounded_text(text: str, limit: int = 256) -> str:
    """``text``, cut to ``limit`` characters: what a caller sends is bounded in what we echo."""
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} characters)"


def own_identity(caller: Caller, node: Any) -> SpiffeId:
    """The one identity Istio's ``default`` stands for; Forbidden when the node leaves a choice."""
    matching = node_identities(caller, node)
    if len(matching) > 1:
        raise Forbidden(
            f"caller {caller} holds several identities; set node.id to the SPIFFE ID of the "
            "one to serve as 'default'"
        )
    return matching[0]


async def authenticate_or_abort(
    authenticator: CallerAuthenticator, stats: XdsStats, context: Context
) -> Caller:
    """The caller, or the call ends UNAUTHENTICATED (logged and counted). Every event
    logged while serving the call carries its peer, request id and caller."""
    bind(peer=context.peer(), request_id=f"{next(_request_ids):x}")
    try:
        caller = authenticator.authenticate(context)
        bind(caller=caller.describe_identities(), transport=caller.transport)
        return caller
    except AuthError as exc:
        stats.auth_failures += 1
        message = bounded_text(str(exc), 1024)
        held_back = _auth_warnings.allow(_peer_host(context.peer() or ""))
        if held_back is not None:
            log.warning("refused an xDS call: %s%s", message, suppressed_note(held_back))
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)


def _peer_host(peer: str) -> str:
    """``ipv4:10.0.0.1:5555`` -> ``ipv4:10.0.0.1``: repeated failures of one host count
    as one, whatever port each connection came from."""
    return peer.rpartition(":")[0] if peer.startswith(("ipv4:", "ipv6:")) else peer
