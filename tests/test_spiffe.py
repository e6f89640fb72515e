"""SPIFFE ID and trust-domain rules (docs/design.md, Contracts), cross-checked with py-spiffe."""

from __future__ import annotations

import string

import pytest
import spiffe
from hypothesis import assume, given
from hypothesis import strategies as st

from meshca.spiffe import (
    DEFAULT_TRUST_DOMAIN,
    MAX_ID_BYTES,
    MAX_TRUST_DOMAIN_BYTES,
    SpiffeId,
    SpiffeIdError,
    TrustDomain,
    check_segment,
)

TD_ALPHABET = string.ascii_lowercase + string.digits + ".-_"
PATH_ALPHABET = string.ascii_letters + string.digits + ".-_"


def id_of_length(total: int) -> str:
    prefix = "spiffe://example.org/"
    return prefix + "a" * (total - len(prefix))


VALID_IDS = [
    "spiffe://example.org/workload",
    "spiffe://cluster.local/ns/default/sa/default",
    "spiffe://a-b_c.9/A.b-C_d/Z",
    "spiffe://example.org/..a/a../.../-/_",
    "spiffe://x/y",
    id_of_length(MAX_ID_BYTES),
    "spiffe://" + "t" * MAX_TRUST_DOMAIN_BYTES + "/p",
]

# (input, rule): one case per rule of docs/design.md; each must be refused naming that rule.
INVALID_IDS = [
    ("", "empty"),
    ("http://example.org/workload", "scheme"),
    ("example.org/workload", "scheme"),
    ("spiffe:/example.org/workload", "scheme"),
    ("SPIFFE://example.org/workload", "scheme"),
    ("Spiffe://example.org/workload", "scheme"),
    ("spiffe://user@example.org/workload", "trust-domain-userinfo"),
    ("spiffe://user:pw@example.org/workload", "trust-domain-userinfo"),
    ("spiffe://example.org:8443/workload", "trust-domain-port"),
    ("spiffe://example.org/workload?x=1", "query"),
    ("spiffe://example.org?x=1", "query"),
    ("spiffe://example.org/workload#part", "fragment"),
    ("spiffe://example.org/work%20load", "percent-encoding"),
    ("spiffe://ex%41mple.org/workload", "percent-encoding"),
    ("spiffe://Example.org/workload", "trust-domain-chars"),
    ("spiffe://EXAMPLE.ORG/workload", "trust-domain-chars"),
    ("spiffe://exa$mple.org/workload", "trust-domain-chars"),
    ("spiffe://exa mple.org/workload", "trust-domain-chars"),
    ("spiffe://ex\u00e4mple.org/workload", "trust-domain-chars"),
    ("spiffe:///workload", "trust-domain-empty"),
    ("spiffe://example.org/a//b", "path-empty-segment"),
    ("spiffe://example.org//a", "path-empty-segment"),
    ("spiffe://example.org/a/./b", "path-dot-segment"),
    ("spiffe://example.org/.", "path-dot-segment"),
    ("spiffe://example.org/a/../b", "path-dot-segment"),
    ("spiffe://example.org/..", "path-dot-segment"),
    ("spiffe://example.org/a/", "path-trailing-slash"),
    ("spiffe://example.org/", "path-trailing-slash"),
    ("spiffe://example.org/a b", "path-chars"),
    ("spiffe://example.org/a*b", "path-chars"),
    ("spiffe://example.org/caf\u00e9", "path-chars"),
    ("spiffe://example.org/a\nb", "path-chars"),
    ("spiffe://example.org/a:b", "path-chars"),
    ("spiffe://example.org", "path-empty"),
    (id_of_length(MAX_ID_BYTES + 1), "length"),
    ("spiffe://" + "t" * (MAX_TRUST_DOMAIN_BYTES + 1) + "/p", "trust-domain-length"),
]


@pytest.mark.parametrize("value", VALID_IDS)
def test_valid_ids_parse_and_round_trip(value: str) -> None:
    parsed = SpiffeId.parse(value)
    assert str(parsed) == value
    assert SpiffeId.parse(str(parsed)) == parsed
    td, _, path = value.removeprefix("spiffe://").partition("/")
    assert parsed.trust_domain == TrustDomain(td)
    assert parsed.path == "/" + path
    assert str(spiffe.SpiffeId(value)) == value  # py-spiffe agrees


@pytest.mark.parametrize(("value", "rule"), INVALID_IDS)
def test_invalid_ids_are_refused_naming_the_rule(value: str, rule: str) -> None:
    with pytest.raises(SpiffeIdError) as refused:
        SpiffeId.parse(value)
    assert refused.value.rule == rule
    assert f"(rule: {rule})" in str(refused.value)
    assert "\n" not in str(refused.value)  # one clear line, even for a hostile input


# Where py-spiffe's rules coincide with the spec's: it must refuse these too. (py-spiffe
# lower-cases the scheme and trust domain, accepts an empty path, and checks no length.)
PY_SPIFFE_AGREES = {
    "empty",
    "scheme",
    "trust-domain-userinfo",
    "trust-domain-port",
    "query",
    "fragment",
    "percent-encoding",
    "trust-domain-empty",
    "path-empty-segment",
    "path-dot-segment",
    "path-trailing-slash",
    "path-chars",
}


def _upper_case_scheme(value: str) -> bool:
    return value.lower().startswith("spiffe://") and not value.startswith("spiffe://")


@pytest.mark.parametrize(
    "value",
    [v for v, r in INVALID_IDS if r in PY_SPIFFE_AGREES and not _upper_case_scheme(v)],
)
def test_py_spiffe_refuses_the_same_ids(value: str) -> None:
    with pytest.raises(spiffe.spiffe_id.spiffe_id.SpiffeIdError):
        spiffe.SpiffeId(value)


def test_non_string_is_refused() -> None:
    with pytest.raises(SpiffeIdError) as refused:
        SpiffeId.parse(None)  # type: ignore[arg-type]
    assert refused.value.rule == "type"
    with pytest.raises(SpiffeIdError) as refused:
        TrustDomain.parse(42)  # type: ignore[arg-type]
    assert refused.value.rule == "type"


def test_long_ids_are_shortened_in_the_message() -> None:
    with pytest.raises(SpiffeIdError) as refused:
        SpiffeId.parse(id_of_length(5000))
    assert len(str(refused.value)) < 300


def test_constructor_applies_the_same_rules_as_parse() -> None:
    td = TrustDomain("example.org")
    with pytest.raises(SpiffeIdError) as refused:
        SpiffeId(td, "")
    assert refused.value.rule == "path-empty"
    with pytest.raises(SpiffeIdError) as refused:
        SpiffeId(td, "relative")
    assert refused.value.rule == "path-absolute"
    with pytest.raises(SpiffeIdError) as refused:
        SpiffeId(td, "/a/../b")
    assert refused.value.rule == "path-dot-segment"
    with pytest.raises(SpiffeIdError) as refused:
        SpiffeId(td, "/" + "a" * MAX_ID_BYTES)
    assert refused.value.rule == "length"
    with pytest.raises(SpiffeIdError) as refused:
        TrustDomain("Example.org")
    assert refused.value.rule == "trust-domain-chars"


VALID_TRUST_DOMAINS = [
    ("example.org", "example.org"),
    ("cluster.local", "cluster.local"),
    ("spiffe://example.org", "example.org"),
    ("a-b_c.9", "a-b_c.9"),
    ("t" * MAX_TRUST_DOMAIN_BYTES, "t" * MAX_TRUST_DOMAIN_BYTES),
]

INVALID_TRUST_DOMAINS = [
    ("", "trust-domain-empty"),
    ("Example.org", "trust-domain-chars"),
    ("exa$mple.org", "trust-domain-chars"),
    ("example.org:8443", "trust-domain-port"),
    ("user@example.org", "trust-domain-userinfo"),
    ("ex%41mple.org", "percent-encoding"),
    ("t" * (MAX_TRUST_DOMAIN_BYTES + 1), "trust-domain-length"),
    ("spiffe://example.org/workload", "trust-domain-path"),
    ("spiffe://example.org/", "trust-domain-path"),
    ("SPIFFE://example.org", "scheme"),
    ("http://example.org", "scheme"),
    ("spiffe://example.org?x", "query"),
    ("example.org/path", "trust-domain-chars"),
]


@pytest.mark.parametrize(("value", "name"), VALID_TRUST_DOMAINS)
def test_valid_trust_domains(value: str, name: str) -> None:
    td = TrustDomain.parse(value)
    assert td.name == name
    assert str(td) == name
    assert td.id == f"spiffe://{name}"
    assert TrustDomain.parse(td.id) == td
    assert spiffe.TrustDomain(value).name == name  # py-spiffe agrees


@pytest.mark.parametrize(("value", "rule"), INVALID_TRUST_DOMAINS)
def test_invalid_trust_domains_are_refused_naming_the_rule(value: str, rule: str) -> None:
    with pytest.raises(SpiffeIdError) as refused:
        TrustDomain.parse(value)
    assert refused.value.rule == rule


def test_default_trust_domain_is_cluster_local() -> None:
    assert DEFAULT_TRUST_DOMAIN == "cluster.local"
    assert TrustDomain.parse(DEFAULT_TRUST_DOMAIN).id == "spiffe://cluster.local"


# Kubernetes mapping ---------------------------------------------------------------


def test_kubernetes_identity_is_the_istio_form() -> None:
    sid = SpiffeId.from_kubernetes("bookstore", "bookstore-v1", "cluster.local")
    assert str(sid) == "spiffe://cluster.local/ns/bookstore/sa/bookstore-v1"
    assert sid.kubernetes == ("bookstore", "bookstore-v1")
    assert sid == SpiffeId.parse("spiffe://cluster.local/ns/bookstore/sa/bookstore-v1")
    assert SpiffeId.from_kubernetes("a", "b", TrustDomain("example.org")).trust_domain == (
        TrustDomain("example.org")
    )


@pytest.mark.parametrize(
    "value",
    [
        "spiffe://cluster.local/bookstore-v1/bookstore",  # OSM's <sa>/<ns> form is not ours
        "spiffe://cluster.local/ns/a/sa/b/extra",
        "spiffe://cluster.local/sa/b/ns/a",
        "spiffe://cluster.local/ns/a",
        "spiffe://cluster.local/workload",
    ],
)
def test_non_kubernetes_ids_have_no_kubernetes_identity(value: str) -> None:
    assert SpiffeId.parse(value).kubernetes is None


@pytest.mark.parametrize(
    ("namespace", "service_account", "rule"),
    [
        ("", "sa", "kubernetes-name"),
        ("ns", "", "kubernetes-name"),
        ("a/b", "sa", "kubernetes-name"),
        ("ns", "../admin", "kubernetes-name"),
        ("ns", "..", "path-dot-segment"),
        ("ns", "my sa", "path-chars"),
        ("ns", "sa?x", "path-chars"),
    ],
)
def test_bad_kubernetes_names_are_refused(namespace: str, service_account: str, rule: str) -> None:
    with pytest.raises(SpiffeIdError) as refused:
        SpiffeId.from_kubernetes(namespace, service_account, "cluster.local")
    assert refused.value.rule == rule


def test_bad_trust_domain_in_kubernetes_mapping_is_refused() -> None:
    with pytest.raises(SpiffeIdError) as refused:
        SpiffeId.from_kubernetes("ns", "sa", "Cluster.Local")
    assert refused.value.rule == "trust-domain-chars"


@pytest.mark.parametrize("value", ["a", "ns-1", "Service_A.v2", ".a", "a..b", "-", "_"])
def test_valid_path_segments_are_returned(value: str) -> None:
    assert check_segment(value) == value


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        ("", "path-empty-segment"),
        (".", "path-dot-segment"),
        ("..", "path-dot-segment"),
        ("a/b", "path-chars"),
        ("/", "path-chars"),
        ("a b", "path-chars"),
        ("caf\u00e9", "path-chars"),
        ("a%2F", "percent-encoding"),
        ("a" * (MAX_ID_BYTES + 1), "length"),
    ],
)
def test_invalid_path_segments_are_refused_naming_the_rule(value: str, rule: str) -> None:
    with pytest.raises(SpiffeIdError) as refused:
        check_segment(value)
    assert refused.value.rule == rule
    assert str(refused.value).startswith("invalid SPIFFE path segment ")


def test_non_string_path_segment_is_refused() -> None:
    with pytest.raises(SpiffeIdError) as refused:
        check_segment(3)  # type: ignore[arg-type]
    assert refused.value.rule == "type"


# Properties ------------------------------------------------------------------------

trust_domains = st.text(TD_ALPHABET, min_size=1, max_size=40)
segments = st.text(PATH_ALPHABET, min_size=1, max_size=20).filter(lambda s: s not in (".", ".."))
paths = st.lists(segments, min_size=1, max_size=8).map(lambda parts: "/" + "/".join(parts))
valid_ids = st.builds(lambda td, path: f"spiffe://{td}{path}", trust_domains, paths)
k8s_names = st.text(string.ascii_lowercase + string.digits + "-.", min_size=1, max_size=30).filter(
    lambda s: s not in (".", "..")
)


@given(valid_ids)
def test_generated_valid_ids_round_trip(value: str) -> None:
    parsed = SpiffeId.parse(value)
    assert str(parsed) == value
    assert SpiffeId.parse(str(parsed)) == parsed
    assert str(spiffe.SpiffeId(value)) == value


@given(st.text(TD_ALPHABET + string.ascii_uppercase, min_size=1, max_size=300))
def test_trust_domain_accepted_exactly_when_lowercase_and_short(value: str) -> None:
    ok = value == value.lower() and len(value) <= MAX_TRUST_DOMAIN_BYTES
    try:
        TrustDomain.parse(value)
    except SpiffeIdError as exc:
        assert not ok
        assert exc.rule in {"trust-domain-chars", "trust-domain-length"}
    else:
        assert ok


@given(st.text(PATH_ALPHABET + "/%. :\u00e9", max_size=30))
def test_a_segment_is_accepted_exactly_when_it_is_one_segment_of_an_id(value: str) -> None:
    try:
        SpiffeId.parse(f"spiffe://example.org/{value}")
    except SpiffeIdError:
        in_an_id = False
    else:
        in_an_id = "/" not in value
    try:
        check_segment(value)
    except SpiffeIdError:
        assert not in_an_id
    else:
        assert in_an_id


@given(k8s_names, k8s_names, trust_domains)
def test_kubernetes_mapping_round_trips(namespace: str, service_account: str, td: str) -> None:
    sid = SpiffeId.from_kubernetes(namespace, service_account, td)
    assert SpiffeId.parse(str(sid)).kubernetes == (namespace, service_account)


def _insert(text: str, position: int, piece: str) -> str:
    return text[:position] + piece + text[position:]


# Each mutation breaks exactly one rule of a valid (td, path) and names it.
@st.composite
def broken_ids(draw: st.DrawFn) -> tuple[str, str, bool]:
    """(value, expected rule, whether py-spiffe must refuse it too)."""
    td = draw(trust_domains)
    path = draw(paths)
    body = path[1:]
    mutation = draw(
        st.sampled_from(
            [
                "scheme-case",
                "scheme-other",
                "td-upper",
                "td-char",
                "userinfo",
                "port",
                "query",
                "fragment",
                "percent-td",
                "percent-path",
                "empty-segment",
                "dot-segment",
                "trailing-slash",
                "path-char",
                "no-path",
                "too-long",
                "td-too-long",
            ]
        )
    )
    at_td = draw(st.integers(0, len(td)))
    at_body = draw(st.integers(0, len(body)))
    if mutation == "scheme-case":
        scheme = draw(st.sampled_from(["SPIFFE://", "Spiffe://", "spiFFe://", "spiffE://"]))
        return f"{scheme}{td}{path}", "scheme", False
    if mutation == "scheme-other":
        scheme = draw(st.sampled_from(["http://", "spiff://", "spiffe:/", "spiffe:", "", "//"]))
        return f"{scheme}{td}{path}", "scheme", True
    if mutation == "td-upper":
        letter = draw(st.sampled_from(string.ascii_uppercase))
        return f"spiffe://{_insert(td, at_td, letter)}{path}", "trust-domain-chars", False
    if mutation == "td-char":
        char = draw(st.sampled_from("!$&'()*+,;=~ \t\u00e9\u0130[]"))
        return f"spiffe://{_insert(td, at_td, char)}{path}", "trust-domain-chars", True
    if mutation == "userinfo":
        return f"spiffe://user@{td}{path}", "trust-domain-userinfo", True
    if mutation == "port":
        port = draw(st.integers(0, 65535))
        return f"spiffe://{td}:{port}{path}", "trust-domain-port", True
    if mutation == "query":
        return f"spiffe://{td}/{_insert(body, at_body, '?q=1')}", "query", True
    if mutation == "fragment":
        return f"spiffe://{td}/{_insert(body, at_body, '#f')}", "fragment", True
    if mutation == "percent-td":
        return f"spiffe://{_insert(td, at_td, '%41')}{path}", "percent-encoding", True
    if mutation == "percent-path":
        return f"spiffe://{td}/{_insert(body, at_body, '%2F')}", "percent-encoding", True
    if mutation == "empty-segment":
        slashes = [i for i, c in enumerate(path) if c == "/"]
        where = draw(st.sampled_from(slashes))
        return f"spiffe://{td}{_insert(path, where, '/')}", "path-empty-segment", True
    if mutation == "dot-segment":
        parts = body.split("/")
        index = draw(st.integers(0, len(parts) - 1))
        parts[index] = draw(st.sampled_from([".", ".."]))
        return f"spiffe://{td}/{'/'.join(parts)}", "path-dot-segment", True
    if mutation == "trailing-slash":
        return f"spiffe://{td}{path}/", "path-trailing-slash", True
    if mutation == "path-char":
        char = draw(st.sampled_from("!$&'()*+,;=~ :@[]\\\u00e9\x00"))
        parts = body.split("/")
        index = draw(st.integers(0, len(parts) - 1))
        parts[index] = _insert(parts[index], draw(st.integers(0, len(parts[index]))), char)
        return f"spiffe://{td}/{'/'.join(parts)}", "path-chars", True
    if mutation == "no-path":
        return f"spiffe://{td}", "path-empty", False
    if mutation == "too-long":
        value = f"spiffe://{td}{path}"
        return value + "/" + "a" * (MAX_ID_BYTES - len(value)), "length", False
    return f"spiffe://{td * 300}"[: 9 + 256] + path, "trust-domain-length", False


@given(broken_ids())
def test_generated_invalid_ids_are_refused_naming_the_broken_rule(
    case: tuple[str, str, bool],
) -> None:
    value, rule, py_spiffe_refuses = case
    assume(rule == "length" or len(value.encode()) <= MAX_ID_BYTES)
    with pytest.raises(SpiffeIdError) as refused:
        SpiffeId.parse(value)
    assert refused.value.rule == rule, value
    if py_spiffe_refuses:
        with pytest.raises(spiffe.spiffe_id.spiffe_id.SpiffeIdError):
            spiffe.SpiffeId(value)
