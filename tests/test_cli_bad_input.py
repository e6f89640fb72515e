"""Every command refuses bad input with one line on stderr, the right exit code, and no
traceback: 2 when the command line's shape is wrong, 1 when a value, file or state is
refused."""

from __future__ import annotations

import base64
import contextlib
import io
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshca.cli import main
from meshca.issuer.keys import generate_private_key
from meshca.issuer.profile import Signer, build_ca, build_leaf
from meshca.spiffe import SpiffeId, TrustDomain
from tests.cli_harness import (
    assert_one_line_error,
    assert_refused,
    clean_environment,
    meshca_process,
)

TD = TrustDomain("cluster.local")


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _csr(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> x509.CertificateSigningRequest:
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )


def _write_inputs(ca: Path, files: Path) -> None:
    """The bad (and a few good) files the table refers to."""
    files.mkdir()
    (files / "garbage.csr").write_bytes(b"not a certificate request\n")
    (files / "text.txt").write_text("hello\n")
    (files / "empty.pem").write_bytes(b"")
    shutil.copy(ca / "ca" / "ca-key.pem", files / "key.pem")
    shutil.copy(ca / "ca" / "root-cert.pem", files / "ca-cert.pem")
    (files / "rsa1024.csr").write_bytes(
        _csr(rsa.generate_private_key(public_exponent=65537, key_size=1024)).public_bytes(
            serialization.Encoding.PEM
        )
    )
    (files / "p521.csr").write_bytes(
        _csr(ec.generate_private_key(ec.SECP521R1())).public_bytes(serialization.Encoding.PEM)
    )
    der = bytearray(_csr(ec.generate_private_key(ec.SECP256R1())).public_bytes(
        serialization.Encoding.DER
    ))  # fmt: skip
    der[-1] ^= 0x01  # the last byte of the signature: parses, but does not verify
    (files / "badsig.csr").write_bytes(bytes(der))

    # An SVID-shaped certificate that expired yesterday, from a CA of two days ago.
    past = datetime.now(UTC).replace(microsecond=0) - timedelta(days=2)
    root_key = generate_private_key()
    root = build_ca(TD, root_key, timedelta(days=30), now=past)
    leaf_key = generate_private_key()
    expired = build_leaf(
        Signer(root_key, root),
        leaf_key.public_key(),
        SpiffeId.parse("spiffe://cluster.local/old"),
        timedelta(hours=1),
        now=past + timedelta(hours=1),
    )
    (files / "expired.pem").write_bytes(_pem(expired))

    # A TLS server certificate with a DNS name only: not an X.509-SVID.
    key = ec.generate_private_key(ec.SECP256R1())
    web = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "web")]))
        .issuer_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "web")]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(past)
        .not_valid_after(past + timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("web.example")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    (files / "web.pem").write_bytes(_pem(web))

    # cacerts directories that must be refused.
    (files / "cacerts-empty").mkdir()
    mismatched = files / "cacerts-mismatch"
    mismatched.mkdir()
    for name in ("ca-cert.pem", "root-cert.pem", "cert-chain.pem"):
        shutil.copy(ca / "ca" / name, mismatched / name)
    (mismatched / "ca-key.pem").write_bytes(
        generate_private_key().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    damaged = files / "cacerts-damaged"
    shutil.copytree(mismatched, damaged)
    shutil.copy(ca / "ca" / "ca-key.pem", damaged / "ca-key.pem")
    ca_cert = x509.load_pem_x509_certificate((ca / "ca" / "ca-cert.pem").read_bytes())
    point = ca_cert.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    ca_der = bytearray(ca_cert.public_bytes(serialization.Encoding.DER))
    ca_der[bytes(ca_der).index(point) + 5] ^= 0xFF  # the key is now off the curve
    (damaged / "ca-cert.pem").write_bytes(
        b"-----BEGIN CERTIFICATE-----\n"
        + base64.encodebytes(bytes(ca_der))
        + b"-----END CERTIFICATE-----\n"
    )
    leaf_as_ca = files / "cacerts-leaf"
    leaf_as_ca.mkdir()
    (leaf_as_ca / "tls.crt").write_bytes(_pem(web))
    (leaf_as_ca / "tls.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (leaf_as_ca / "ca.crt").write_bytes(_pem(web))

    good_der = expired.public_bytes(serialization.Encoding.DER)
    assert good_der.count(b"\xa0\x03\x02\x01\x02") == 1
    (files / "bad-version.der").write_bytes(
        good_der.replace(b"\xa0\x03\x02\x01\x02", b"\xa0\x03\x02\x01\x32")
    )
    csr_der = _csr(ec.generate_private_key(ec.SECP256R1())).public_bytes(serialization.Encoding.DER)
    (files / "good.csr").write_bytes(csr_der)
    version_at = csr_der.index(b"\x02\x01\x00")  # CertificationRequestInfo.version
    (files / "bad-version.csr").write_bytes(
        csr_der[:version_at] + b"\x02\x01\x09" + csr_der[version_at + 3 :]
    )

    (files / "unknown-key.yaml").write_text("data_dir: x\nlisten_adress: 1\n")
    (files / "invalid.yaml").write_text("data_dir: [unclosed\n")
    (files / "list.yaml").write_text("- data_dir\n")
    (files / "nested.yaml").write_text("leaf_ttl: [1h, 2h]\n")
    (files / "bad-ttl.yaml").write_text("leaf_ttl: forever\n")
    (files / "shadow").write_text(SHADOW)
    (files / "bomb.yaml").write_text(ALIAS_BOMB)
    (files / "huge.yaml").write_text("# padding\n" * 30_000)
    (files / "uds-0666.yaml").write_text("uds_mode: 0666\n")  # unquoted: YAML 1.1 octal
    (files / "tag.yaml").write_text("leaf_ttl: !hvs.CAESIsecretTOKEN 1h\n")


# The first line of a shadow file (what '--config /etc/shadow' would show).
SHADOW = "root:$6$saltsalt$hashedSECRETpasswordvalue:19000:0:99999:7:::\nbin:*:19000::::::\n"
# A few hundred bytes that expand to 9**9 strings when walked: refused before anything walks them.
ALIAS_BOMB = "\n".join(
    [
        'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]',
        *(
            f"{name}: &{name} [{','.join(['*' + prev] * 9)}]"
            for prev, name in zip("abcdefgh", "bcdefghi", strict=True)
        ),
    ]
)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad-input")
    assert main(["--data-dir", str(root / "ca"), "init"]) == 0
    _write_inputs(root / "ca", root / "files")
    return root


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, workspace: Path) -> None:
    clean_environment(monkeypatch, workspace)


ISSUE = ["--data-dir", "ca", "issue"]
OUT = ["--out", "out"]
GOOD_ID = "spiffe://cluster.local/ns/a/sa/b"

# (case id, argv, environment, exit code, text the one stderr line must contain)
CASES: list[tuple[str, list[str], dict[str, str], int, str]] = [
    # --- the command line's shape: exit 2
    ("no-command", [], {}, 2, "required: COMMAND"),
    ("unknown-command", ["mint"], {}, 2, "invalid choice: 'mint'"),
    ("unknown-flag", ["bundle", "--colour"], {}, 2, "unrecognized arguments: --colour"),
    ("issue-missing-out", [*ISSUE, GOOD_ID], {}, 2, "required: --out"),
    ("issue-no-identity", [*ISSUE, *OUT], {}, 2, "give a SPIFFE_ID"),
    ("issue-id-and-namespace", [*ISSUE, GOOD_ID, "--namespace", "a", "-a", "b", *OUT], {}, 2,
     "not both"),
    ("issue-namespace-alone", [*ISSUE, "--namespace", "a", *OUT], {}, 2, "both --namespace"),
    ("issue-csr-and-key-type", [*ISSUE, GOOD_ID, "--csr", "files/rsa1024.csr", "--key-type",
     "ec-p384", *OUT], {}, 2, "--key-type does not apply"),
    ("bundle-unknown-format", ["--data-dir", "ca", "bundle", "--format", "der"], {}, 2,
     "invalid choice: 'der'"),
    ("inspect-no-file", ["inspect"], {}, 2, "required: FILE"),
    # --- malformed SPIFFE IDs: exit 1 naming the rule
    ("id-scheme", [*ISSUE, "https://cluster.local/a", *OUT], {}, 1, "rule: scheme"),
    ("id-uppercase-td", [*ISSUE, "spiffe://Cluster.local/a", *OUT], {}, 1,
     "rule: trust-domain-chars"),
    ("id-port", [*ISSUE, "spiffe://cluster.local:8443/a", *OUT], {}, 1, "rule: trust-domain-port"),
    ("id-no-path", [*ISSUE, "spiffe://cluster.local", *OUT], {}, 1, "rule: path-empty"),
    ("id-trailing-slash", [*ISSUE, "spiffe://cluster.local/a/", *OUT], {}, 1,
     "rule: path-trailing-slash"),
    ("id-empty-segment", [*ISSUE, "spiffe://cluster.local/a//b", *OUT], {}, 1,
     "rule: path-empty-segment"),
    ("id-dot-segment", [*ISSUE, "spiffe://cluster.local/a/../b", *OUT], {}, 1,
     "rule: path-dot-segment"),
    ("id-query", [*ISSUE, "spiffe://cluster.local/a?x=1", *OUT], {}, 1, "rule: query"),
    ("id-percent", [*ISSUE, "spiffe://cluster.local/a%2Fb", *OUT], {}, 1,
     "rule: percent-encoding"),
    ("id-path-chars", [*ISSUE, "spiffe://cluster.local/a b", *OUT], {}, 1, "rule: path-chars"),
    ("id-namespace-slash", [*ISSUE, "--namespace", "a/b", "-a", "c", *OUT], {}, 1,
     "rule: kubernetes-name"),
    # --- trust domains
    ("id-other-trust-domain", [*ISSUE, "spiffe://example.org/a", *OUT], {}, 1,
     "outside this CA's trust domain cluster.local"),
    ("flag-other-trust-domain", [*ISSUE, "--trust-domain", "example.org", GOOD_ID, *OUT], {}, 1,
     "--trust-domain names example.org"),
    ("env-other-trust-domain", [*ISSUE, GOOD_ID, *OUT], {"MESHCA_TRUST_DOMAIN": "example.org"}, 1,
     "environment MESHCA_TRUST_DOMAIN names example.org"),
    ("malformed-trust-domain", ["--data-dir", "ca", "bundle", "--trust-domain", "Bad!"], {}, 1,
     "--trust-domain: invalid SPIFFE ID"),
    # --- durations and the TTL policy
    ("ttl-no-unit", [*ISSUE, GOOD_ID, "--ttl", "3600", *OUT], {}, 1, "--ttl: invalid duration"),
    ("ttl-unknown-unit", [*ISSUE, GOOD_ID, "--ttl", "1w", *OUT], {}, 1, "invalid duration '1w'"),
    ("ttl-zero", [*ISSUE, GOOD_ID, "--ttl", "0s", *OUT], {}, 1, "greater than zero"),
    ("ttl-negative", [*ISSUE, GOOD_ID, "--ttl=-1h", *OUT], {}, 1, "invalid duration '-1h'"),
    ("ttl-empty", [*ISSUE, GOOD_ID, "--ttl", "", *OUT], {}, 1, "invalid duration ''"),
    ("ttl-over-default-max", [*ISSUE, GOOD_ID, "--ttl", "91d", *OUT], {}, 1,
     "TTL 91d refused: the maximum is 90d"),
    ("ttl-over-configured-max", [*ISSUE, GOOD_ID, "--ttl", "3h", "--max-ttl", "2h", *OUT], {}, 1,
     "TTL 3h refused: the maximum is 2h"),
    ("max-ttl-bad", [*ISSUE, GOOD_ID, "--max-ttl", "lots", *OUT], {}, 1, "--max-ttl: invalid"),
    ("env-ttl-bad", [*ISSUE, GOOD_ID, *OUT], {"MESHCA_LEAF_TTL": "soon"}, 1,
     "environment MESHCA_LEAF_TTL: invalid duration 'soon'"),
    # --- key types
    ("issue-key-type", [*ISSUE, GOOD_ID, "--key-type", "dsa", *OUT], {}, 1,
     "unsupported key type 'dsa'"),
    ("init-key-type", ["--data-dir", "new", "init", "--key-type", "ec-p521"], {}, 1,
     "unsupported key type 'ec-p521'"),
    # --- CSRs
    ("csr-missing", [*ISSUE, GOOD_ID, "--csr", "files/none.csr", *OUT], {}, 1,
     "files/none.csr: No such file or directory"),
    ("csr-garbage", [*ISSUE, GOOD_ID, "--csr", "files/garbage.csr", *OUT], {}, 1,
     "neither a PEM nor a DER certificate request"),
    ("csr-is-a-key", [*ISSUE, GOOD_ID, "--csr", "files/key.pem", *OUT], {}, 1,
     "holds PEM data but no CERTIFICATE REQUEST"),
    ("csr-bad-signature", [*ISSUE, GOOD_ID, "--csr", "files/badsig.csr", *OUT], {}, 1,
     "signature does not verify"),
    ("csr-rsa-1024", [*ISSUE, GOOD_ID, "--csr", "files/rsa1024.csr", *OUT], {}, 1,
     "RSA key of 1024 bits refused"),
    ("csr-p521", [*ISSUE, GOOD_ID, "--csr", "files/p521.csr", *OUT], {}, 1,
     "unsupported elliptic curve"),
    ("csr-bad-version", [*ISSUE, GOOD_ID, "--csr", "files/bad-version.csr", *OUT], {}, 1,
     "cannot read CSR"),
    ("csr-directory", [*ISSUE, GOOD_ID, "--csr", "files", *OUT], {}, 1, "Is a directory"),
    # --- state
    ("issue-without-ca", ["--data-dir", "nowhere", "issue", GOOD_ID, *OUT], {}, 1,
     "run 'meshca init' first"),
    ("bundle-without-ca", ["--data-dir", "nowhere", "bundle"], {}, 1, "run 'meshca init' first"),
    ("out-is-a-file", [*ISSUE, GOOD_ID, "--out", "files/text.txt"], {}, 1, "File exists"),
    # --- inspect
    ("inspect-missing", ["inspect", "files/none.pem"], {}, 1, "No such file or directory"),
    ("inspect-text", ["inspect", "files/text.txt"], {}, 1, "rule: format"),
    ("inspect-empty", ["inspect", "files/empty.pem"], {}, 1, "rule: format"),
    ("inspect-private-key", ["inspect", "files/key.pem"], {}, 1, "holds a private key"),
    ("inspect-ca-cert", ["inspect", "files/ca-cert.pem"], {}, 1, "rule: basic-constraints"),
    ("inspect-non-svid", ["inspect", "files/web.pem"], {}, 1, "rule: san-uri-count"),
    ("inspect-csr", ["inspect", "files/rsa1024.csr"], {}, 1, "no certificate"),
    ("inspect-bad-version", ["inspect", "files/bad-version.der"], {}, 1,
     "neither a PEM nor a DER certificate"),
    ("inspect-directory", ["inspect", "files"], {}, 1, "Is a directory"),
    # --- init
    ("init-twice", ["--data-dir", "ca", "init"], {}, 1, "a CA already exists"),
    ("init-ca-ttl-too-short", ["--data-dir", "new", "init", "--ca-ttl", "5d"], {}, 1,
     "at least 6 x the leaf TTL"),
    ("init-ca-ttl-short-for-env-leaf", ["--data-dir", "new", "init", "--ca-ttl", "30d"],
     {"MESHCA_LEAF_TTL": "7d"}, 1, "cannot cover the leaf rotation schedule"),
    ("init-ca-ttl-bad", ["--data-dir", "new", "init", "--ca-ttl", "10y"], {}, 1,
     "--ca-ttl: invalid duration"),
    ("init-bad-trust-domain", ["--data-dir", "new", "init", "--trust-domain", "a:80"], {}, 1,
     "rule: trust-domain-port"),
    ("cacerts-missing", ["--data-dir", "new", "init", "--from-cacerts", "files/nope"], {}, 1,
     "is not a directory"),
    ("cacerts-empty", ["--data-dir", "new", "init", "--from-cacerts", "files/cacerts-empty"], {},
     1, "holds neither"),
    ("cacerts-key-mismatch", ["--data-dir", "new", "init", "--from-cacerts",
     "files/cacerts-mismatch"], {}, 1, "does not match"),
    ("cacerts-damaged", ["--data-dir", "new", "init", "--from-cacerts",
     "files/cacerts-damaged"], {}, 1, "a malformed certificate"),
    ("cacerts-not-a-ca", ["--data-dir", "new", "init", "--from-cacerts", "files/cacerts-leaf"],
     {}, 1, "is not a CA certificate"),
    # --- configuration files
    ("config-unknown-key", ["--config", "files/unknown-key.yaml", "bundle"], {}, 1,
     "unknown key 'listen_adress'"),
    ("config-invalid-yaml", ["--config", "files/invalid.yaml", "bundle"], {}, 1,
     "is not valid YAML"),
    ("config-not-a-mapping", ["--config", "files/list.yaml", "bundle"], {}, 1,
     "top level must be a mapping"),
    ("config-nested-value", ["--config", "files/nested.yaml", "bundle"], {}, 1,
     "leaf_ttl: expected a single value"),
    ("config-bad-value", ["--config", "files/bad-ttl.yaml", *ISSUE, GOOD_ID, *OUT], {}, 1,
     "bad-ttl.yaml: leaf_ttl: invalid duration 'forever'"),
    ("config-missing", ["--config", "files/none.yaml", "bundle"], {}, 1,
     "cannot read config file"),
    ("config-from-env-missing", ["bundle"], {"MESHCA_CONFIG": "files/none.yaml"}, 1,
     "cannot read config file files/none.yaml"),
    ("config-shadow", ["--config", "files/shadow", "bundle"], {}, 1,
     "config file files/shadow: unknown key (known keys:"),
    ("config-dev-zero", ["--config", "/dev/zero", "bundle"], {}, 1,
     "config file /dev/zero is not a regular file"),
    ("config-directory", ["--config", "files", "bundle"], {}, 1, "is not a regular file"),
    ("config-too-large", ["--config", "files/huge.yaml", "bundle"], {}, 1,
     "is larger than the limit of 262144 bytes"),
    ("config-alias-bomb", ["--config", "files/bomb.yaml", "bundle"], {}, 1,
     "is not valid YAML (aliases (*name) are not allowed, line 2)"),
    ("config-unknown-tag", ["--config", "files/tag.yaml", "bundle"], {}, 1,
     "could not determine a constructor for the tag (...)"),
    ("config-uds-mode-unquoted", ["--data-dir", "ca", "--config", "files/uds-0666.yaml",
     "serve", "--uds", "x.sock"], {}, 1, "socket mode 0666 is too open"),
    ("mesh-dev-zero", ["--data-dir", "ca", "serve", "--uds", "x.sock", "--mesh", "/dev/zero"],
     {}, 1, "mesh file /dev/zero is not a regular file"),
    ("mesh-alias-bomb", ["--data-dir", "ca", "serve", "--uds", "x.sock", "--mesh",
     "files/bomb.yaml"], {}, 1, "is not valid YAML (aliases (*name) are not allowed, line 2)"),
    ("ttl-overflow", [*ISSUE, GOOD_ID, "--ttl", "99999999999d", *OUT], {}, 1,
     "--ttl: invalid duration '99999999999d': longer than the limit of 36500d"),
    ("ttl-many-digits", [*ISSUE, GOOD_ID, "--ttl", "9" * 5000 + "s", *OUT], {}, 1,
     "--ttl: invalid duration"),
    ("ca-ttl-overflow", ["--data-dir", "new", "init", "--ca-ttl", "9999999999999d"], {}, 1,
     "--ca-ttl: invalid duration"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "environ", "code", "needle"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_bad_input_is_one_line_and_an_exit_code(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    environ: dict[str, str],
    code: int,
    needle: str,
) -> None:
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert_refused(capsys, argv, code, needle)


def test_refusals_leave_no_files_behind(workspace: Path) -> None:
    """Refused init and issue runs of the table created neither a CA nor output files."""
    assert not (workspace / "new").exists()
    assert not (workspace / "out").exists()


def test_init_twice_leaves_the_ca_byte_for_byte(
    capsys: pytest.CaptureFixture[str], workspace: Path
) -> None:
    ca_dir = workspace / "ca" / "ca"
    before = {p.name: p.read_bytes() for p in ca_dir.iterdir()}
    for argv in (["init"], ["init", "--key-type", "rsa-2048"], ["init", "--trust-domain", "x.y"]):
        assert main(["--data-dir", "ca", *argv]) == 1
        assert "a CA already exists" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in ca_dir.iterdir()} == before


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", "ca/ca/ca-key.pem", "bundle"],
        ["--config", "files/shadow", "bundle"],
        ["--config", "files/tag.yaml", "bundle"],
        ["issue", GOOD_ID, "--csr", "ca/ca/ca-key.pem", "--out", "out"],
        ["inspect", "ca/ca/ca-key.pem"],
        ["init", "--from-cacerts", "ca/ca"],
    ],
)
def test_refusals_never_echo_private_key_material(
    capsys: pytest.CaptureFixture[str], workspace: Path, argv: list[str]
) -> None:
    """Pointing any file argument at the CA key (or a shadow file, or a file whose YAML tag
    holds a token) is refused without showing any of its content."""
    key_lines = (workspace / "ca/ca/ca-key.pem").read_text().splitlines()[1:-1]
    key_lines += ["hashedSECRETpassword", "root:", "secretTOKEN"]
    assert main(["--data-dir", "ca", *argv]) == 1
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1
    for line in key_lines:
        assert line not in captured.out + captured.err


def test_inspect_of_an_expired_svid_describes_it_then_refuses(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--data-dir", "ca", "inspect", "files/expired.pem"]) == 1
    captured = capsys.readouterr()
    assert "spiffe://cluster.local/old" in captured.out
    assert "time left:   expired " in captured.out
    assert "chain:       not trusted" not in captured.out
    assert captured.err.count("\n") == 1
    assert "(rule: validity)" in captured.err


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["issue", "spiffe://cluster.local/a/../b", "--out", "o"], 1),
        (["inspect", "files/web.pem"], 1),
        (["--config", "files/invalid.yaml", "bundle"], 1),
        (["issue", "--ttl"], 2),
    ],
)
def test_a_real_process_prints_no_traceback(workspace: Path, argv: list[str], code: int) -> None:
    result = meshca_process("--data-dir", "ca", *argv, cwd=workspace)
    assert result.returncode == code
    assert result.stdout == ""
    assert_one_line_error(result.stderr)


def _run_quietly(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_corrupted_certificates_and_csrs_never_crash(workspace: Path, data: st.DataObject) -> None:
    """Random byte damage to a real SVID (inspect) or CSR (issue --csr): whatever the parser
    makes of it, the answer is an exit code and at most one line, never an exception."""
    kind = data.draw(st.sampled_from(["cert", "csr"]))
    if kind == "cert":
        original = (workspace / "files/expired.pem").read_bytes()
        der = x509.load_pem_x509_certificate(original).public_bytes(serialization.Encoding.DER)
    else:
        der = (workspace / "files/good.csr").read_bytes()
    damaged = bytearray(der)
    for at, value in data.draw(
        st.lists(
            st.tuples(st.integers(0, len(der) - 1), st.integers(0, 255)), min_size=1, max_size=4
        )
    ):
        damaged[at] = value
    target = workspace / "files" / f"damaged.{kind}"
    target.write_bytes(bytes(damaged))
    if kind == "cert":
        argv = ["--data-dir", "ca", "inspect", str(target)]
    else:
        argv = [*ISSUE, GOOD_ID, "--csr", str(target), "--out", "damaged-out"]
    code, err = _run_quietly(argv)
    assert code in (0, 1)
    assert err.count("\n") == (1 if code else 0)
