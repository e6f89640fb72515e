"""The agent's side of meshca's CSR API (``meshca.ca.v1.AgentCA``).

Blocking calls (the secret store signs from a worker thread). One channel per agent
credential and bundle: when the agent's SVID is renewed or the bundle changes, the
next call opens a new channel with them and closes the old one, so a root rotation is
followed as soon as the agent has seen the new bundle.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.protobuf.message import Message

from meshca.ca_api import ca_pb2
from meshca.ca_api.rpc import AgentCaStub
from meshca.issuer import IssuerError, TrustBundle, X509Svid
from meshca.issuer.keys import PrivateKey
from meshca.issuer.profile import hash_for
from meshca.spiffe import SpiffeId, TrustDomain

JOIN_TOKEN = "join_token"
DEFAULT_CALL_TIMEOUT = 10.0


class CaUnavailable(IssuerError):
    """meshca serve could not be reached or did not answer in time (retried with backoff)."""


class CaRefused(IssuerError):
    """meshca serve refused the call; the message is the server's."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"meshca refused ({code.name}): {message}")
        self.code = code


@dataclass(frozen=True)
class Signed:
    """An answer of the CSR API: the SVID, the current bundle, the agent's entitlements."""

    svid: X509Svid
    bundle: TrustBundle
    entitled: tuple[SpiffeId, ...]
    reattest_by: datetime


@dataclass(frozen=True)
class Entry:
    """A registration entry as a node-mode agent sees it."""

    spiffe_id: SpiffeId
    selectors: tuple[str, ...]


@dataclass(frozen=True)
class ServerState:
    """What ``GetBundle`` says: the bundle, the agent's entitlements and maximum age, and
    the chain meshca signs with now (empty when a remote backend signs)."""

    bundle: TrustBundle
    entitled: tuple[SpiffeId, ...]
    reattest_by: datetime
    signing_chain: tuple[x509.Certificate, ...]
    jwt_bundle: bytes = b""
    node: bool = False
    entries: tuple[Entry, ...] = ()

    def issued(self, svid: X509Svid) -> bool:
        """Whether ``svid`` comes from the CA meshca signs with now (True when unknown)."""
        return not self.signing_chain or svid.intermediates == self.signing_chain


def bare_csr(key: PrivateKey) -> bytes:
    """A CSR that names nothing: the agent's first, before it knows its ID."""
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    return csr.sign(key, hash_for(key)).public_bytes(serialization.Encoding.DER)


def _status(code: int) -> grpc.StatusCode:
    """The gRPC status code numbered ``code`` (UNKNOWN for a number it does not have)."""
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status
    return grpc.StatusCode.UNKNOWN


def _bundle(trust_domain: TrustDomain, ders: list[bytes]) -> TrustBundle:
    return TrustBundle.of(trust_domain, [x509.load_der_x509_certificate(d) for d in ders])


class CaClient:
    def __init__(
        self,
        server: str,
        trust_domain: TrustDomain,
        bundle: TrustBundle,
        *,
        attest_server: str | None = None,
        timeout: float = DEFAULT_CALL_TIMEOUT,
    ) -> None:
        self.server = server
        self.attest_server = attest_server or server
        self.trust_domain = trust_domain
        self.timeout = timeout
        self._lock = threading.Lock()
        self._bundle = bundle
        self._credential: X509Svid | None = None
        self._channel: grpc.Channel | None = None
        self._channel_key: tuple[int, bytes] | None = None

    # state -----------------------------------------------------------------------------
    @property
    def bundle(self) -> TrustBundle:
        return self._bundle

    def use(self, credential: X509Svid | None = None, bundle: TrustBundle | None = None) -> None:
        """Present ``credential`` (the agent SVID, with its key) and trust ``bundle`` from
        the next call on."""
        with self._lock:
            self._credential = credential or self._credential
            self._bundle = bundle if bundle is not None else self._bundle

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
            self._channel = None
            self._channel_key = None

    def _stub(self) -> AgentCaStub:
        with self._lock:
            credential = self._credential
            if credential is None:
                raise CaUnavailable("the agent has no agent SVID yet: attest first")
            key = (credential.serial, self._bundle.pem())
            if self._channel is None or self._channel_key != key:
                old = self._channel
                creds = grpc.ssl_channel_credentials(
                    self._bundle.pem(), credential.private_key_pem(), credential.chain_pem()
                )
                self._channel = grpc.secure_channel(self.server, creds)
                self._channel_key = key
                if old is not None:
                    old.close()
            return AgentCaStub(self._channel)

    def _call(self, method: str, request: Message, stub: AgentCaStub) -> Message:
        try:
            return stub.call(method, request, timeout=self.timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
            details = (exc.details() if hasattr(exc, "details") else "") or ""
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise CaUnavailable(f"meshca at {self.server} is unavailable: {details}") from None
            raise CaRefused(code, details) from None

    def _signed(self, response: ca_pb2.SvidResponse, key: PrivateKey | None) -> Signed:
        chain = tuple(x509.load_der_x509_certificate(d) for d in response.cert_chain)
        svid = X509Svid(SpiffeId.parse(response.spiffe_id), chain, key)
        bundle = _bundle(self.trust_domain, list(response.bundle))
        entitled = tuple(SpiffeId.parse(i) for i in response.entitled)
        reattest_by = datetime.fromtimestamp(response.reattest_by, UTC)
        return Signed(svid, bundle, entitled, reattest_by)

    # calls -----------------------------------------------------------------------------
    def attest(self, token: str, key: PrivateKey, attestor: str = JOIN_TOKEN) -> Signed:
        """Exchange evidence (a join token, or a Kubernetes service-account token for the
        ``k8s`` attestor) for an agent SVID over server-authenticated TLS."""
        creds = grpc.ssl_channel_credentials(self._bundle.pem())
        with grpc.secure_channel(self.attest_server, creds) as channel:
            request = ca_pb2.AttestAgentRequest(
                attestor=attestor, evidence=token.strip().encode(), csr=bare_csr(key)
            )
            stub = AgentCaStub(channel)
            response = self._call("AttestAgent", request, stub)
        assert isinstance(response, ca_pb2.SvidResponse)
        return self._signed(response, key)

    def renew(self, key: PrivateKey) -> Signed:
        request = ca_pb2.RenewAgentRequest(csr=bare_csr(key))
        response = self._call("RenewAgent", request, self._stub())
        assert isinstance(response, ca_pb2.SvidResponse)
        return self._signed(response, key)

    def sign(self, spiffe_id: SpiffeId, csr_der: bytes, ttl: timedelta | None = None) -> Signed:
        seconds = int(ttl.total_seconds()) if ttl is not None else 0
        request = ca_pb2.SignWorkloadRequest(
            spiffe_id=str(spiffe_id), csr=csr_der, ttl_seconds=seconds
        )
        response = self._call("SignWorkload", request, self._stub())
        assert isinstance(response, ca_pb2.SvidResponse)
        return self._signed(response, None)

    def sign_batch(
        self, requests: Sequence[tuple[SpiffeId, bytes, timedelta | None]]
    ) -> list[Signed | CaRefused]:
        """``BatchSignWorkload``: each ``(spiffe_id, csr_der, ttl)`` answered on its own, in
        order: its :class:`Signed`, or the :class:`CaRefused` SignWorkload would have
        raised. A refusal of the whole call (the agent's credential, a batch too large)
        raises as :meth:`sign` does."""
        request = ca_pb2.BatchSignWorkloadRequest(
            requests=[
                ca_pb2.SignWorkloadRequest(
                    spiffe_id=str(spiffe_id),
                    csr=csr,
                    ttl_seconds=int(ttl.total_seconds()) if ttl is not None else 0,
                )
                for spiffe_id, csr, ttl in requests
            ]
        )
        response = self._call("BatchSignWorkload", request, self._stub())
        assert isinstance(response, ca_pb2.BatchSignWorkloadResponse)
        bundle = _bundle(self.trust_domain, list(response.bundle))
        entitled = tuple(SpiffeId.parse(i) for i in response.entitled)
        reattest_by = datetime.fromtimestamp(response.reattest_by, UTC)
        answers: list[Signed | CaRefused] = []
        for result in response.results:
            if result.code:
                answers.append(CaRefused(_status(result.code), result.error))
                continue
            chain = tuple(x509.load_der_x509_certificate(d) for d in result.cert_chain)
            svid = X509Svid(SpiffeId.parse(result.spiffe_id), chain, None)
            answers.append(Signed(svid, bundle, entitled, reattest_by))
        if len(answers) != len(requests):
            raise CaRefused(
                grpc.StatusCode.INTERNAL,
                f"meshca answered {len(answers)} entries of a batch of {len(requests)}",
            )
        return answers

    def fetch_bundle(
        self, jwt_kids: Sequence[str] = (), root_sha256: Sequence[bytes] = ()
    ) -> ServerState:
        """What meshca serve says now; ``jwt_kids`` (the JWT authorities this agent holds)
        and ``root_sha256`` (the SHA-256 of each trust-bundle root it holds) acknowledge
        the key set and bundle it fetched before, once applied and pushed."""
        request = ca_pb2.GetBundleRequest(
            jwt_kids=list(jwt_kids), trust_bundle_sha256=list(root_sha256)
        )
        response = self._call("GetBundle", request, self._stub())
        assert isinstance(response, ca_pb2.BundleResponse)
        return ServerState(
            _bundle(self.trust_domain, list(response.bundle)),
            tuple(SpiffeId.parse(i) for i in response.entitled),
            datetime.fromtimestamp(response.reattest_by, UTC),
            tuple(x509.load_der_x509_certificate(d) for d in response.signing_chain),
            bytes(response.jwt_bundle),
            response.node,
            tuple(Entry(SpiffeId.parse(e.spiffe_id), tuple(e.selectors)) for e in response.entries),
        )

    def sign_jwt(
        self, spiffe_id: SpiffeId, audience: list[str], ttl: timedelta | None = None
    ) -> tuple[str, datetime]:
        seconds = int(ttl.total_seconds()) if ttl is not None else 0
        request = ca_pb2.SignJwtRequest(
            spiffe_id=str(spiffe_id), audience=audience, ttl_seconds=seconds
        )
        response = self._call("SignJwt", request, self._stub())
        assert isinstance(response, ca_pb2.JwtResponse)
        return response.token, datetime.fromtimestamp(response.expires_at, UTC)
