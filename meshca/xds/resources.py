"""The xDS vocabulary, written once for both sides of the wire: the type URLs, how
resources and sets of resources are versioned, and the SDS secret-name scheme, formatted
(:func:`service_cert_name` & co., used by the Envoy generator) and parsed
(:func:`parse_secret_name`, used by the Secret source) in one place.

A name parsed says only *what* it asks for; whether the caller may have it is decided in
:mod:`meshca.sds.secrets`. Every refusal is a :class:`SecretNameError` whose message
names the secret and says what a valid name looks like.

==========================================  =========================================
name                                        request
==========================================  =========================================
``service-cert:<ns>/<sa>``                  :class:`CertificateRequest` (that identity)
``root-cert-for-mtls-outbound:<ns>/<svc>``  :class:`OutboundValidationRequest`
``root-cert-for-mtls-inbound:<ns>/<sa>``    :class:`BundleRequest` (our trust domain)
``default``                                 :class:`CertificateRequest` (the caller's own)
``ROOTCA``                                  :class:`BundleRequest` (our trust domain)
``spiffe://<td>/<path>``                    :class:`CertificateRequest` (that identity)
``spiffe://<td>``                           :class:`BundleRequest` (that trust domain)
==========================================  =========================================

Light on purpose (no gRPC, no protobuf): ``meshca bootstrap`` imports it.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from meshca.spiffe import SCHEME, SpiffeId, SpiffeIdError, TrustDomain, check_segment

# type URLs ---------------------------------------------------------------------------------
TYPE_PREFIX = "type.googleapis.com/"
CLUSTER_TYPE = TYPE_PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT_TYPE = TYPE_PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER_TYPE = TYPE_PREFIX + "envoy.config.listener.v3.Listener"
ROUTE_TYPE = TYPE_PREFIX + "envoy.config.route.v3.RouteConfiguration"
SECRET_TYPE = TYPE_PREFIX + "envoy.extensions.transport_sockets.tls.v3.Secret"

# The order Envoy needs resources in on one ADS stream: clusters before their
# endpoints, listeners before their routes, secrets when something refers to them.
GENERATED_TYPES = (CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE)


# versions ----------------------------------------------------------------------------------
def content_version(data: bytes) -> str:
    """A resource's version: a hash of its deterministic serialisation, so unchanged
    content keeps its version across generations and restarts."""
    return hashlib.sha256(data).hexdigest()[:16]


def set_version(versions: Mapping[str, str]) -> str:
    """The version of a set of resources (``name -> content version``): changes when any
    member or version changes. Names are length-prefixed, so no name can imitate two."""
    hasher = hashlib.sha256()
    for name in sorted(versions):
        encoded_name = name.encode()
        hasher.update(len(encoded_name).to_bytes(4, "big") + encoded_name)
        hasher.update(versions[name].encode())
    return hasher.hexdigest()[:16]


# secret names ------------------------------------------------------------------------------
OSM_SERVICE_CERT = "service-cert:"
OSM_OUTBOUND = "root-cert-for-mtls-outbound:"
OSM_INBOUND = "root-cert-for-mtls-inbound:"
ISTIO_DEFAULT = "default"
ISTIO_ROOTCA = "ROOTCA"
MAX_NAME_LENGTH = 2200  # a SPIFFE ID is at most 2048 bytes; OSM prefixes are short

_KNOWN_FORMS = (
    "service-cert:<ns>/<sa>, root-cert-for-mtls-outbound:<ns>/<svc>, "
    "root-cert-for-mtls-inbound:<ns>/<sa>, default, ROOTCA, spiffe://<td>/<path>, spiffe://<td>"
)


def service_cert_name(namespace: str, account: str) -> str:
    """The certificate (and key) of ``spiffe://<td>/ns/<namespace>/sa/<account>``."""
    return f"{OSM_SERVICE_CERT}{namespace}/{account}"


def inbound_validation_name(namespace: str, account: str) -> str:
    """The trust bundle a proxy of that identity validates its inbound peers with."""
    return f"{OSM_INBOUND}{namespace}/{account}"


def outbound_validation_name(namespace: str, service: str) -> str:
    """The bundle plus the service's identities, to validate an upstream of that service."""
    return f"{OSM_OUTBOUND}{namespace}/{service}"


class NameProblem(enum.Enum):
    """Why a name was refused: it breaks a scheme's syntax, or belongs to no scheme."""

    MALFORMED = "malformed"
    UNKNOWN = "unknown"


class SecretNameError(ValueError):
    """A secret name meshca cannot serve; the message is fit to send to the proxy."""

    def __init__(self, name: str, problem: NameProblem, detail: str) -> None:
        shown = name if len(name) <= 120 else name[:117] + "..."
        super().__init__(f"secret name {shown!r}: {detail}")
        self.name = name
        self.problem = problem


@dataclass(frozen=True)
class CertificateRequest:
    """A TlsCertificate (chain and private key); ``identity`` None means the caller's own."""

    name: str
    identity: SpiffeId | None


@dataclass(frozen=True)
class BundleRequest:
    """A ValidationContext holding a trust domain's bundle."""

    name: str
    trust_domain: TrustDomain


@dataclass(frozen=True)
class OutboundValidationRequest:
    """A ValidationContext: the bundle plus exact URI SAN matchers for a service's identities."""

    name: str
    namespace: str
    service: str


SecretRequest = CertificateRequest | BundleRequest | OutboundValidationRequest


def _namespaced(name: str, prefix: str, second: str) -> tuple[str, str]:
    """Split ``<prefix><ns>/<second>`` and check both parts are SPIFFE path segments."""
    rest = name[len(prefix) :]
    form = f"{prefix}<ns>/<{second}>"
    namespace, slash, other = rest.partition("/")
    if not slash or not namespace or not other or "/" in other:
        raise SecretNameError(name, NameProblem.MALFORMED, f"expected {form}")
    for part in (namespace, other):
        try:
            check_segment(part)
        except SpiffeIdError:
            raise SecretNameError(
                name,
                NameProblem.MALFORMED,
                f"{part!r} is not a valid name (A-Z a-z 0-9 . - _) in {form}",
            ) from None
    return namespace, other


def parse_secret_name(name: str, trust_domain: TrustDomain) -> SecretRequest:
    """What ``name`` asks for; OSM names map to ``spiffe://<trust_domain>/ns/<ns>/sa/<sa>``."""
    if not name:
        raise SecretNameError(
            name, NameProblem.MALFORMED, f"empty name (known forms: {_KNOWN_FORMS})"
        )
    if len(name) > MAX_NAME_LENGTH:
        raise SecretNameError(
            name, NameProblem.MALFORMED, f"longer than {MAX_NAME_LENGTH} characters"
        )
    if name == ISTIO_DEFAULT:
        return CertificateRequest(name, None)
    if name == ISTIO_ROOTCA:
        return BundleRequest(name, trust_domain)
    if name.startswith(OSM_SERVICE_CERT):
        namespace, account = _namespaced(name, OSM_SERVICE_CERT, "sa")
        return CertificateRequest(name, SpiffeId.from_kubernetes(namespace, account, trust_domain))
    if name.startswith(OSM_OUTBOUND):
        namespace, service = _namespaced(name, OSM_OUTBOUND, "svc")
        return OutboundValidationRequest(name, namespace, service)
    if name.startswith(OSM_INBOUND):
        _namespaced(name, OSM_INBOUND, "sa")
        return BundleRequest(name, trust_domain)
    if name.lower().startswith(SCHEME):
        return _parse_spiffe_name(name)
    raise SecretNameError(
        name, NameProblem.UNKNOWN, f"not a name of any known scheme (known forms: {_KNOWN_FORMS})"
    )


def _parse_spiffe_name(name: str) -> SecretRequest:
    rest = name[len(SCHEME) :]
    try:
        if "/" not in rest:
            return BundleRequest(name, TrustDomain.parse(name))
        return CertificateRequest(name, SpiffeId.parse(name))
    except SpiffeIdError as exc:
        raise SecretNameError(name, NameProblem.MALFORMED, str(exc)) from None
