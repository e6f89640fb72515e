"""The mTLS transport sockets of a proxy: what it presents and what it accepts.

Certificates and bundles are never inlined: every socket names SDS secrets (the
layout's scheme: OSM's or Istio's) that meshca serves on the same ADS stream, so a
rotation is a secret push and never a listener or cluster change.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import wrappers_pb2

from meshca.envoy.xds import pack, sds_secret
from meshca.spiffe import SpiffeId

TLS_SOCKET = "envoy.transport_sockets.tls"
_TLS13 = common_pb2.TlsParameters(
    tls_minimum_protocol_version=common_pb2.TlsParameters.TLSv1_3,
    tls_maximum_protocol_version=common_pb2.TlsParameters.TLSv1_3,
)


def uri_san_matchers(ids: Iterable[SpiffeId]) -> list[common_pb2.SubjectAltNameMatcher]:
    return [
        common_pb2.SubjectAltNameMatcher(
            san_type=common_pb2.SubjectAltNameMatcher.URI,
            matcher=string_pb2.StringMatcher(exact=str(spiffe_id)),
        )
        for spiffe_id in sorted(set(ids))
    ]


def upstream_tls(
    cert_secret: str,
    validation_secret: str,
    sni: str,
    upstream_ids: Iterable[SpiffeId],
    alpn: Sequence[str] = (),
    tls13: bool = False,
) -> base_pb2.TransportSocket:
    """Present the proxy's own SVID (``cert_secret``); accept only the service's SPIFFE
    IDs under the bundle.

    ``combined_validation_context`` merges the exact URI SAN matchers given here with
    the SDS secret's bundle (and its own matchers, if any), so a server holding any other
    SVID of the trust domain is refused.
    """
    validation = tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
        default_validation_context=common_pb2.CertificateValidationContext(
            match_typed_subject_alt_names=uri_san_matchers(upstream_ids)
        ),
        validation_context_sds_secret_config=sds_secret(validation_secret),
    )
    context = tls_pb2.UpstreamTlsContext(
        sni=sni,
        common_tls_context=tls_pb2.CommonTlsContext(
            tls_certificate_sds_secret_configs=[sds_secret(cert_secret)],
            combined_validation_context=validation,
            alpn_protocols=list(alpn),
            tls_params=_TLS13 if tls13 else None,
        ),
    )
    return base_pb2.TransportSocket(name=TLS_SOCKET, typed_config=pack(context))


def downstream_tls(
    cert_secret: str, validation_secret: str, alpn: Sequence[str] = (), tls13: bool = False
) -> base_pb2.TransportSocket:
    """Require a client certificate chaining to the bundle; RBAC decides who gets in.
    ``tls13``: TLS 1.3 only (HBONE, as ztunnel: certificates are not sent in clear)."""
    context = tls_pb2.DownstreamTlsContext(
        require_client_certificate=wrappers_pb2.BoolValue(value=True),
        common_tls_context=tls_pb2.CommonTlsContext(
            tls_certificate_sds_secret_configs=[sds_secret(cert_secret)],
            validation_context_sds_secret_config=sds_secret(validation_secret),
            alpn_protocols=list(alpn),
            tls_params=_TLS13 if tls13 else None,
        ),
    )
    return base_pb2.TransportSocket(name=TLS_SOCKET, typed_config=pack(context))
