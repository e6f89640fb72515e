"""The `meshca` command line: init, issue, inspect, bundle and configuration precedence.

Every issued SVID is checked by two independent implementations: py-spiffe and
`openssl verify`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import spiffe
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshca.cli import main
from meshca.cli.options import reference_markdown
from meshca.issuer.svid import fingerprint
from tests.cli_harness import (
    MESHCA,
    Run,
    assert_one_line_error,
    child_environment,
    clean_environment,
    meshca_process,
    runner,
)
from tests.serve_harness import short_tempdir
from tests.svid_checks import OPENSSL, openssl_verify

REPO = Path(__file__).resolve().parent.parent
SKEW = timedelta(minutes=1)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No MESHCA_* setting of the outer shell leaks in; the default data dir is per test."""
    clean_environment(monkeypatch, tmp_path)


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Run:
    return runner(capsys)


@pytest.fixture(scope="module")
def shared_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One CA for the tests that only read it (init is tested on its own data dirs)."""
    data_dir = tmp_path_factory.mktemp("shared") / "data"
    assert main(["--data-dir", str(data_dir), "init"]) == 0
    return data_dir


def load_chain(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def openssl_verify_files(out: Path, tmp_path: Path) -> None:
    """`openssl verify` with the bundle as the only trust anchor: the leaf chains leaf ->
    intermediate -> root, also as README.md runs it (cert.pem as the untrusted helpers),
    and does not verify without the intermediate (the bundle holds only the root)."""
    chain, roots = load_chain(out / "cert.pem"), load_chain(out / "bundle.pem")
    result = openssl_verify(chain[0], chain[1:], roots, tmp_path / "openssl")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith(": OK")
    as_documented = subprocess.run(
        [OPENSSL, "verify", "-CAfile", out / "bundle.pem", "-untrusted", out / "cert.pem",
         out / "cert.pem"],
        capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip
    assert as_documented.returncode == 0, as_documented.stdout + as_documented.stderr
    assert as_documented.stdout.strip().endswith(": OK")
    assert openssl_verify(chain[0], [], roots, tmp_path / "openssl").returncode != 0


def check_svid(out: Path, expected_id: str, tmp_path: Path, key_pem: bytes | None = None) -> None:
    """py-spiffe parses cert.pem + key.pem to the expected ID; openssl verifies the chain."""
    key = key_pem if key_pem is not None else (out / "key.pem").read_bytes()
    parsed = spiffe.X509Svid.parse((out / "cert.pem").read_bytes(), key)
    assert str(parsed.spiffe_id) == expected_id
    bundle = spiffe.X509Bundle.parse(
        spiffe.TrustDomain(expected_id.split("/")[2]), (out / "bundle.pem").read_bytes()
    )
    assert len(bundle.x509_authorities) == 1
    openssl_verify_files(out, tmp_path)


# ---------------------------------------------------------------------------- init


def test_init_creates_a_root_and_signing_ca_and_says_so(run: Run, tmp_path: Path) -> None:
    code, out, err = run("init")
    assert (code, err) == (0, "")
    ca_dir = tmp_path / ".meshca" / "ca"
    root = load_chain(ca_dir / "root-cert.pem")[0]
    signing = load_chain(ca_dir / "ca-cert.pem")[0]
    assert "trust domain cluster.local" in out
    assert fingerprint(root) in out and fingerprint(signing) in out
    assert signing.issuer == root.subject
    assert stat.S_IMODE((tmp_path / ".meshca").stat().st_mode) == 0o700
    for key in ("root-key.pem", "ca-key.pem"):
        assert stat.S_IMODE((ca_dir / key).stat().st_mode) == 0o600
    assert json.loads((ca_dir / "meta.json").read_text())["trust_domain"] == "cluster.local"


def test_init_key_type_and_trust_domain(run: Run, tmp_path: Path) -> None:
    code, out, _ = run("init", "--key-type", "ec-p384", "--trust-domain", "example.org")
    assert code == 0
    assert "ec-p384" in out
    code, out, _ = run("issue", "spiffe://example.org/web", "--out", "o", "--json")
    assert code == 0
    assert json.loads(out)["spiffe_id"] == "spiffe://example.org/web"
    check_svid(tmp_path / "o", "spiffe://example.org/web", tmp_path)


@pytest.mark.parametrize(
    ("leaf_ttl", "ca_ttl", "signing_ttl"),
    [
        ("24h", "3650d", timedelta(days=365)),  # the defaults: a one-year signing CA
        ("90d", "3650d", timedelta(days=540)),  # long leaves: six leaf lifetimes
        ("1d", "30d", timedelta(days=30)),  # never past the root
    ],
)
def test_init_signing_ca_covers_the_leaf_rotation_schedule(
    run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, leaf_ttl: str, ca_ttl: str,
    signing_ttl: timedelta,
) -> None:  # fmt: skip
    monkeypatch.setenv("MESHCA_LEAF_TTL", leaf_ttl)
    code, _, err = run("init", "--ca-ttl", ca_ttl)
    assert (code, err) == (0, "")
    root = load_chain(tmp_path / ".meshca/ca/root-cert.pem")[0]
    signing = load_chain(tmp_path / ".meshca/ca/ca-cert.pem")[0]
    assert root.not_valid_after_utc - root.not_valid_before_utc == (
        timedelta(days=int(ca_ttl[:-1])) + SKEW
    )
    assert signing.not_valid_after_utc - signing.not_valid_before_utc == signing_ttl + SKEW


def test_init_force_replaces_and_keeps_a_backup(run: Run, tmp_path: Path) -> None:
    assert run("init")[0] == 0
    old_root = (tmp_path / ".meshca/ca/root-cert.pem").read_bytes()
    code, _, err = run("init", "--force")
    assert (code, err) == (0, "")
    assert (tmp_path / ".meshca/ca/root-cert.pem").read_bytes() != old_root
    backups = list((tmp_path / ".meshca/backup").iterdir())
    assert len(backups) == 1
    assert (backups[0] / "root-cert.pem").read_bytes() == old_root


def _cacerts_from(data_dir: Path, target: Path, layout: str) -> Path:
    ca = data_dir / "ca"
    target.mkdir()
    if layout == "istio":
        for name in ("ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem"):
            shutil.copy(ca / name, target / name)
    else:
        shutil.copy(ca / "ca-cert.pem", target / "tls.crt")
        shutil.copy(ca / "ca-key.pem", target / "tls.key")
        shutil.copy(ca / "root-cert.pem", target / "ca.crt")
    return target


@pytest.mark.parametrize("layout", ["istio", "kubernetes.io/tls"])
def test_init_from_cacerts_adopts_the_ca(
    run: Run, tmp_path: Path, shared_ca: Path, layout: str
) -> None:
    source = _cacerts_from(shared_ca, tmp_path / "cacerts", layout)
    code, out, err = run("--data-dir", "adopted", "init", "--from-cacerts", source)
    assert (code, err) == (0, ""), err
    assert "root key:    not held by meshca" in out
    assert not (tmp_path / "adopted/ca/root-key.pem").exists()
    code, _, err = run(
        "--data-dir", "adopted", "issue", "spiffe://cluster.local/vm/1", "--out", "o"
    )
    assert code == 0, err
    check_svid(tmp_path / "o", "spiffe://cluster.local/vm/1", tmp_path)
    # The adopted CA's root is the shared CA's root: SVIDs chain to the original bundle.
    assert (tmp_path / "o/bundle.pem").read_bytes() == (shared_ca / "ca/root-cert.pem").read_bytes()


# ---------------------------------------------------------------------------- issue


def test_issue_by_spiffe_id_writes_a_verifiable_svid(
    run: Run, tmp_path: Path, shared_ca: Path
) -> None:
    code, out, err = run(
        "--data-dir", shared_ca, "issue", "spiffe://cluster.local/ns/a/sa/web", "--out", "out"
    )
    assert (code, err) == (0, "")
    assert "spiffe://cluster.local/ns/a/sa/web" in out
    out_dir = tmp_path / "out"
    assert stat.S_IMODE((out_dir / "key.pem").stat().st_mode) == 0o600
    assert (out_dir / "key.pem").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    chain = load_chain(out_dir / "cert.pem")
    signing = load_chain(shared_ca / "ca/ca-cert.pem")[0]
    assert len(chain) == 2 and chain[1] == signing  # leaf first, then the intermediate
    assert (
        chain[0].not_valid_after_utc - chain[0].not_valid_before_utc == timedelta(hours=24) + SKEW
    )
    assert (out_dir / "bundle.pem").read_bytes() == (shared_ca / "ca/root-cert.pem").read_bytes()
    check_svid(out_dir, "spiffe://cluster.local/ns/a/sa/web", tmp_path)


def test_issue_by_namespace_and_service_account_json(
    run: Run, tmp_path: Path, shared_ca: Path
) -> None:
    code, out, err = run(
        "--data-dir", shared_ca, "issue", "--namespace", "shop", "--service-account", "cart",
        "--out", "o", "--json", "--ttl", "2h",
    )  # fmt: skip
    assert (code, err) == (0, "")
    result = json.loads(out)
    leaf = load_chain(tmp_path / "o/cert.pem")[0]
    assert result["spiffe_id"] == "spiffe://cluster.local/ns/shop/sa/cart"
    assert result["serial"] == f"{leaf.serial_number:032x}"
    assert result["not_after"] == leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == timedelta(hours=2) + SKEW
    for name in ("cert", "key", "bundle"):
        assert Path(result[name]) == tmp_path / "o" / f"{name}.pem"
    check_svid(tmp_path / "o", result["spiffe_id"], tmp_path)


@pytest.mark.parametrize("key_type", ["ec-p384", "rsa-2048"])
def test_issue_key_types(run: Run, tmp_path: Path, shared_ca: Path, key_type: str) -> None:
    code, out, _ = run(
        "--data-dir", shared_ca, "issue", "spiffe://cluster.local/k", "--key-type", key_type,
        "--out", "o", "--json",
    )  # fmt: skip
    assert code == 0
    assert json.loads(out)["key_type"] == key_type
    check_svid(tmp_path / "o", "spiffe://cluster.local/k", tmp_path)


def test_issue_max_ttl_can_be_raised(run: Run, tmp_path: Path, shared_ca: Path) -> None:
    argv = ["--data-dir", shared_ca, "issue", "spiffe://cluster.local/long", "--out", "o"]
    assert run(*argv, "--ttl", "100d")[0] == 1
    code, _, err = run(*argv, "--ttl", "100d", "--max-ttl", "120d")
    assert (code, err) == (0, "")
    leaf = load_chain(tmp_path / "o/cert.pem")[0]
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == timedelta(days=100) + SKEW


def test_issue_csr_from_openssl_certifies_only_its_key(
    run: Run, tmp_path: Path, shared_ca: Path
) -> None:
    """The CSR asks for another identity, a DNS name and CA=true; none of it is copied."""
    key_file, csr_file = tmp_path / "own.key", tmp_path / "req.csr"
    subprocess.run(
        ["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", key_file, "-out", csr_file, "-subj", "/CN=admin",
         "-addext", "subjectAltName=URI:spiffe://cluster.local/ns/kube-system/sa/admin,DNS:evil",
         "-addext", "basicConstraints=critical,CA:TRUE"],
        check=True, capture_output=True,
    )  # fmt: skip
    code, out, err = run(
        "--data-dir", shared_ca, "issue", "spiffe://cluster.local/ns/a/sa/vm", "--csr", csr_file,
        "--out", "o", "--json",
    )  # fmt: skip
    assert (code, err) == (0, "")
    assert json.loads(out)["key"] is None
    assert not (tmp_path / "o/key.pem").exists()
    leaf = load_chain(tmp_path / "o/cert.pem")[0]
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(sans) == [x509.UniformResourceIdentifier("spiffe://cluster.local/ns/a/sa/vm")]
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert leaf.subject == x509.Name([])
    csr = x509.load_pem_x509_csr(csr_file.read_bytes())
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    assert leaf.public_key().public_bytes(
        serialization.Encoding.DER, spki
    ) == csr.public_key().public_bytes(serialization.Encoding.DER, spki)
    check_svid(tmp_path / "o", "spiffe://cluster.local/ns/a/sa/vm", tmp_path, key_file.read_bytes())


def test_issue_never_follows_a_planted_symlink(run: Run, tmp_path: Path, shared_ca: Path) -> None:
    """A key.pem symlink planted in --out is replaced, not written through."""
    out_dir, victim = tmp_path / "o", tmp_path / "victim"
    out_dir.mkdir()
    victim.write_text("untouched")
    (out_dir / "key.pem").symlink_to(victim)
    assert (
        run("--data-dir", shared_ca, "issue", "spiffe://cluster.local/x", "--out", out_dir)[0] == 0
    )
    assert victim.read_text() == "untouched"
    assert not (out_dir / "key.pem").is_symlink()
    assert stat.S_IMODE((out_dir / "key.pem").stat().st_mode) == 0o600


# ---------------------------------------------------------------------------- inspect


def test_inspect_describes_the_svid_and_verifies_it(
    run: Run, tmp_path: Path, shared_ca: Path
) -> None:
    run("--data-dir", shared_ca, "issue", "spiffe://cluster.local/ns/a/sa/db", "--out", "o")
    leaf = load_chain(tmp_path / "o/cert.pem")[0]
    code, out, err = run("--data-dir", shared_ca, "inspect", "o/cert.pem")
    assert (code, err) == (0, "")
    assert "SPIFFE ID:   spiffe://cluster.local/ns/a/sa/db" in out
    assert f"SHA-256:     {fingerprint(leaf)}" in out
    assert f"serial:      {leaf.serial_number:032x}" in out
    assert "key type:    ec-p256" in out
    assert "chain:       verifies against the trust bundle" in out
    code, out, _ = run("--data-dir", shared_ca, "inspect", "o/cert.pem", "--json")
    report = json.loads(out)
    assert code == 0
    assert report["spiffe_id"] == "spiffe://cluster.local/ns/a/sa/db"
    assert report["sha256"] == fingerprint(leaf)
    assert report["issuer"].startswith("serialNumber=")
    assert report["chain"] == {
        "checked": True,
        "verified": True,
        "detail": f"verifies against the trust bundle in {shared_ca / 'ca'}",
    }


def test_inspect_without_a_ca_and_against_a_foreign_ca(
    run: Run, tmp_path: Path, shared_ca: Path
) -> None:
    run("--data-dir", shared_ca, "issue", "spiffe://cluster.local/w", "--out", "o")
    code, out, err = run("--data-dir", "empty", "inspect", "o/cert.pem", "--json")
    assert (code, err) == (0, "")
    assert json.loads(out)["chain"]["checked"] is False
    assert run("--data-dir", "other", "init")[0] == 0
    code, out, err = run("--data-dir", "other", "inspect", "o/cert.pem", "--json")
    assert (code, err) == (0, "")
    assert json.loads(out)["chain"]["verified"] is False


# ---------------------------------------------------------------------------- bundle


def test_bundle_pem_and_jwks(run: Run, tmp_path: Path, shared_ca: Path) -> None:
    root_pem = (shared_ca / "ca/root-cert.pem").read_bytes()
    code, out, err = run("--data-dir", shared_ca, "bundle")
    assert (code, out.encode(), err) == (0, root_pem, "")
    code, out, _ = run("--data-dir", shared_ca, "bundle", "--format", "jwks")
    assert code == 0
    jwks = json.loads(out)
    root = x509.load_pem_x509_certificate(root_pem)
    assert [k["use"] for k in jwks["keys"]] == ["x509-svid"]
    assert base64.b64decode(jwks["keys"][0]["x5c"][0]) == root.public_bytes(
        serialization.Encoding.DER
    )
    assert jwks["keys"][0]["kty"] == "EC" and jwks["keys"][0]["crv"] == "P-256"
    assert isinstance(jwks["spiffe_sequence"], int)
    assert isinstance(jwks["spiffe_refresh_hint"], int)
    code, out, _ = run("--data-dir", shared_ca, "bundle", "--format", "jwks", "--out", "b.json")
    assert (code, out) == (0, "")
    assert json.loads((tmp_path / "b.json").read_text()) == jwks


# ---------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("flag", "env", "file", "expected"),
    [
        ("4h", "3h", "2h", timedelta(hours=4)),  # the flag beats everything
        (None, "3h", "2h", timedelta(hours=3)),  # then the environment
        (None, None, "2h", timedelta(hours=2)),  # then the config file
        (None, None, None, timedelta(hours=24)),  # then the default
    ],
)
def test_precedence_flag_env_file_default(
    run: Run,
    tmp_path: Path,
    shared_ca: Path,
    monkeypatch: pytest.MonkeyPatch,
    flag: str | None,
    env: str | None,
    file: str | None,
    expected: timedelta,
) -> None:
    config = tmp_path / "meshca.yaml"
    config.write_text(f"data_dir: {shared_ca}\n" + (f"leaf_ttl: {file}\n" if file else ""))
    monkeypatch.setenv("MESHCA_CONFIG", str(config))
    if env:
        monkeypatch.setenv("MESHCA_LEAF_TTL", env)
    argv = ["issue", "spiffe://cluster.local/p", "--out", "o"] + (["--ttl", flag] if flag else [])
    code, _, err = run(*argv)
    assert (code, err) == (0, "")
    leaf = load_chain(tmp_path / "o/cert.pem")[0]
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == expected + SKEW


def test_data_dir_precedence_and_config_relative_paths(
    run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative data_dir in a config file is relative to that file, not to the cwd."""
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    (conf_dir / "meshca.yaml").write_text("data_dir: state\ntrust_domain: file.example\n")
    assert run("--config", conf_dir / "meshca.yaml", "init")[0] == 0
    assert (conf_dir / "state/ca/ca-cert.pem").exists()
    monkeypatch.setenv("MESHCA_DATA_DIR", str(tmp_path / "env-state"))
    monkeypatch.setenv("MESHCA_CONFIG", str(conf_dir / "meshca.yaml"))
    code, out, _ = run("init")
    assert code == 0 and (tmp_path / "env-state/ca/ca-cert.pem").exists()
    assert "trust domain file.example" in out  # the file still supplies what env does not
    code, out, _ = run("--data-dir", "flag-state", "init", "--trust-domain", "flag.example")
    assert code == 0 and (tmp_path / "flag-state/ca/ca-cert.pem").exists()
    assert "trust domain flag.example" in out


def test_existing_ca_keeps_its_trust_domain(
    run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run("init", "--trust-domain", "prod.example")[0] == 0
    code, out, _ = run(
        "issue", "--namespace", "a", "--service-account", "b", "--out", "o", "--json"
    )
    assert code == 0  # no trust domain given: the CA's own is used, not the default
    assert json.loads(out)["spiffe_id"] == "spiffe://prod.example/ns/a/sa/b"
    monkeypatch.setenv("MESHCA_TRUST_DOMAIN", "cluster.local")
    code, out, err = run("issue", "--namespace", "a", "--service-account", "b", "--out", "o")
    assert code == 1 and out == ""
    assert "prod.example" in err and "environment MESHCA_TRUST_DOMAIN" in err


# ---------------------------------------------------------------------------- processes


def test_console_script_and_module_exit_codes(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "meshca"
    usage = subprocess.run(
        [script, "issue", "--out"],
        cwd=tmp_path,
        env=child_environment(),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert usage.returncode == 2
    assert_one_line_error(usage.stderr)
    refused = meshca_process("bundle", cwd=tmp_path)
    assert refused.returncode == 1
    assert refused.stderr.startswith("meshca: error: no CA in ")
    assert_one_line_error(refused.stderr)
    ok = meshca_process("init", cwd=tmp_path)
    assert ok.returncode == 0 and ok.stderr == ""


@contextlib.contextmanager
def silent_admin_socket() -> Iterator[tuple[Path, threading.Event]]:
    """A data directory whose admin socket takes ``meshca ca status``'s request and never
    answers (a server busy elsewhere); the event is set once the request has arrived, so
    the command is then waiting for the answer."""
    with short_tempdir("mca-int-") as root:
        data_dir = root / "data"
        data_dir.mkdir(mode=0o700)
        received = threading.Event()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(str(data_dir / "admin.sock"))
            listener.listen(1)
            listener.settimeout(60)

            def take_the_request() -> None:
                with contextlib.suppress(OSError), listener.accept()[0] as connection:
                    if connection.recv(65536):
                        received.set()
                    connection.recv(1)  # holds the connection open until the client goes

            threading.Thread(target=take_the_request, daemon=True).start()
            yield data_dir, received


def ca_status(data_dir: Path) -> list[str]:
    return ["ca", "status", "--data-dir", str(data_dir), "--timeout", "60s"]


def interrupted(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    """SIGINT to ``proc`` (Ctrl-C), then its exit code and output."""
    try:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err


def test_ctrl_c_while_waiting_exits_130_quietly(tmp_path: Path) -> None:
    """SIGINT arrives while the command waits for the server's answer."""
    with silent_admin_socket() as (data_dir, received):
        proc = subprocess.Popen(
            [*MESHCA, *ca_status(data_dir)],
            cwd=tmp_path,
            env=child_environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert received.wait(timeout=60), "the command never sent its request"
        assert interrupted(proc) == (130, "", "")


CTRL_C_DURING_IMPORT = """
import importlib.abc, os, signal, sys

class CtrlC(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "meshca.cli.options":  # a command module is being loaded: press Ctrl-C
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, CtrlC())
"""


def test_ctrl_c_while_meshca_is_still_starting_exits_130_quietly(tmp_path: Path) -> None:
    """SIGINT arrives while the command modules are still being imported (most of the
    start-up; a second or more on a busy machine). A ``sitecustomize`` in the child sends
    it at a chosen import, so the moment is exact, not a race."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(CTRL_C_DURING_IMPORT)
    environment = child_environment() | {"PYTHONPATH": str(site)}
    result = subprocess.run(
        [*MESHCA, "bundle", "--data-dir", str(tmp_path / "data")],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout, result.stderr) == (130, "", "")


def test_make_run_example_keeps_an_existing_ca(tmp_path: Path) -> None:
    def example() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, REPO / "examples/run_defaults.py"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )

    first = example()
    assert first.returncode == 0, first.stderr
    root = (tmp_path / ".meshca/ca/root-cert.pem").read_bytes()
    second = example()
    assert second.returncode == 0, second.stderr
    assert "keeping it" in second.stdout
    assert (tmp_path / ".meshca/ca/root-cert.pem").read_bytes() == root
    check_svid(
        tmp_path / ".meshca/example", "spiffe://cluster.local/ns/default/sa/example", tmp_path
    )


README_COMMANDS = ("init", "issue", "inspect", "bundle")


def test_readme_configuration_reference_matches_the_option_table() -> None:
    readme = (REPO / "README.md").read_text()
    assert reference_markdown(README_COMMANDS) in readme, (
        "README.md's configuration table is stale: regenerate it with "
        f"meshca.cli.options.reference_markdown({README_COMMANDS})"
    )
