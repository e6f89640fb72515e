"""The CSR API servicer: attestation, agent renewal, workload signing.

Authentication, by call:

* ``AttestAgent``: the evidence (a join token) is the credential; the call needs no
  client certificate. The CSR is checked before the evidence is spent, so a malformed
  CSR does not burn a one-time token.
* every other call: mutual TLS with an agent SVID (an ID under ``/meshca/agent``) whose
  record is current. A workload SVID is refused (PERMISSION_DENIED, logged): stolen
  from a workload, it buys nothing here.

Only a CSR's public key is used (after its signature verifies); a CSR that names more
than the identity asked for, or asks for CA:true, is refused with INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, NoReturn

import grpc
import grpc.aio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshca.attest.attestor import AttestationError, Attestor
from meshca.attest.entries import EntryStore, RegistrationEntry
from meshca.attest.kube_tokens import KubeTokenVerifier, KubeUnavailable
from meshca.attest.records import AgentRecord, AgentRecords
from meshca.attest.state_file import StateFileError
from meshca.ca_api import ca_pb2
from meshca.ca_api.presented import PresentedCertificates
from meshca.ca_api.rpc import add_agent_ca
from meshca.ca_api.sightings import AgentSightings
from meshca.issuer import ActiveSigner, Issuer, IssuerError, X509Svid
from meshca.issuer.csr import check_csr_claims, csr_public_key, load_csr
from meshca.issuer.errors import BACKEND_UNAVAILABLE, CsrError, KeyTypeError, SvidError, TtlError
from meshca.issuer.jwt_svid import DEFAULT_JWT_TTL, JwtAuthorities, JwtError
from meshca.issuer.svid import MALFORMED_CERTIFICATE, certificates_der
from meshca.spiffe import SpiffeId, SpiffeIdError
from meshca.util.aio import call_inline_or_in_thread
from meshca.util.formats import rfc3339, serial_hex
from meshca.util.logger import get_logger

log = get_logger("meshca.ca_api")

Context = grpc.aio.ServicerContext[Any, Any]
SERVICE_NAME = "meshca.ca.v1.AgentCA"
DEFAULT_AGENT_TTL = timedelta(hours=1)
DEFAULT_AGENT_MAX_AGE = timedelta(days=30)
MIN_AGENT_TTL = timedelta(minutes=1)  # a renewal shorter than this is refused: attest again
_SHOWN = 200  # characters of a caller-supplied value a log line or error may repeat
MAX_BATCH = 64  # CSRs in one BatchSignWorkload call
MAX_BATCH_CSR_BYTES = 1024 * 1024  # their CSRs together
# A batch signed here (EC, a key in this process) is signed on the loop, as one CSR is,
# this many entries at a time (2-3 ms), other calls and streams running between: a
# thread hand-off costs more CPU than it saves (bench/agent.py --batch 16: 2,000 vs 2,350
# CSRs per server CPU-second) and, under the GIL, buys no parallelism.
INLINE_CHUNK = 8


def _shown(text: str) -> str:
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


class Refused(Exception):
    """What a call (or one entry of a batch) is refused with: its gRPC code and message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@lru_cache(maxsize=1024)
def _parsed_id(text: str) -> SpiffeId:
    """``SpiffeId.parse``, remembered: agents ask for the same few IDs on every call.
    Only IDs that parse are kept (at most 2 KB each), so the cache is bounded."""
    return SpiffeId.parse(text)


class AgentCaServicer:
    def __init__(
        self,
        issuer: Issuer,
        records: AgentRecords,
        attestors: Sequence[Attestor],
        *,
        agent_ttl: timedelta = DEFAULT_AGENT_TTL,
        agent_max_age: timedelta = DEFAULT_AGENT_MAX_AGE,
        jwt: JwtAuthorities | None = None,
        entries: EntryStore | None = None,
        kube: KubeTokenVerifier | None = None,
        sightings: AgentSightings | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if agent_ttl < MIN_AGENT_TTL or agent_max_age < agent_ttl:
            raise ValueError("the agent TTL must be at least 1m and at most the agent max age")
        self.issuer = issuer
        self.records = records
        self.attestors: Mapping[str, Attestor] = {a.name: a for a in attestors}
        self.agent_ttl = agent_ttl
        self.agent_max_age = agent_max_age
        self.trust_domain = issuer.trust_domain
        self.jwt = jwt or JwtAuthorities()  # read at every call: rotation replaces the key
        self.sightings = sightings or AgentSightings()  # what root rotation waits on
        self.entries = entries
        self.kube = kube  # Kubernetes node agents' entries are checked against their node
        self.presented = PresentedCertificates()  # agents' client certificates, parsed once
        self.clock = clock  # what a presented certificate's validity is checked against
        self.refusals = 0

    # --- shared pieces ----------------------------------------------------------------
    def note_refusal(self, context: Context, code: grpc.StatusCode, message: str) -> None:
        """Count and log a refusal (INVALID_ARGUMENT at INFO, the others at WARNING)."""
        self.refusals += 1
        level = logging.INFO if code is grpc.StatusCode.INVALID_ARGUMENT else logging.WARNING
        log.log(level, "CSR API refused %s: %s", context.peer(), message)

    async def refuse(self, context: Context, code: grpc.StatusCode, message: str) -> NoReturn:
        self.note_refusal(context, code, message)
        await context.abort(code, message)
        raise AssertionError("abort returned")  # pragma: no cover

    async def _checked_csr(
        self,
        context: Context,
        data: bytes,
        spiffe_id: SpiffeId | None,
        *,
        verify: bool = False,
    ) -> x509.CertificateSigningRequest:
        """``data`` read, when it is a CSR meshca will sign for ``spiffe_id`` (None: a CSR
        that names nothing); else the call ends with INVALID_ARGUMENT. Its signature
        (proof of possession) is checked here only with ``verify``: signing checks it."""
        try:
            return checked_csr(data, spiffe_id, verify=verify)
        except Refused as exc:
            await self.refuse(context, exc.code, exc.message)

    def signed(
        self,
        spiffe_id: SpiffeId,
        csr: bytes | x509.CertificateSigningRequest,
        ttl: timedelta | None,
    ) -> X509Svid:
        """``csr``'s key certified for ``spiffe_id``, or :class:`Refused`: INVALID_ARGUMENT
        for the caller's own request, UNAVAILABLE (detail in this server's log only) when
        the CA cannot sign."""
        try:
            return self.issuer.sign_csr(spiffe_id, csr, ttl=ttl)
        except (CsrError, KeyTypeError, TtlError) as exc:  # about the caller's own request
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        except IssuerError as exc:
            # The CA's own state or its backend (a Vault address, a backend's wording): the
            # detail is for the operator's log, never for the caller.
            log.warning("CSR API cannot sign for %s: %s", spiffe_id, exc)
            raise Refused(
                grpc.StatusCode.UNAVAILABLE, f"cannot sign for {spiffe_id}: {BACKEND_UNAVAILABLE}"
            ) from None

    async def sign(
        self,
        context: Context,
        spiffe_id: SpiffeId,
        csr: bytes | x509.CertificateSigningRequest,
        ttl: timedelta | None,
    ) -> X509Svid:
        """:meth:`signed` on the loop when that is a fraction of a millisecond (an EC key
        signed here), else in a thread; a refusal ends the call."""
        try:
            return await call_inline_or_in_thread(
                self.issuer.issues_quickly(), self.signed, spiffe_id, csr, ttl
            )
        except Refused as exc:
            await self.refuse(context, exc.code, exc.message)

    async def _node_entries(self, context: Context, record: AgentRecord) -> list[RegistrationEntry]:
        """A node agent's entries; for a Kubernetes node agent, only those whose identity
        has a running pod scheduled on the agent's own node."""
        if not record.node or self.entries is None:
            return []
        entries = self.entries.for_node(record.agent_id)
        if record.kube_node is None:
            return entries
        if self.kube is None:
            return []  # attested by a server with --kubernetes; this one cannot check
        try:
            return [e for e in entries if await self.kube.runs_on(e.spiffe_id, record.kube_node)]
        except KubeUnavailable as exc:
            log.warning("cannot check the pods of node %s: %s", record.kube_node, exc)
            await self.refuse(context, grpc.StatusCode.UNAVAILABLE, str(exc))

    async def _entitlements(self, context: Context, record: AgentRecord) -> tuple[SpiffeId, ...]:
        """Sidecar: the token's identity. Node: the identities of the entries naming it."""
        if record.node:
            entries = await self._node_entries(context, record)
            return tuple(dict.fromkeys(e.spiffe_id for e in entries))
        return record.entitled()

    def _bundle_der(self) -> list[bytes]:
        """The trust bundle, as DER. Sending it is no ACK: the agent reports the roots
        it applied at its next ``GetBundle``."""
        return certificates_der(self.issuer.bundle().roots)

    async def _response(
        self, context: Context, svid: X509Svid, record: AgentRecord
    ) -> ca_pb2.SvidResponse:
        return ca_pb2.SvidResponse(
            spiffe_id=str(svid.spiffe_id),
            cert_chain=_chain_der(svid),
            bundle=self._bundle_der(),
            entitled=[str(i) for i in await self._entitlements(context, record)],
            reattest_by=int(record.reattest_by.timestamp()),
        )

    async def _entitled(self, context: Context, record: AgentRecord, text: str) -> SpiffeId:
        """The SPIFFE ID ``text`` names, when the agent is entitled to it; else the call ends
        (PERMISSION_DENIED, logged)."""
        try:
            return authorized(record, await self._entitlements(context, record), text)
        except Refused as exc:
            await self.refuse(context, exc.code, exc.message)

    async def _agent(self, context: Context) -> AgentRecord:
        """The calling agent's record: mutual TLS with a current agent SVID, or the call ends."""
        pems = list(context.auth_context().get("x509_pem_cert", ()))
        if not pems:
            await self.refuse(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                "this call needs mutual TLS with an agent SVID (attest first with AttestAgent)",
            )
        try:
            presented = self.presented.read(pems[0])
        except (SvidError, *MALFORMED_CERTIFICATE) as exc:
            await self.refuse(
                context, grpc.StatusCode.UNAUTHENTICATED, f"client certificate refused: {exc}"
            )
        caller, now = presented.spiffe_id, self.clock()
        certificate = presented.certificate
        if not certificate.not_valid_before_utc <= now < certificate.not_valid_after_utc:
            # TLS checked it when the connection opened; a connection outlives it.
            await self.refuse(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                f"the client certificate of {caller} is not valid now (valid "
                f"{rfc3339(certificate.not_valid_before_utc)} to "
                f"{rfc3339(certificate.not_valid_after_utc)}): reconnect with a current one",
            )
        if not caller.is_agent:
            await self.refuse(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{caller} is a workload SVID: only agent SVIDs (spiffe://"
                f"{self.trust_domain}/meshca/agent/...) may use the CSR API",
            )
        try:
            record = self.records.get(caller)
        except StateFileError as exc:
            log.error("cannot read the agent records: %s", exc)
            await self.refuse(context, grpc.StatusCode.UNAVAILABLE, "agent records unreadable")
        if record is None:
            await self.refuse(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"agent {caller} is not attested (unknown or evicted): attest again",
            )
        if now >= record.reattest_by:
            await self.refuse(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"agent {caller} reached its maximum age at {rfc3339(record.reattest_by)}: "
                "attest again",
            )
        self.sightings.called(caller, certificate)
        return record

    # --- the calls -----------------------------------------------------------------------
    async def AttestAgent(
        self, request: ca_pb2.AttestAgentRequest, context: Context
    ) -> ca_pb2.SvidResponse:
        attestor = self.attestors.get(request.attestor)
        if attestor is None:
            await self.refuse(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"unknown attestor {_shown(request.attestor)!r}: this server accepts "
                f"{', '.join(sorted(self.attestors))}",
            )
        # The agent ID is not known before the evidence is read, so its first CSR names
        # nothing; it is checked before the evidence, so a bad CSR spends no token.
        csr = await self._checked_csr(context, request.csr, None, verify=True)
        try:
            attestation = await attestor.attest(request.evidence)
        except AttestationError as exc:
            await self.refuse(context, grpc.StatusCode.UNAUTHENTICATED, str(exc))
        except KubeUnavailable as exc:
            log.warning("cannot attest an agent now: %s", exc)
            await self.refuse(context, grpc.StatusCode.UNAVAILABLE, str(exc))
        except StateFileError as exc:
            log.error("cannot read the join tokens: %s", exc)
            await self.refuse(context, grpc.StatusCode.UNAVAILABLE, "join tokens unreadable")
        agent_id = SpiffeId.for_agent(self.trust_domain, attestation.attestor, attestation.name)
        now = datetime.now(UTC)
        reattest_by = now + self.agent_max_age
        if attestation.expires is not None:  # renewals end with the evidence's own life
            reattest_by = min(reattest_by, attestation.expires)
        record = AgentRecord(
            agent_id,
            attestation.identity,
            attestation.node,
            now,
            reattest_by,
            attestation.attestor,
            attestation.kube_node,
        )
        svid = await self.sign(context, agent_id, csr, self._agent_ttl(record, now))
        await asyncio.to_thread(self.records.add, record)
        log.info(
            "attested agent %s (%s%s) for %s until %s",
            agent_id,
            attestation.attestor,
            f": {attestation.subject}" if attestation.subject else "",
            ", ".join(str(i) for i in record.entitled()) or "registration entries",
            rfc3339(record.reattest_by),
        )
        return await self._response(context, svid, record)

    def _agent_ttl(self, record: AgentRecord, now: datetime) -> timedelta:
        return min(self.agent_ttl, record.reattest_by - now)

    async def RenewAgent(
        self, request: ca_pb2.RenewAgentRequest, context: Context
    ) -> ca_pb2.SvidResponse:
        record = await self._agent(context)
        csr = await self._checked_csr(context, request.csr, record.agent_id)
        ttl = self._agent_ttl(record, datetime.now(UTC))
        if ttl < MIN_AGENT_TTL:
            await self.refuse(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"agent {record.agent_id} is at its maximum age "
                f"({rfc3339(record.reattest_by)}): attest again",
            )
        svid = await self.sign(context, record.agent_id, csr, ttl)
        log.info("renewed agent %s serial=%s", record.agent_id, serial_hex(svid.serial))
        return await self._response(context, svid, record)

    async def SignWorkload(
        self, request: ca_pb2.SignWorkloadRequest, context: Context
    ) -> ca_pb2.SvidResponse:
        record = await self._agent(context)
        spiffe_id = await self._entitled(context, record, request.spiffe_id)
        csr = await self._checked_csr(context, request.csr, spiffe_id)
        svid = await self.sign(context, spiffe_id, csr, _ttl(request))
        _log_signed(svid, record)
        return await self._response(context, svid, record)

    async def BatchSignWorkload(
        self, request: ca_pb2.BatchSignWorkloadRequest, context: Context
    ) -> ca_pb2.BatchSignWorkloadResponse:
        """Several workload CSRs, each authorized, checked and signed on its own: a refused
        entry is answered with its refusal (logged as a call's would be), the others are
        signed. The batch as a whole is refused only for what concerns every entry: the
        agent's credential, or a batch over :data:`MAX_BATCH` entries or
        :data:`MAX_BATCH_CSR_BYTES`."""
        record = await self._agent(context)
        entries = list(request.requests)
        csr_bytes = sum(len(entry.csr) for entry in entries)
        if not entries or len(entries) > MAX_BATCH or csr_bytes > MAX_BATCH_CSR_BYTES:
            await self.refuse(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"a batch holds 1 to {MAX_BATCH} CSRs of at most {MAX_BATCH_CSR_BYTES} bytes "
                f"in all; this one holds {len(entries)} of {csr_bytes} bytes",
            )
        entitled = await self._entitlements(context, record)
        wanted: list[SpiffeId | Refused] = []
        for entry in entries:
            try:
                wanted.append(authorized(record, entitled, entry.spiffe_id))
            except Refused as refusal:
                wanted.append(refusal)
        outcomes: list[X509Svid | Refused] = []
        if self.issuer.issues_quickly():
            for start in range(0, len(entries), INLINE_CHUNK):
                if start:
                    await asyncio.sleep(0)
                end = start + INLINE_CHUNK
                outcomes += self._sign_batch(entries[start:end], wanted[start:end])
        else:  # a remote signer (Vault), or RSA: the whole batch in one thread
            outcomes = await asyncio.to_thread(self._sign_batch, entries, wanted)
        results = []
        for outcome in outcomes:
            if isinstance(outcome, Refused):
                self.note_refusal(context, outcome.code, outcome.message)
                results.append(ca_pb2.SignResult(code=outcome.code.value[0], error=outcome.message))
            else:
                _log_signed(outcome, record)
                results.append(
                    ca_pb2.SignResult(
                        spiffe_id=str(outcome.spiffe_id), cert_chain=_chain_der(outcome)
                    )
                )
        return ca_pb2.BatchSignWorkloadResponse(
            results=results,
            bundle=self._bundle_der(),
            entitled=[str(i) for i in entitled],
            reattest_by=int(record.reattest_by.timestamp()),
        )

    def _sign_batch(
        self,
        entries: list[ca_pb2.SignWorkloadRequest],
        wanted: list[SpiffeId | Refused],
    ) -> list[X509Svid | Refused]:
        """Each authorized entry's CSR checked and signed, in order."""
        outcomes: list[X509Svid | Refused] = []
        for entry, spiffe_id in zip(entries, wanted, strict=True):
            if isinstance(spiffe_id, Refused):
                outcomes.append(spiffe_id)
                continue
            try:
                csr = checked_csr(entry.csr, spiffe_id)
                outcomes.append(self.signed(spiffe_id, csr, _ttl(entry)))
            except Refused as refusal:
                outcomes.append(refusal)
        return outcomes

    async def GetBundle(
        self, request: ca_pb2.GetBundleRequest, context: Context
    ) -> ca_pb2.BundleResponse:
        record = await self._agent(context)
        authority = self.issuer.authority
        chain = (
            (authority.signer.certificate, *authority.signer.intermediates)
            if isinstance(authority, ActiveSigner)
            else ()
        )
        entries = await self._node_entries(context, record)
        jwt_bundle = self._jwt_bundle()
        # Its reports of the roots and JWT key set it holds: the ACKs a root rotation and
        # a JWT key activation wait for.
        self.sightings.held_roots(
            record.agent_id, request.trust_bundle_sha256, self.issuer.bundle()
        )
        self.sightings.held_jwt(record.agent_id, request.jwt_kids, self.jwt.kids)
        return ca_pb2.BundleResponse(
            bundle=self._bundle_der(),
            entitled=[str(i) for i in dict.fromkeys(e.spiffe_id for e in entries)]
            if record.node
            else [str(i) for i in record.entitled()],
            reattest_by=int(record.reattest_by.timestamp()),
            signing_chain=[c.public_bytes(serialization.Encoding.DER) for c in chain],
            jwt_bundle=jwt_bundle,
            node=record.node,
            entries=[
                ca_pb2.RegistrationEntry(
                    id=e.id, spiffe_id=str(e.spiffe_id), selectors=list(e.selectors)
                )
                for e in entries
            ],
        )

    def _jwt_bundle(self) -> bytes:
        return self.jwt.bundle_json()

    async def SignJwt(self, request: ca_pb2.SignJwtRequest, context: Context) -> ca_pb2.JwtResponse:
        record = await self._agent(context)
        spiffe_id = await self._entitled(context, record, request.spiffe_id)
        signer = self.jwt.current()
        if signer is None:
            await self.refuse(
                context, grpc.StatusCode.FAILED_PRECONDITION, "this server signs no JWT-SVIDs"
            )
        ttl = timedelta(seconds=request.ttl_seconds) if request.ttl_seconds else DEFAULT_JWT_TTL
        try:
            token, expires = signer.sign(spiffe_id, list(request.audience), ttl)
        except JwtError as exc:
            await self.refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        log.info("signed a JWT-SVID for %s (agent %s)", spiffe_id, record.agent_id)
        return ca_pb2.JwtResponse(token=token, expires_at=int(expires.timestamp()))


def checked_csr(
    data: bytes, spiffe_id: SpiffeId | None, *, verify: bool = False
) -> x509.CertificateSigningRequest:
    """``data`` read, when it is a CSR meshca will sign for ``spiffe_id`` (None: one that
    names nothing); else :class:`Refused` (INVALID_ARGUMENT)."""
    try:
        csr = load_csr(data)
        if verify:
            csr_public_key(csr)
        check_csr_claims(csr, None if spiffe_id is None else str(spiffe_id))
    except IssuerError as exc:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
    return csr


def authorized(record: AgentRecord, entitled: Sequence[SpiffeId], text: str) -> SpiffeId:
    """The SPIFFE ID ``text`` names, when it is among the agent's ``entitled``; else
    :class:`Refused` (INVALID_ARGUMENT, or PERMISSION_DENIED)."""
    try:
        spiffe_id = _parsed_id(text)
    except SpiffeIdError as exc:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, _shown(str(exc))) from None
    if spiffe_id not in entitled:
        raise Refused(
            grpc.StatusCode.PERMISSION_DENIED,
            f"agent {record.agent_id} is not entitled to {spiffe_id}",
        )
    return spiffe_id


def _ttl(request: ca_pb2.SignWorkloadRequest) -> timedelta | None:
    return timedelta(seconds=request.ttl_seconds) if request.ttl_seconds else None


def _chain_der(svid: X509Svid) -> list[bytes]:
    """The leaf's DER, then the intermediates' (encoded once per signing CA)."""
    leaf = svid.chain[0].public_bytes(serialization.Encoding.DER)
    return [leaf, *certificates_der(svid.chain[1:])]


def _log_signed(svid: X509Svid, record: AgentRecord) -> None:
    if log.isEnabledFor(logging.INFO):  # its fields are not formatted for nothing
        log.info(
            "signed %s for agent %s serial=%s not_after=%s",
            svid.spiffe_id,
            record.agent_id,
            serial_hex(svid.serial),
            rfc3339(svid.not_after),
        )


def add_agent_ca_to_server(servicer: AgentCaServicer, server: grpc.aio.Server) -> None:
    add_agent_ca(servicer, server)
