"""The issuer core: the X.509-SVID and CA profiles of docs/design.md, CSR intake, TTL policy,
the self-check, renewal timing and the trust bundle. Every SVID issued here is also
checked by py-spiffe and ``openssl verify``."""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import spiffe
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from meshca.issuer import (
    ActiveSigner,
    ChainError,
    CsrError,
    Issuer,
    IssuerError,
    KeyType,
    Signer,
    SignerError,
    SvidError,
    TrustBundle,
    TtlError,
    TtlPolicy,
    X509Svid,
)
from meshca.issuer import authority as authority_module
from meshca.issuer.keys import PrivateKey, PublicKey, generate_private_key
from meshca.issuer.policy import check_ca_covers_leaves, issued_at, renewal_time
from meshca.issuer.profile import DEFAULT_SKEW, build_leaf, utcnow
from meshca.issuer.svid import spiffe_id_of
from meshca.issuer.verify import self_check, verify_chain
from meshca.spiffe import SpiffeId, TrustDomain
from meshca.util.durations import DurationError, format_duration, parse_duration
from tests.ca_factory import TRUST_DOMAIN, InMemoryCa, make_ca
from tests.svid_checks import assert_independently_valid, openssl_verify

WORKLOAD = SpiffeId.from_kubernetes("default", "web", TRUST_DOMAIN)
LEAF_OIDS = {
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
    ExtensionOID.BASIC_CONSTRAINTS,
    ExtensionOID.KEY_USAGE,
    ExtensionOID.EXTENDED_KEY_USAGE,
    ExtensionOID.SUBJECT_KEY_IDENTIFIER,
    ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
}
_KEYS: dict[KeyType, PrivateKey] = {}


def key_of(key_type: KeyType) -> PrivateKey:
    """One key per type for the whole run (RSA-4096 generation is slow)."""
    if key_type not in _KEYS:
        _KEYS[key_type] = generate_private_key(key_type)
    return _KEYS[key_type]


@pytest.fixture(scope="module")
def ca() -> InMemoryCa:
    return make_ca()


@pytest.fixture(scope="module")
def issuer(ca: InMemoryCa) -> Issuer:
    return Issuer(ActiveSigner(ca.signer, ca.bundle))


def ext(cert: x509.Certificate, kind: type[Any]) -> x509.Extension[Any]:
    return cert.extensions.get_extension_for_class(kind)


def ski_of(cert: x509.Certificate) -> bytes:
    return bytes(ext(cert, x509.SubjectKeyIdentifier).value.digest)


# The reference implementation: the leaf profile of docs/design.md through CertificateBuilder.
def reference_leaf(
    signer: Signer,
    public_key: PublicKey,
    spiffe_id: SpiffeId,
    serial: int,
    not_before: datetime,
    not_after: datetime,
    dns_names: Sequence[str] = (),
) -> x509.Certificate:
    is_rsa = isinstance(public_key, rsa.RSAPublicKey)
    key_usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=is_rsa,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
    sans += [x509.DNSName(name) for name in dns_names]
    key = signer.key
    p384 = isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(signer.certificate.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(sans), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage, critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ext(signer.certificate, x509.SubjectKeyIdentifier).value
            ),
            critical=False,
        )
        .sign(key, hashes.SHA384() if p384 else hashes.SHA256())
    )


# The leaf profile ------------------------------------------------------------------


def assert_leaf_profile(svid: X509Svid, signer: Signer, key_type: KeyType) -> None:
    leaf = svid.leaf
    assert leaf.version is x509.Version.v3
    assert {e.oid for e in leaf.extensions} == LEAF_OIDS
    assert len(leaf.subject) == 0
    san = ext(leaf, x509.SubjectAlternativeName)
    assert san.critical  # the subject is empty
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [str(svid.spiffe_id)]
    basic = ext(leaf, x509.BasicConstraints)
    assert basic.critical and basic.value.ca is False
    usage = ext(leaf, x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert usage.value.key_encipherment is key_type.is_rsa
    assert not usage.value.key_cert_sign and not usage.value.crl_sign
    assert not usage.value.content_commitment and not usage.value.data_encipherment
    assert not usage.value.key_agreement
    eku = ext(leaf, x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert ski_of(leaf) == x509.SubjectKeyIdentifier.from_public_key(leaf.public_key()).digest
    aki = ext(leaf, x509.AuthorityKeyIdentifier)
    assert not aki.critical
    assert aki.value.key_identifier == ski_of(signer.certificate)
    assert leaf.issuer == signer.certificate.subject
    assert leaf.serial_number > 0 and leaf.serial_number.bit_length() <= 128
    assert svid.key_type == key_type.value
    leaf.verify_directly_issued_by(signer.certificate)
    assert spiffe_id_of(leaf) == svid.spiffe_id


@pytest.mark.parametrize("key_type", list(KeyType))
def test_leaf_profile_for_every_key_type(ca: InMemoryCa, key_type: KeyType, tmp_path: Path) -> None:
    key = key_of(key_type)
    now = utcnow()
    leaf = build_leaf(ca.signer, key.public_key(), WORKLOAD, timedelta(hours=24), now=now)
    svid = X509Svid(WORKLOAD, (leaf, *ca.signer.chain), key)
    assert_leaf_profile(svid, ca.signer, key_type)
    assert leaf.not_valid_before_utc == now - DEFAULT_SKEW
    assert leaf.not_valid_after_utc == now + timedelta(hours=24)
    assert verify_chain(leaf, svid.intermediates, ca.bundle) == [
        leaf,
        ca.signer.certificate,
        ca.root.certificate,
    ]
    assert_independently_valid(svid, ca.bundle, tmp_path)


@pytest.mark.parametrize("signer_type", [KeyType.EC_P256, KeyType.EC_P384, KeyType.RSA_2048])
def test_every_signer_key_type_issues_valid_svids(signer_type: KeyType, tmp_path: Path) -> None:
    ca = make_ca(signer_type)
    issuer = Issuer(ActiveSigner(ca.signer, ca.bundle))
    svid = issuer.issue(WORKLOAD, dns_names=("web.default.svc",))
    assert_leaf_profile(svid, ca.signer, KeyType.EC_P256)
    expected_hash = hashes.SHA384 if signer_type is KeyType.EC_P384 else hashes.SHA256
    assert isinstance(svid.leaf.signature_hash_algorithm, expected_hash)
    assert ext(svid.leaf, x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == [
        "web.default.svc"
    ]
    assert_independently_valid(svid, ca.bundle, tmp_path)


def test_issue_uses_the_requested_key_type_and_returns_its_key(issuer: Issuer) -> None:
    svid = issuer.issue(WORKLOAD, key_type=KeyType.EC_P384)
    assert svid.key_type == "ec-p384"
    assert svid.private_key is not None
    assert svid.private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == svid.leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert svid.private_key_pem().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    assert issuer.issue(WORKLOAD).key_type == "ec-p256"  # the default


def test_svid_never_shows_its_key(issuer: Issuer) -> None:
    svid = issuer.issue(WORKLOAD)
    assert svid.private_key is not None
    shown = repr(svid) + str(svid)
    assert "PRIVATE" not in shown
    assert str(svid.private_key.private_numbers().private_value) not in shown  # type: ignore[union-attr]


def test_chain_is_leaf_then_intermediates_never_the_root(issuer: Issuer, ca: InMemoryCa) -> None:
    svid = issuer.issue(WORKLOAD)
    assert svid.chain == (svid.leaf, ca.signer.certificate)
    pem = svid.chain_pem()
    assert x509.load_pem_x509_certificates(pem) == list(svid.chain)
    assert ca.root.certificate not in svid.chain


def test_serials_are_random_positive_128_bit_and_distinct(issuer: Issuer) -> None:
    serials = [issuer.issue(WORKLOAD).serial for _ in range(64)]
    assert len(set(serials)) == len(serials)
    assert all(0 < s < 1 << 128 for s in serials)
    # random, not a counter: the high bits vary
    assert len({s >> 120 for s in serials}) > 16


def test_not_before_is_backdated_by_the_skew(ca: InMemoryCa) -> None:
    skew = timedelta(seconds=10)
    issuer = Issuer(ActiveSigner(ca.signer, ca.bundle), TtlPolicy(skew=skew))
    before = utcnow()
    svid = issuer.issue(WORKLOAD, ttl=timedelta(hours=1))
    after = utcnow()
    assert before - skew <= svid.not_before <= after - skew
    assert svid.not_after - svid.not_before == timedelta(hours=1) + skew


def test_not_after_is_clipped_at_the_signers_not_after(tmp_path: Path) -> None:
    ca = make_ca(signer_ttl=timedelta(hours=2))
    issuer = Issuer(ActiveSigner(ca.signer, ca.bundle))
    svid = issuer.issue(WORKLOAD, ttl=timedelta(hours=24))
    assert svid.not_after == ca.signer.not_after
    assert_independently_valid(svid, ca.bundle, tmp_path)


def test_an_intermediate_never_outlives_its_root() -> None:
    ca = make_ca(root_ttl=timedelta(days=2), signer_ttl=timedelta(days=365))
    assert ca.signer.not_after == ca.root.not_after


def test_an_expired_signer_signs_nothing() -> None:
    past = utcnow() - timedelta(days=400)
    ca = make_ca(now=past, signer_ttl=timedelta(days=365))
    key = key_of(KeyType.EC_P256)
    with pytest.raises(SignerError, match="expired"):
        build_leaf(ca.signer, key.public_key(), WORKLOAD, timedelta(hours=1))
    with pytest.raises(SignerError, match="expired"):
        ActiveSigner(ca.signer, ca.bundle)


def test_a_signer_not_yet_valid_signs_nothing() -> None:
    ca = make_ca(now=utcnow() + timedelta(days=1))
    key = key_of(KeyType.EC_P256)
    with pytest.raises(SignerError, match="not valid before"):
        build_leaf(ca.signer, key.public_key(), WORKLOAD, timedelta(hours=1))


@pytest.mark.parametrize(
    "name",
    [
        "",
        "b\u00fccher.example",
        "a b.example",
        "a..example",
        "-a.example",
        "a" * 64,
        "x." * 127 + "x",
    ],
)
def test_bad_dns_names_are_refused_with_a_clear_error(issuer: Issuer, name: str) -> None:
    with pytest.raises(IssuerError, match="is not a DNS name") as refused:
        issuer.issue(WORKLOAD, dns_names=("ok.example", name))
    assert "\n" not in str(refused.value)


def test_wildcard_and_service_dns_names_are_accepted(issuer: Issuer) -> None:
    names = ("*.bookstore.svc.cluster.local", "meshca.meshca-system.svc", "a_b.example")
    svid = issuer.issue(WORKLOAD, dns_names=names)
    san = ext(svid.leaf, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == list(names)


def test_an_id_outside_the_trust_domain_is_refused(issuer: Issuer) -> None:
    other = SpiffeId.parse("spiffe://other.example/ns/default/sa/web")
    with pytest.raises(IssuerError, match="outside this CA's trust domain"):
        issuer.issue(other)
    csr = make_csr(key_of(KeyType.EC_P256))
    with pytest.raises(IssuerError, match="outside this CA's trust domain"):
        issuer.sign_csr(other, csr)


# The fast path equals the reference ---------------------------------------------------


@pytest.mark.parametrize("signer_type", [KeyType.EC_P256, KeyType.EC_P384, KeyType.RSA_2048])
@pytest.mark.parametrize("leaf_type", [KeyType.EC_P256, KeyType.EC_P384, KeyType.RSA_2048])
@pytest.mark.parametrize("dns_names", [(), ("web.default.svc", "web.example.org")])
def test_template_tbs_equals_certificate_builder(
    signer_type: KeyType, leaf_type: KeyType, dns_names: tuple[str, ...]
) -> None:
    signer = make_ca(signer_type).signer
    public_key = key_of(leaf_type).public_key()
    cases = [
        (1, datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 2, tzinfo=UTC)),
        (
            (1 << 127) | 0xABC,
            datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC),
            datetime(2050, 1, 1, tzinfo=UTC),
        ),
        (
            (1 << 128) - 1,
            datetime(2030, 6, 1, 12, 0, 0, 999999, tzinfo=UTC),
            datetime(9999, 12, 31, tzinfo=UTC),
        ),
        (0x7F, datetime(1950, 1, 1, tzinfo=UTC), datetime(2026, 1, 1, 1, 2, 3, tzinfo=UTC)),
    ]
    for serial, not_before, not_after in cases:
        tbs = signer.leaf_template.tbs(
            public_key, str(WORKLOAD), dns_names, serial, not_before, not_after
        )
        reference = reference_leaf(
            signer, public_key, WORKLOAD, serial, not_before, not_after, dns_names
        )
        assert tbs == reference.tbs_certificate_bytes


@pytest.mark.parametrize("signer_type", [KeyType.EC_P256, KeyType.RSA_2048])
def test_build_leaf_output_equals_the_reference_and_verifies(signer_type: KeyType) -> None:
    signer = make_ca(signer_type).signer
    public_key = key_of(KeyType.EC_P256).public_key()
    leaf = build_leaf(signer, public_key, WORKLOAD, timedelta(hours=1), dns_names=("a.example",))
    reference = reference_leaf(
        signer,
        public_key,
        WORKLOAD,
        leaf.serial_number,
        leaf.not_valid_before_utc,
        leaf.not_valid_after_utc,
        ("a.example",),
    )
    assert leaf.tbs_certificate_bytes == reference.tbs_certificate_bytes
    assert leaf.signature_algorithm_oid == reference.signature_algorithm_oid
    leaf.verify_directly_issued_by(signer.certificate)
    # the wrapper is strict DER: re-encoding the parsed certificate changes nothing
    der = leaf.public_bytes(serialization.Encoding.DER)
    assert x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.DER) == der


_DNS_LABEL = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20)
_DNS_NAMES = st.lists(st.lists(_DNS_LABEL, min_size=1, max_size=4).map(".".join), max_size=4).map(
    tuple
)
_TIMES = st.datetimes(
    min_value=datetime(1950, 1, 1), max_value=datetime(9999, 12, 31), timezones=st.just(UTC)
)
_FIXED_SIGNER = make_ca().signer


@settings(max_examples=60, deadline=None)
@given(
    serial=st.integers(1, (1 << 159) - 1),
    times=st.tuples(_TIMES, _TIMES).map(sorted),
    dns_names=_DNS_NAMES,
    rsa_leaf=st.booleans(),
    path=st.lists(st.text("abcXYZ019._-", min_size=3, max_size=30), min_size=1, max_size=30),
)
def test_template_tbs_equals_builder_for_generated_inputs(
    serial: int, times: list[datetime], dns_names: tuple[str, ...], rsa_leaf: bool, path: list[str]
) -> None:
    public_key = key_of(KeyType.RSA_2048 if rsa_leaf else KeyType.EC_P256).public_key()
    spiffe_id = SpiffeId(TRUST_DOMAIN, "/" + "/".join(path))  # up to ~1 KB: long lengths
    not_before, not_after = times
    tbs = _FIXED_SIGNER.leaf_template.tbs(
        public_key, str(spiffe_id), dns_names, serial, not_before, not_after
    )
    reference = reference_leaf(
        _FIXED_SIGNER, public_key, spiffe_id, serial, not_before, not_after, dns_names
    )
    assert tbs == reference.tbs_certificate_bytes


def test_template_refuses_what_the_builder_refuses(ca: InMemoryCa) -> None:
    template = ca.signer.leaf_template
    public_key = key_of(KeyType.EC_P256).public_key()
    now = utcnow()
    later = now + timedelta(hours=1)
    for serial in (0, -1, 1 << 159):
        with pytest.raises(ValueError):
            template.tbs(public_key, str(WORKLOAD), (), serial, now, later)
    with pytest.raises(ValueError):
        template.tbs(public_key, str(WORKLOAD), (), 1, later, now)
    with pytest.raises(ValueError):
        template.tbs(public_key, str(WORKLOAD), (), 1, datetime(1949, 12, 31, tzinfo=UTC), now)
    with pytest.raises(ValueError):
        template.tbs(public_key, str(WORKLOAD), ("b\u00fccher.example",), 1, now, later)


# CA profile ------------------------------------------------------------------------


def test_ca_profile(ca: InMemoryCa, tmp_path: Path) -> None:
    for cert, parent in (
        (ca.root.certificate, ca.root.certificate),
        (ca.signer.certificate, ca.root.certificate),
    ):
        basic = ext(cert, x509.BasicConstraints)
        assert basic.critical and basic.value.ca is True
        usage = ext(cert, x509.KeyUsage)
        assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
        san = ext(cert, x509.SubjectAlternativeName).value
        assert list(san) == [x509.UniformResourceIdentifier("spiffe://cluster.local")]
        assert cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
        assert ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier == ski_of(parent)
        assert cert.issuer == parent.subject
        cert.verify_directly_issued_by(parent)
        assert 0 < cert.serial_number < 1 << 128
    assert ext(ca.signer.certificate, x509.BasicConstraints).value.path_length == 0
    assert ca.root.certificate.not_valid_after_utc - ca.root.certificate.not_valid_before_utc >= (
        timedelta(days=3650)
    )
    result = openssl_verify(ca.signer.certificate, [], ca.bundle.roots, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_ca_has_a_unique_subject() -> None:
    first, second = make_ca(), make_ca()
    subjects = {
        first.root.certificate.subject,
        first.signer.certificate.subject,
        second.root.certificate.subject,
        second.signer.certificate.subject,
    }
    assert len(subjects) == 4


def test_ca_outlives_every_leaf_it_signs(issuer: Issuer, ca: InMemoryCa) -> None:
    svid = issuer.issue(WORKLOAD, ttl=TtlPolicy().maximum)
    assert svid.not_after <= ca.signer.not_after <= ca.root.not_after


def test_ca_lifetime_must_cover_six_leaf_lifetimes() -> None:
    check_ca_covers_leaves(timedelta(days=6), timedelta(days=1))
    with pytest.raises(TtlError, match="at least 6 x the leaf TTL"):
        check_ca_covers_leaves(timedelta(days=5), timedelta(days=1))


# CSR signing ------------------------------------------------------------------------


def make_csr(
    key: Any,
    *,
    subject: x509.Name | None = None,
    extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
    der: bool = False,
) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject or x509.Name([]))
    for value, critical in extensions:
        builder = builder.add_extension(value, critical=critical)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = builder.sign(key, algorithm)
    return csr.public_bytes(serialization.Encoding.DER if der else serialization.Encoding.PEM)


@pytest.mark.parametrize("key_type", [KeyType.EC_P256, KeyType.EC_P384, KeyType.RSA_2048])
def test_sign_csr_certifies_the_csr_key(
    issuer: Issuer, ca: InMemoryCa, key_type: KeyType, tmp_path: Path
) -> None:
    key = key_of(key_type)
    svid = issuer.sign_csr(WORKLOAD, make_csr(key))
    assert svid.private_key is None
    with pytest.raises(ValueError, match="holds no private key"):
        svid.private_key_pem()
    assert svid.leaf.public_key() == key.public_key()
    assert_leaf_profile(svid, ca.signer, key_type)
    assert_independently_valid(svid, ca.bundle, tmp_path, private_key=key)


def test_sign_csr_accepts_der(issuer: Issuer) -> None:
    key = key_of(KeyType.EC_P256)
    svid = issuer.sign_csr(WORKLOAD, make_csr(key, der=True))
    assert svid.leaf.public_key() == key.public_key()


def test_sign_csr_copies_nothing_from_the_csr_but_its_key(
    issuer: Issuer, ca: InMemoryCa, tmp_path: Path
) -> None:
    key = key_of(KeyType.EC_P256)
    hostile = make_csr(
        key,
        subject=x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, "admin"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters"),
            ]
        ),
        extensions=[
            (
                x509.SubjectAlternativeName(
                    [
                        x509.UniformResourceIdentifier(
                            "spiffe://cluster.local/ns/kube-system/sa/admin"
                        ),
                        x509.UniformResourceIdentifier("spiffe://other.example/x"),
                        x509.DNSName("evil.example"),
                        x509.RFC822Name("root@example.org"),
                    ]
                ),
                False,
            ),
            (x509.BasicConstraints(ca=True, path_length=None), True),
            (
                x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                True,
            ),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), False),
            (
                x509.NameConstraints(
                    permitted_subtrees=[x509.DNSName("evil.example")], excluded_subtrees=None
                ),
                True,
            ),
            (
                x509.UnrecognizedExtension(
                    x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00"
                ),
                False,
            ),
        ],
    )
    svid = issuer.sign_csr(WORKLOAD, hostile)
    leaf = svid.leaf
    assert len(leaf.subject) == 0
    assert {e.oid for e in leaf.extensions} == LEAF_OIDS
    assert list(ext(leaf, x509.SubjectAlternativeName).value) == [
        x509.UniformResourceIdentifier(str(WORKLOAD))
    ]
    assert ext(leaf, x509.BasicConstraints).value.ca is False
    assert not ext(leaf, x509.KeyUsage).value.key_cert_sign
    assert_leaf_profile(svid, ca.signer, KeyType.EC_P256)
    assert_independently_valid(svid, ca.bundle, tmp_path, private_key=key)


def _swap_public_key(csr_der: bytes, other: PublicKey) -> bytes:
    """A CSR claiming ``other``'s public key under the original signature (no possession)."""
    csr = x509.load_der_x509_csr(csr_der)
    spki = csr.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    replacement = other.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert len(spki) == len(replacement) and csr_der.count(spki) == 1
    return csr_der.replace(spki, replacement)


def test_a_tampered_csr_is_refused(issuer: Issuer, ca: InMemoryCa) -> None:
    key = key_of(KeyType.EC_P256)
    csr = make_csr(key, der=True)
    # an attacker re-labels its CSR with someone else's public key (here: the CA's)
    stolen = _swap_public_key(csr, ca.signer.key.public_key())  # type: ignore[arg-type]
    with pytest.raises(CsrError, match="does not verify"):
        issuer.sign_csr(WORKLOAD, stolen)
    flipped = bytearray(csr)
    flipped[len(flipped) // 2] ^= 0x01  # inside the signed request info
    with pytest.raises(CsrError):
        issuer.sign_csr(WORKLOAD, bytes(flipped))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "cannot read CSR"),
        (b"not a csr", "cannot read CSR"),
        (
            b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            "cannot read CSR",
        ),
        (b"\x30" * (64 * 1024 + 1), "larger than"),
    ],
)
def test_unreadable_csrs_are_refused(issuer: Issuer, data: bytes, message: str) -> None:
    with pytest.raises(CsrError, match=message):
        issuer.sign_csr(WORKLOAD, data)


@pytest.mark.parametrize(
    ("make_key", "message"),
    [
        (lambda: rsa.generate_private_key(65537, 1024), "at least 2048 bits"),
        (lambda: ec.generate_private_key(ec.SECP521R1()), "unsupported elliptic curve"),
        (lambda: ec.generate_private_key(ec.SECP256K1()), "unsupported elliptic curve"),
        (ed25519.Ed25519PrivateKey.generate, "unsupported key algorithm"),
    ],
    ids=["rsa-1024", "p-521", "secp256k1", "ed25519"],
)
def test_weak_or_unsupported_csr_keys_are_refused(
    issuer: Issuer, make_key: Any, message: str
) -> None:
    with pytest.raises(CsrError, match=message) as refused:
        issuer.sign_csr(WORKLOAD, make_csr(make_key()))
    assert "\n" not in str(refused.value)


# TTL policy ------------------------------------------------------------------------


def test_default_ttl_is_24_hours(issuer: Issuer) -> None:
    assert TtlPolicy().default == timedelta(hours=24)
    svid = issuer.issue(WORKLOAD)
    assert svid.not_after - svid.not_before == timedelta(hours=24) + DEFAULT_SKEW


def test_ttl_over_the_maximum_is_refused_with_a_clear_message(ca: InMemoryCa) -> None:
    issuer = Issuer(ActiveSigner(ca.signer, ca.bundle), TtlPolicy(maximum=timedelta(hours=48)))
    with pytest.raises(TtlError) as refused:
        issuer.issue(WORKLOAD, ttl=timedelta(hours=49))
    assert str(refused.value) == "TTL 2d1h refused: the maximum is 2d"
    with pytest.raises(TtlError):
        issuer.sign_csr(WORKLOAD, make_csr(key_of(KeyType.EC_P256)), ttl=timedelta(days=3))
    assert issuer.issue(WORKLOAD, ttl=timedelta(hours=48)).not_after > utcnow()


@pytest.mark.parametrize("ttl", [timedelta(0), timedelta(seconds=-5)])
def test_non_positive_ttl_is_refused(issuer: Issuer, ttl: timedelta) -> None:
    with pytest.raises(TtlError, match="greater than zero"):
        issuer.issue(WORKLOAD, ttl=ttl)


def test_policy_with_default_over_maximum_is_refused() -> None:
    with pytest.raises(TtlError, match="exceeds the maximum"):
        TtlPolicy(default=timedelta(days=2), maximum=timedelta(days=1))


def test_a_refused_request_makes_no_key(issuer: Issuer, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[KeyType] = []
    monkeypatch.setattr(authority_module, "generate_private_key", made.append)
    with pytest.raises(TtlError):
        issuer.issue(WORKLOAD, ttl=timedelta(days=365), key_type=KeyType.RSA_4096)
    with pytest.raises(IssuerError, match="is not a DNS name"):
        issuer.issue(WORKLOAD, dns_names=("a b",))
    assert made == []


def test_durations_parse_compound_forms_and_format_the_shortest() -> None:
    assert parse_duration(" 1h30m ") == timedelta(minutes=90)
    assert parse_duration("1d12h") == timedelta(hours=36)
    for text in ("90d", "1h30m", "1d1s", "45s"):
        assert format_duration(parse_duration(text)) == text
    assert format_duration(timedelta(seconds=86400)) == "1d"
    for bad in ("1h 30m", "h", "30m1", "0s"):
        with pytest.raises(DurationError, match="invalid duration"):
            parse_duration(bad)


# Observing issuance ----------------------------------------------------------------------


def test_observers_see_every_issuance_and_how_it_ended(ca: InMemoryCa) -> None:
    seen: list[tuple[float, BaseException | None]] = []
    issuer = Issuer(
        ActiveSigner(ca.signer, ca.bundle),
        TtlPolicy(maximum=timedelta(days=1)),
        issue_observers=[lambda seconds, error: seen.append((seconds, error))],
    )
    issuer.issue(WORKLOAD)
    issuer.sign_csr(WORKLOAD, make_csr(key_of(KeyType.EC_P256)))
    with pytest.raises(TtlError) as refused:
        issuer.issue(WORKLOAD, ttl=timedelta(days=2))
    with pytest.raises(CsrError) as unreadable:
        issuer.sign_csr(WORKLOAD, b"not a csr")
    assert [error for _, error in seen] == [None, None, refused.value, unreadable.value]
    assert all(seconds >= 0 for seconds, _ in seen)


def test_a_failing_observer_neither_fails_the_issuance_nor_stops_the_others(
    ca: InMemoryCa, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(seconds: float, error: BaseException | None) -> None:
        raise RuntimeError("observer bug")

    later: list[BaseException | None] = []
    issuer = Issuer(ActiveSigner(ca.signer, ca.bundle), issue_observers=[broken])
    issuer.issue_observers.append(lambda seconds, error: later.append(error))
    assert issuer.issue(WORKLOAD).spiffe_id == WORKLOAD
    assert later == [None]
    assert "an issuance observer failed" in caplog.text


# Self-check and chain verification -------------------------------------------------------


def test_self_check_passes_for_a_good_signer(ca: InMemoryCa) -> None:
    self_check(ca.signer, ca.bundle)
    self_check(ca.root, ca.bundle)  # a root may sign directly


def test_self_check_catches_a_key_that_does_not_match_the_certificate(ca: InMemoryCa) -> None:
    impostor = Signer(generate_private_key(), ca.signer.certificate)
    with pytest.raises(SignerError, match="self-check"):
        self_check(impostor, ca.bundle)
    with pytest.raises(SignerError, match="self-check"):
        ActiveSigner(impostor, ca.bundle)
    authority = ActiveSigner(ca.signer, ca.bundle)
    with pytest.raises(SignerError):
        authority.activate(impostor)
    assert authority.signer is ca.signer  # a failed switch keeps the old signer


def test_activate_switches_signer_and_bundle_together(ca: InMemoryCa) -> None:
    authority = ActiveSigner(ca.signer, ca.bundle)
    new = make_ca()
    both = ca.bundle.with_root(new.root.certificate)
    authority.activate(bundle=both)  # the new root first: the signer stays
    assert authority.signer is ca.signer and authority.bundle() == both
    authority.activate(new.signer)  # then the new signer: the bundle stays
    assert authority.signer is new.signer and authority.bundle() == both
    svid = Issuer(authority).issue(WORKLOAD)
    assert svid.intermediates == (new.signer.certificate,)
    verify_chain(svid.leaf, svid.intermediates, authority.bundle())
    with pytest.raises(SignerError):  # a bundle without the signer's root
        authority.activate(bundle=ca.bundle)
    assert authority.signer is new.signer and authority.bundle() == both
    assert authority.current() == (new.signer, both)  # the pair, read in one step


def test_self_check_catches_a_chain_that_does_not_reach_the_bundle(ca: InMemoryCa) -> None:
    other = make_ca()
    with pytest.raises(SignerError, match="does not lead to a root"):
        self_check(ca.signer, other.bundle)
    missing_intermediate = make_ca(levels=2)
    cut = Signer(missing_intermediate.signer.key, missing_intermediate.signer.certificate)
    with pytest.raises(SignerError, match="self-check"):
        self_check(cut, missing_intermediate.bundle)
    self_check(missing_intermediate.signer, missing_intermediate.bundle)


def test_verify_chain_refusals(issuer: Issuer, ca: InMemoryCa) -> None:
    svid = issuer.issue(WORKLOAD, ttl=timedelta(hours=1))
    assert verify_chain(svid.leaf, svid.intermediates, ca.bundle)[-1] == ca.root.certificate
    with pytest.raises(ChainError, match="does not lead to a root"):
        verify_chain(svid.leaf, (), ca.bundle)
    with pytest.raises(ChainError, match="does not lead to a root"):
        verify_chain(svid.leaf, svid.intermediates, make_ca().bundle)
    with pytest.raises(ChainError, match="validity"):
        verify_chain(svid.leaf, svid.intermediates, ca.bundle, now=utcnow() + timedelta(hours=2))


def test_two_level_intermediates_chain_to_the_root(tmp_path: Path) -> None:
    ca = make_ca(levels=2)
    svid = Issuer(ActiveSigner(ca.signer, ca.bundle)).issue(WORKLOAD)
    assert len(svid.chain) == 3
    assert_independently_valid(svid, ca.bundle, tmp_path)


# Renewal timing --------------------------------------------------------------------------


def test_renewal_is_at_half_life_plus_minus_five_percent() -> None:
    rng = random.Random(7)
    issued = datetime(2026, 1, 1, tzinfo=UTC)
    not_before, not_after = issued - DEFAULT_SKEW, issued + timedelta(hours=24)
    assert issued_at(not_before, not_after) == issued  # NotBefore plus the skew
    fractions = [
        (renewal_time(issued, not_after, rng=rng) - issued) / timedelta(hours=24)
        for _ in range(2000)
    ]
    assert all(0.45 <= f <= 0.55 for f in fractions)
    assert min(fractions) < 0.46 and max(fractions) > 0.54  # the jitter is used
    assert 0.49 < sum(fractions) / len(fractions) < 0.51


def test_renewal_of_a_short_ttl_is_not_immediate(ca: InMemoryCa) -> None:
    now = utcnow()
    leaf = build_leaf(
        ca.signer, key_of(KeyType.EC_P256).public_key(), WORKLOAD, timedelta(seconds=4), now=now
    )
    issued = issued_at(leaf.not_valid_before_utc, leaf.not_valid_after_utc)
    for seed in range(50):
        renew = renewal_time(issued, leaf.not_valid_after_utc, rng=random.Random(seed))
        assert now + timedelta(seconds=1.8) <= renew <= now + timedelta(seconds=2.2)


def test_life_starts_when_requested_within_the_certificates_validity() -> None:
    not_before = datetime(2026, 1, 1, tzinfo=UTC)
    not_after = not_before + timedelta(hours=1)
    inside = not_before + timedelta(minutes=5)
    assert issued_at(not_before, not_after, requested=inside) == inside
    assert issued_at(not_before, not_after, requested=not_before - timedelta(1)) == not_before
    assert issued_at(not_before, not_after, requested=not_after + timedelta(1)) == not_after
    assert issued_at(not_before, not_after, skew=timedelta(hours=2)) == not_after


def test_renewal_follows_the_certificates_own_not_after() -> None:
    ca = make_ca(signer_ttl=timedelta(hours=2))
    svid = Issuer(ActiveSigner(ca.signer, ca.bundle)).issue(WORKLOAD)  # clipped to 2 h
    issued = issued_at(svid.not_before, svid.not_after)
    renew = renewal_time(issued, svid.not_after, rng=random.Random(1))
    life = svid.not_after - (svid.not_before + DEFAULT_SKEW)
    assert life <= timedelta(hours=2)
    assert svid.not_before + DEFAULT_SKEW + 0.45 * life <= renew <= svid.not_after - 0.45 * life


# Trust bundle ----------------------------------------------------------------------------


def test_bundle_is_ordered_and_deduplicated() -> None:
    a, b, c = make_ca().root.certificate, make_ca().root.certificate, make_ca().root.certificate
    bundle = TrustBundle.of(TRUST_DOMAIN, [b, a, b, c, a])
    assert bundle.roots == (b, a, c)
    assert len(bundle) == 3 and a in bundle and list(bundle) == [b, a, c]
    assert bundle.with_root(a) == bundle
    assert bundle.with_root(make_ca().root.certificate) != bundle
    assert bundle.without_root(a).roots == (b, c)
    assert TrustBundle.from_pem(TRUST_DOMAIN, bundle.pem()) == bundle
    parsed = spiffe.X509Bundle.parse(spiffe.TrustDomain("cluster.local"), bundle.pem())
    assert parsed.x509_authorities == {b, a, c}


def test_bundle_from_bad_pem_is_refused() -> None:
    bad = [b"", b"garbage", b"-----BEGIN CERTIFICATE-----\nxx\n-----END CERTIFICATE-----\n"]
    for data in bad:
        with pytest.raises(SvidError) as refused:
            TrustBundle.from_pem(TRUST_DOMAIN, data)
        assert refused.value.rule == "pem"
        assert str(refused.value).startswith("cannot read trust bundle:")
        assert "X.509-SVID" not in str(refused.value)


def _b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_jwks_is_the_spiffe_bundle_format() -> None:
    roots = [
        make_ca(t).root.certificate for t in (KeyType.EC_P256, KeyType.EC_P384, KeyType.RSA_2048)
    ]
    bundle = TrustBundle.of(TRUST_DOMAIN, roots)
    jwks = bundle.jwks(sequence=7, refresh_hint=60)
    assert jwks["spiffe_sequence"] == 7 and jwks["spiffe_refresh_hint"] == 60
    assert len(jwks["keys"]) == 3
    for jwk, root in zip(jwks["keys"], roots, strict=True):
        assert jwk["use"] == "x509-svid"
        assert len(jwk["x5c"]) == 1
        assert base64.b64decode(jwk["x5c"][0]) == root.public_bytes(serialization.Encoding.DER)
        public = root.public_key()
        if isinstance(public, ec.EllipticCurvePublicKey):
            size = (public.curve.key_size + 7) // 8
            assert jwk["kty"] == "EC"
            assert jwk["crv"] == {256: "P-256", 384: "P-384"}[public.curve.key_size]
            assert _b64url(jwk["x"]) == public.public_numbers().x.to_bytes(size, "big")
            assert _b64url(jwk["y"]) == public.public_numbers().y.to_bytes(size, "big")
        else:
            assert isinstance(public, rsa.RSAPublicKey)
            assert jwk["kty"] == "RSA"
            assert int.from_bytes(_b64url(jwk["n"]), "big") == public.public_numbers().n
            assert int.from_bytes(_b64url(jwk["e"]), "big") == 65537
    assert json.loads(bundle.jwks_json(sequence=7, refresh_hint=60)) == jwks
    defaults = bundle.jwks()
    assert isinstance(defaults["spiffe_sequence"], int)
    assert isinstance(defaults["spiffe_refresh_hint"], int) and defaults["spiffe_refresh_hint"] > 0


def _self_signed(key: Any) -> x509.Certificate:
    now = utcnow()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "other root")])
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, algorithm)
    )


def test_jwks_carries_ed25519_roots_and_refuses_curves_it_cannot_name() -> None:
    ed_key = ed25519.Ed25519PrivateKey.generate()
    jwk = TrustBundle.of(TRUST_DOMAIN, [_self_signed(ed_key)]).jwks()["keys"][0]
    assert jwk["kty"] == "OKP" and jwk["crv"] == "Ed25519"
    assert _b64url(jwk["x"]) == ed_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    odd = TrustBundle.of(TRUST_DOMAIN, [_self_signed(ec.generate_private_key(ec.SECP256K1()))])
    with pytest.raises(IssuerError, match="secp256k1"):
        odd.jwks()


# The X.509-SVID validator (meshca inspect relies on it) -----------------------------------


def _leaf_with(ca: InMemoryCa, change: str) -> x509.Certificate:
    key = key_of(KeyType.EC_P256)
    now = utcnow()
    uri = x509.UniformResourceIdentifier(str(WORKLOAD))
    sans: list[x509.GeneralName] = [uri]
    subject = x509.Name([])
    san_critical = True
    basic = x509.BasicConstraints(ca=False, path_length=None)
    usage = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
    eku = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    if change == "two-uris":
        sans.append(x509.UniformResourceIdentifier("spiffe://cluster.local/other"))
    elif change == "no-uri":
        sans = [x509.DNSName("web.example")]
    elif change == "san-not-critical":
        san_critical = False
    elif change == "ca":
        basic = x509.BasicConstraints(ca=True, path_length=None)
    elif change == "cert-sign":
        usage = x509.KeyUsage(True, False, False, False, False, True, False, False, False)
    elif change == "server-only":
        eku = [ExtendedKeyUsageOID.SERVER_AUTH]
    elif change == "bad-id":
        sans = [x509.UniformResourceIdentifier("spiffe://cluster.local/a/../b")]
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.signer.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(basic, critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    )
    if change != "no-san":
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=san_critical)
    return builder.sign(ca.signer.key, hashes.SHA256())


@pytest.mark.parametrize(
    ("change", "rule"),
    [
        ("no-san", "san-missing"),
        ("no-uri", "san-uri-count"),
        ("two-uris", "san-uri-count"),
        ("san-not-critical", "san-critical"),
        ("ca", "basic-constraints"),
        ("cert-sign", "key-usage"),
        ("server-only", "extended-key-usage"),
        ("bad-id", "spiffe-id"),
    ],
)
def test_non_conforming_leaves_are_refused_naming_the_rule(
    ca: InMemoryCa, change: str, rule: str
) -> None:
    with pytest.raises(SvidError) as refused:
        spiffe_id_of(_leaf_with(ca, change))
    assert refused.value.rule == rule


def test_a_ca_certificate_is_not_an_svid(ca: InMemoryCa) -> None:
    with pytest.raises(SvidError):
        spiffe_id_of(ca.signer.certificate)


def test_trust_domain_of_issuer_is_the_authoritys(issuer: Issuer) -> None:
    assert issuer.trust_domain == TrustDomain("cluster.local")
    assert issuer.bundle().trust_domain == issuer.trust_domain
