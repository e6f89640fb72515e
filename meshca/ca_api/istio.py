"""Istio's CA API, ``istio.v1.auth.IstioCertificateService/CreateCertificate``, so that
istio-agent (pilot-agent) and ztunnel can use meshca as their CA (``istio_ca.proto`` is
Istio's, names and field numbers unchanged).

Authentication is Istio's: a projected service-account token as ``authorization:
Bearer <token>`` metadata, verified by TokenReview (``meshca.attest.kube_tokens``). The
certificate is for the token pod's identity, ``spiffe://<td>/ns/<ns>/sa/<sa>``; the CSR's
subjectAltName must be exactly that identity. A node agent (ztunnel) names the workload
it asks for in the request's ``ImpersonatedIdentity`` metadata, and obtains it only for a
pod scheduled on its own node. The answer is Istio's: PEM certificates, the leaf first,
then the intermediates, then the trust bundle's roots as the last element.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import grpc
import grpc.aio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshca.attest.attestor import AttestationError
from meshca.attest.kube_tokens import KubeCaller, KubeTokenVerifier, KubeUnavailable, NotEntitled
from meshca.ca_api import istio_ca_pb2
from meshca.ca_api.rpc import add_unary_service
from meshca.ca_api.service import AgentCaServicer, Context, _shown
from meshca.issuer import IssuerError
from meshca.issuer.csr import check_csr_claims, load_csr
from meshca.issuer.errors import CsrError
from meshca.spiffe import SpiffeId, SpiffeIdError
from meshca.util.formats import rfc3339, serial_hex
from meshca.util.logger import get_logger

log = get_logger("meshca.ca_api.istio")

SERVICE = istio_ca_pb2.DESCRIPTOR.services_by_name["IstioCertificateService"]
SERVICE_NAME = SERVICE.full_name  # istio.v1.auth.IstioCertificateService
BEARER = "bearer "
IMPERSONATED_IDENTITY = "ImpersonatedIdentity"  # ztunnel's metadata key


def bearer_token(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The token of the call's ``authorization: Bearer <token>`` metadata, if any."""
    for key, value in context.invocation_metadata() or ():
        if (
            key.lower() == "authorization"
            and isinstance(value, str)
            and value[: len(BEARER)].lower() == BEARER
        ):
            return value[len(BEARER) :].strip()
    return None


class IstioCertificateServicer:
    """Signs through the CSR API's servicer (the same issuer, refusals and logs)."""

    def __init__(self, ca: AgentCaServicer, kube: KubeTokenVerifier) -> None:
        self.ca = ca
        self.kube = kube

    async def _caller(self, context: Context) -> KubeCaller:
        token = bearer_token(context)
        if token is None:
            await self.ca.refuse(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                "no 'authorization: Bearer <service-account token>' metadata",
            )
        try:
            return await self.kube.verify(token)
        except AttestationError as exc:
            await self.ca.refuse(context, grpc.StatusCode.UNAUTHENTICATED, str(exc))
        except KubeUnavailable as exc:
            log.warning("cannot verify an Istio caller's token now: %s", exc)
            await self.ca.refuse(context, grpc.StatusCode.UNAVAILABLE, str(exc))

    async def _wanted(
        self, context: Context, caller: KubeCaller, request: istio_ca_pb2.IstioCertificateRequest
    ) -> SpiffeId:
        """The caller's own identity, or the one it impersonates (a node agent only)."""
        fields = request.metadata.fields if request.HasField("metadata") else {}
        value = fields.get(IMPERSONATED_IDENTITY)
        text = value.string_value if value is not None else ""
        if not text:
            return caller.identity
        try:
            wanted = SpiffeId.parse(text)
        except SpiffeIdError as exc:
            await self.ca.refuse(context, grpc.StatusCode.INVALID_ARGUMENT, _shown(str(exc)))
        try:
            await self.kube.authorize(caller, wanted)
        except NotEntitled as exc:
            await self.ca.refuse(context, grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except KubeUnavailable as exc:
            await self.ca.refuse(context, grpc.StatusCode.UNAVAILABLE, str(exc))
        return wanted

    async def _checked_csr(self, context: Context, pem: str, wanted: SpiffeId) -> bytes:
        data = pem.encode("utf-8", "replace")
        try:
            csr = load_csr(data)
            check_csr_claims(csr, str(wanted))
            if not _names(csr):
                raise CsrError(f"CSR refused: its subjectAltName must be {wanted}")
        except IssuerError as exc:
            await self.ca.refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return data

    async def CreateCertificate(
        self, request: istio_ca_pb2.IstioCertificateRequest, context: Context
    ) -> istio_ca_pb2.IstioCertificateResponse:
        caller = await self._caller(context)
        wanted = await self._wanted(context, caller, request)
        csr = await self._checked_csr(context, request.csr, wanted)
        if request.validity_duration < 0:
            await self.ca.refuse(
                context, grpc.StatusCode.INVALID_ARGUMENT, "validity_duration is negative"
            )
        ttl = timedelta(seconds=request.validity_duration) if request.validity_duration else None
        svid = await self.ca.sign(context, wanted, csr, ttl)
        log.info(
            "signed %s for %s (Istio CreateCertificate) serial=%s not_after=%s",
            wanted,
            caller.describe(),
            serial_hex(svid.serial),
            rfc3339(svid.not_after),
        )
        pem = serialization.Encoding.PEM
        roots = b"".join(root.public_bytes(pem) for root in self.ca.issuer.bundle())
        chain = [c.public_bytes(pem).decode() for c in svid.chain]
        return istio_ca_pb2.IstioCertificateResponse(cert_chain=[*chain, roots.decode()])


def _names(csr: x509.CertificateSigningRequest) -> list[object]:
    try:
        return list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return []


def add_istio_ca(servicer: IstioCertificateServicer, server: grpc.aio.Server) -> None:
    add_unary_service(servicer, server, SERVICE)
