"""Secret names of the three schemes: what each asks for, and clear refusals."""

from __future__ import annotations

import pytest

from meshca.spiffe import SpiffeId, TrustDomain
from meshca.xds.resources import (
    BundleRequest,
    CertificateRequest,
    NameProblem,
    OutboundValidationRequest,
    SecretNameError,
    parse_secret_name,
)

TD = TrustDomain("cluster.local")


def test_osm_service_cert_names_the_kubernetes_identity() -> None:
    request = parse_secret_name("service-cert:bookstore/bookstore-v1", TD)
    assert request == CertificateRequest(
        "service-cert:bookstore/bookstore-v1",
        SpiffeId.parse("spiffe://cluster.local/ns/bookstore/sa/bookstore-v1"),
    )


def test_osm_validation_contexts() -> None:
    outbound = parse_secret_name("root-cert-for-mtls-outbound:bookstore/bookstore", TD)
    assert outbound == OutboundValidationRequest(
        "root-cert-for-mtls-outbound:bookstore/bookstore", "bookstore", "bookstore"
    )
    inbound = parse_secret_name("root-cert-for-mtls-inbound:bookstore/bookstore-v1", TD)
    assert inbound == BundleRequest("root-cert-for-mtls-inbound:bookstore/bookstore-v1", TD)


def test_istio_names() -> None:
    assert parse_secret_name("default", TD) == CertificateRequest("default", None)
    assert parse_secret_name("ROOTCA", TD) == BundleRequest("ROOTCA", TD)


def test_spire_names() -> None:
    name = "spiffe://cluster.local/workload/api"
    assert parse_secret_name(name, TD) == CertificateRequest(name, SpiffeId.parse(name))
    other = parse_secret_name("spiffe://example.org", TD)
    assert other == BundleRequest("spiffe://example.org", TrustDomain("example.org"))


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("service-cert:bookstore", "expected service-cert:<ns>/<sa>"),
        ("service-cert:/sa", "expected service-cert:<ns>/<sa>"),
        ("service-cert:ns/", "expected service-cert:<ns>/<sa>"),
        ("service-cert:a/b/c", "expected service-cert:<ns>/<sa>"),
        ("service-cert:ns/s a", "'s a' is not a valid name"),
        ("root-cert-for-mtls-outbound:ns/..", "'..' is not a valid name"),
        ("root-cert-for-mtls-inbound:n%2Fs/sa", "'n%2Fs' is not a valid name"),
        ("root-cert-for-mtls-inbound:ns", "expected root-cert-for-mtls-inbound:<ns>/<sa>"),
        ("spiffe://cluster.local/", "must not end with '/'"),
        ("spiffe://Cluster.local/x", "lowercase"),
        ("spiffe://cluster.local/a//b", "empty segment"),
        ("", "empty name"),
        ("x" * 3000, "longer than"),
    ],
)
def test_malformed_names_say_what_is_wrong(name: str, fragment: str) -> None:
    with pytest.raises(SecretNameError) as caught:
        parse_secret_name(name, TD)
    assert caught.value.problem is NameProblem.MALFORMED
    assert fragment in str(caught.value)


@pytest.mark.parametrize("name", ["default ", "rootca", "Default", "cert:ns/sa", "file:///etc/x"])
def test_names_of_no_scheme_are_unknown_and_list_the_known_forms(name: str) -> None:
    with pytest.raises(SecretNameError) as caught:
        parse_secret_name(name, TD)
    assert caught.value.problem is NameProblem.UNKNOWN
    assert "service-cert:<ns>/<sa>" in str(caught.value)
    assert repr(name) in str(caught.value)
