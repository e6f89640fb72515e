"""Kubernetes service-account tokens as evidence: who a projected token's pod is, asked
of the API server (TokenReview, then the Pod), never decided from the token alone.

A token is accepted when the API server authenticates it for meshca's audience
(``status.audiences`` must contain it), it is bound to a pod (the TokenReview's extra
``authentication.kubernetes.io/pod-name`` and ``pod-uid``: a projected token, not a
legacy Secret token), and that pod still exists with that UID, runs as the token's
service account and has not terminated. The caller is then that pod's workload,
``spiffe://<td>/ns/<ns>/sa/<sa>``. A pod whose service account is a configured node
agent (``--kube-node-agent NS/SA``) may obtain the identities of pods scheduled on its
own node (``spec.nodeName``) only, as Istio's ztunnel authorization does. A pod of the
ambient node proxies' service account (``--kube-node-proxy NS/SA``, also a node agent)
may also obtain its node's proxy identity, ``spiffe://<td>/ns/<ns>/sa/<sa>/node/<its
spec.nodeName>``, which the mesh from Kubernetes entitles to that node's ambient pods'
keys: the node comes from the API server's pod, never from the caller.

The API server is reached through :class:`KubeIdentityApi` (the Kubernetes client lives
in ``meshca/kube/``). Every call has a timeout; an API server that does not answer is
:class:`KubeUnavailable` (the caller should retry), never a refusal of the token.
TokenReview answers are cached briefly (never past the token's own expiry) in a bounded
table keyed by the token's hash; pod lookups are not cached for sidecars, so a deleted
pod's token stops working at once.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol, TypeVar

from meshca.attest.attestor import Attestation, AttestationError
from meshca.spiffe import SpiffeId, SpiffeIdError, TrustDomain
from meshca.util.logger import get_logger

log = get_logger("meshca.attest.kube")

ATTESTOR = "k8s"
DEFAULT_AUDIENCE = "meshca"
POD_NAME = "authentication.kubernetes.io/pod-name"
POD_UID = "authentication.kubernetes.io/pod-uid"
SA_USER_PREFIX = "system:serviceaccount:"
MAX_TOKEN_BYTES = 16 * 1024  # a projected token is about 1 KiB; more is not a token
DEFAULT_TIMEOUT = 5.0  # seconds for one API call
DEFAULT_CACHE_SECONDS = 30.0  # how long a TokenReview answer is reused
DEFAULT_CACHE_SIZE = 10_000  # TokenReview answers held at most
DEFAULT_CONCURRENCY = 32  # API calls in flight at once; more callers wait their turn
NODE_CACHE_SECONDS = 5.0  # "a pod of ns/sa runs on node N" answers, reused this long
TERMINATED = ("Succeeded", "Failed")

T = TypeVar("T")


class KubeUnavailable(Exception):
    """The API server cannot be asked now (unreachable, too slow, or failing): the call
    should be retried; nothing about the token was decided."""


class NotEntitled(AttestationError):
    """The caller is authenticated but may not have the identity it asks for."""


@dataclass(frozen=True)
class TokenReview:
    """What the API server said of a token (``TokenReview.status``)."""

    authenticated: bool
    username: str = ""
    audiences: tuple[str, ...] = ()
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    error: str = ""


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    uid: str
    service_account: str
    node_name: str  # "" while unscheduled
    phase: str

    @property
    def terminated(self) -> bool:
        return self.phase in TERMINATED


class KubeIdentityApi(Protocol):
    """The three questions meshca asks the API server about a token (``meshca/kube/``
    answers them with the Kubernetes client). Each raises KubeUnavailable when the API
    server cannot answer."""

    async def review_token(self, token: str, audiences: Sequence[str]) -> TokenReview: ...

    async def pod(self, namespace: str, name: str) -> Pod | None:
        """The pod, or None when it does not exist."""
        ...

    async def pods_on_node(self, namespace: str, service_account: str, node: str) -> list[Pod]:
        """Pods of ``namespace`` running as ``service_account`` scheduled on ``node``."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class KubeCaller:
    """A verified token: its pod, the pod's workload identity, whether the pod is a node
    agent, and when the token expires."""

    pod: Pod
    identity: SpiffeId
    node_agent: bool
    expires: datetime

    def describe(self) -> str:
        return f"pod {self.pod.namespace}/{self.pod.name} ({self.identity})"


def parse_node_agent(text: str) -> str:
    """``NAMESPACE/SERVICE_ACCOUNT`` of node agents (e.g. ``istio-system/ztunnel``)."""
    parts = text.strip().split("/")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"{text[:100]!r}: use NAMESPACE/SERVICE_ACCOUNT")
    return "/".join(parts)


def token_expiry(token: str) -> datetime | None:
    """The ``exp`` claim of a JWT, read without checking the signature: used only for a
    token the API server has just authenticated (to bound caches and agent renewals)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return datetime.fromtimestamp(int(claims["exp"]), UTC)
    except (IndexError, ValueError, KeyError, TypeError, OverflowError):
        return None


class ExpiringCache:
    """A bounded table whose entries end at their own deadline (monotonic seconds)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[str, tuple[float, object]] = OrderedDict()

    def get(self, key: str) -> object | None:
        found = self._items.get(key)
        if found is None:
            return None
        if found[0] <= time.monotonic():
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return found[1]

    def put(self, key: str, value: object, seconds: float) -> None:
        if seconds <= 0 or self.size <= 0:
            return
        self._items[key] = (time.monotonic() + seconds, value)
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class KubeTokenVerifier:
    """Verifies projected service-account tokens and decides what their pods may obtain;
    shared by the ``k8s`` agent attestor and Istio's ``CreateCertificate``."""

    def __init__(
        self,
        api: KubeIdentityApi,
        trust_domain: TrustDomain,
        *,
        audience: str = DEFAULT_AUDIENCE,
        node_agents: Collection[str] = (),
        node_proxy: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        cache_seconds: float = DEFAULT_CACHE_SECONDS,
        cache_size: int = DEFAULT_CACHE_SIZE,
        concurrency: int = DEFAULT_CONCURRENCY,
    ) -> None:
        self.api = api
        self.trust_domain = trust_domain
        self.audience = audience
        self.node_proxy = parse_node_agent(node_proxy) if node_proxy else None
        self.node_agents = frozenset(parse_node_agent(n) for n in node_agents) | (
            {self.node_proxy} if self.node_proxy else set()
        )
        self.timeout = timeout
        self.cache_seconds = cache_seconds
        self._reviews = ExpiringCache(cache_size)
        self._on_node = ExpiringCache(cache_size)
        self._slots = asyncio.Semaphore(concurrency)
        self.api_calls = 0

    async def close(self) -> None:
        await self.api.close()

    async def _ask(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """One API call, bounded in how many run at once and in time, waiting for a turn
        included: under a flood a caller is told UNAVAILABLE rather than queued for ever."""

        async def in_turn() -> T:
            async with self._slots:
                self.api_calls += 1
                return await call()

        try:
            return await asyncio.wait_for(in_turn(), self.timeout)
        except TimeoutError:
            raise KubeUnavailable(
                f"the Kubernetes API server did not answer {what} within {self.timeout:g}s"
            ) from None

    async def _review(self, token: str) -> TokenReview:
        key = hashlib.sha256(token.encode()).hexdigest()
        cached = self._reviews.get(key)
        if isinstance(cached, TokenReview):
            return cached
        review = await self._ask(
            "a TokenReview", lambda: self.api.review_token(token, [self.audience])
        )
        seconds = self.cache_seconds
        expires = token_expiry(token) if review.authenticated else None
        if expires is not None:
            seconds = min(seconds, (expires - datetime.now(UTC)).total_seconds())
        self._reviews.put(key, review, seconds)
        return review

    async def verify(self, token: str) -> KubeCaller:
        """The pod ``token`` speaks for; AttestationError (the message is safe to return
        and log: it never holds the token) or KubeUnavailable."""
        token = token.strip()
        if not token or len(token) > MAX_TOKEN_BYTES:
            raise AttestationError("service-account token refused: empty or too long")
        review = await self._review(token)
        if not review.authenticated:
            why = f" ({review.error[:200]})" if review.error else ""
            raise AttestationError(
                f"service-account token refused by the API server{why}: invalid, expired, "
                f"revoked, its pod deleted, or not for audience {self.audience!r}"
            )
        if self.audience not in review.audiences:
            raise AttestationError(
                f"service-account token refused: its audiences {list(review.audiences)[:5]} "
                f"do not include {self.audience!r}"
            )
        namespace, account = _service_account(review.username)
        pod_name = _one(review.extra, POD_NAME)
        pod_uid = _one(review.extra, POD_UID)
        if not pod_name or not pod_uid:
            raise AttestationError(
                f"service-account token of {namespace}/{account} refused: it is not bound "
                "to a pod (use a projected token, audience "
                f"{self.audience!r}, from the pod's serviceAccountToken volume)"
            )
        pod = await self._ask("a Pod lookup", lambda: self.api.pod(namespace, pod_name))
        where = f"pod {namespace}/{pod_name}"
        if pod is None:
            raise AttestationError(f"service-account token refused: {where} no longer exists")
        if pod.uid != pod_uid:
            raise AttestationError(
                f"service-account token refused: {where} was re-created (uid {pod.uid}, "
                f"the token's is {pod_uid})"
            )
        if pod.service_account != account:
            raise AttestationError(
                f"service-account token refused: {where} runs as {pod.service_account!r}, "
                f"not the token's {account!r}"
            )
        if pod.terminated:
            raise AttestationError(f"service-account token refused: {where} is {pod.phase}")
        try:
            identity = SpiffeId.from_kubernetes(namespace, account, self.trust_domain)
        except SpiffeIdError as exc:
            raise AttestationError(f"service-account token refused: {exc}") from None
        expires = token_expiry(token) or datetime.now(UTC)
        return KubeCaller(pod, identity, f"{namespace}/{account}" in self.node_agents, expires)

    async def authorize(self, caller: KubeCaller, wanted: SpiffeId) -> None:
        """Whether ``caller`` may obtain ``wanted``: its own identity; for a node agent,
        the identity of a pod scheduled on its node. NotEntitled otherwise."""
        if wanted == caller.identity:
            return
        if wanted == self.node_proxy_identity(caller):
            return
        if caller.node_agent and await self.runs_on(wanted, caller.pod.node_name):
            return
        if caller.node_agent:
            raise NotEntitled(
                f"node agent {caller.describe()} may not obtain {wanted}: no running pod "
                f"with that identity is scheduled on its node {caller.pod.node_name!r}"
            )
        raise NotEntitled(f"{caller.describe()} may obtain only {caller.identity}, not {wanted}")

    def node_proxy_identity(self, caller: KubeCaller) -> SpiffeId | None:
        """The node proxy identity of ``caller``'s node, when it is a scheduled pod of the
        node proxies' service account (the node from the API server's pod)."""
        pod = caller.pod
        if self.node_proxy != f"{pod.namespace}/{pod.service_account}" or not pod.node_name:
            return None
        try:
            return SpiffeId.for_node_proxy(
                self.trust_domain, pod.namespace, pod.service_account, pod.node_name
            )
        except SpiffeIdError:
            return None

    async def runs_on(self, identity: SpiffeId, node: str) -> bool:
        """Whether a running pod with ``identity`` is scheduled on ``node``."""
        kube = identity.kubernetes if identity.trust_domain == self.trust_domain else None
        if kube is None or not node:
            return False
        key = f"{node}\0{kube[0]}\0{kube[1]}"
        cached = self._on_node.get(key)
        if isinstance(cached, bool):
            return cached
        pods = await self._ask("a Pod list", lambda: self.api.pods_on_node(kube[0], kube[1], node))
        found = any(p.node_name == node and not p.terminated for p in pods)
        self._on_node.put(key, found, NODE_CACHE_SECONDS)
        return found


def _service_account(username: str) -> tuple[str, str]:
    parts = username.split(":")
    if not username.startswith(SA_USER_PREFIX) or len(parts) != 4 or not all(parts[2:]):
        raise AttestationError(f"token refused: {username[:100]!r} is not a service account")
    return parts[2], parts[3]


def _one(extra: Mapping[str, Sequence[str]], key: str) -> str:
    values = extra.get(key, ())
    return values[0] if len(values) == 1 else ""


class KubeTokenAttestor:
    """``meshca agent --attestor k8s``: the evidence is the agent pod's projected token.

    A sidecar agent is named after its pod's UID (each pod incarnation is a new agent)
    and entitled to its pod's identity. A node agent is named ``node.<node name>`` and
    entitled, through registration entries naming it, to identities of pods scheduled on
    its node. Either may renew its agent SVID no longer than its token was valid: it then
    attests again with the token the kubelet has refreshed.
    """

    name = ATTESTOR

    def __init__(self, verifier: KubeTokenVerifier) -> None:
        self.verifier = verifier

    async def attest(self, evidence: bytes) -> Attestation:
        try:
            token = evidence.decode("ascii")
        except UnicodeDecodeError:
            raise AttestationError("service-account token refused: not a JWT") from None
        caller = await self.verifier.verify(token)
        if caller.node_agent:
            if not caller.pod.node_name:
                raise AttestationError(f"node agent {caller.describe()} is not scheduled")
            return Attestation(
                self.name,
                f"node.{caller.pod.node_name}",
                None,
                True,
                expires=caller.expires,
                kube_node=caller.pod.node_name,
                subject=caller.describe(),
            )
        return Attestation(
            self.name,
            caller.pod.uid,
            caller.identity,
            False,
            expires=caller.expires,
            subject=caller.describe(),
        )
