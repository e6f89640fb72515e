"""The commands that read the CA do the useful thing when it lives in Vault: ``meshca
bundle`` and ``meshca inspect`` use Vault's roots as the server keeps them on disk (or
say precisely why they cannot), and ``meshca ca status`` in per-workload mode says that
mode has no rotation instead of asking for a server that is running."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography import x509

from meshca.backends.vault.backend import VaultIntermediateAuthority, open_vault_authority
from meshca.backends.vault.settings import VaultSettings
from meshca.issuer import Issuer, TtlPolicy
from meshca.issuer.svid import certificates_pem
from meshca.spiffe import SpiffeId, TrustDomain
from tests.bao_harness import BaoServer, bao, mount
from tests.cli_harness import Run, assert_one_line_error, clean_environment, meshca_process, runner

__all__ = ["bao", "mount"]  # the OpenBao fixtures

TD = TrustDomain("cluster.local")
WEB = SpiffeId.from_kubernetes("default", "web", TD)


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> Run:
    clean_environment(monkeypatch, tmp_path)
    for name in ("VAULT_ADDR", "VAULT_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return runner(capsys)


def test_ca_status_in_per_workload_mode_says_there_is_no_rotation(tmp_path: Path, cli: Run) -> None:
    vault = ["--backend", "vault", "--vault-mode", "per-workload", "--vault-role", "spiffe"]
    vault += ["--vault-addr", "http://127.0.0.1:1", "--data-dir", str(tmp_path / "data")]
    code, out, err = cli("ca", "status", *vault)
    assert code == 0, err
    assert "per-workload mode" in out and "no CA rotation" in out
    assert "start" not in out + err
    code, out, err = cli("ca", "status", "--json", *vault)
    assert code == 0 and json.loads(out)["rotation"] is None
    code, out, err = cli("ca", "rotate", *vault)
    assert code == 1 and "no CA rotation" in err and "start" not in err


@pytest.mark.vault
def test_bundle_and_inspect_read_vaults_roots_from_disk(
    tmp_path: Path, cli: Run, bao: BaoServer, mount: str
) -> None:
    data_dir = tmp_path / "data"
    settings = VaultSettings.from_mapping(
        {"addr": bao.url, "token": bao.root_token, "mount": mount, "intermediate_ttl": "10m"}
    )
    # What 'meshca serve --backend vault' leaves in the data directory.
    authority = open_vault_authority(settings, TD, state_dir=data_dir / "vault", start=False)
    try:
        assert isinstance(authority, VaultIntermediateAuthority)
        roots = list(authority.roots())
        svid = Issuer(authority, TtlPolicy()).issue(WEB)
    finally:
        authority.close()
    (tmp_path / "svid.pem").write_bytes(certificates_pem(svid.chain))

    # Vault itself is not asked (no address or token given): the copy on disk is read.
    for backend in (["--backend", "vault"], []):
        code, out, err = cli("bundle", "--data-dir", data_dir, *backend)
        assert code == 0, err
        assert x509.load_pem_x509_certificates(out.encode()) == roots
        code, out, err = cli("inspect", tmp_path / "svid.pem", "--data-dir", data_dir, *backend)
        assert code == 0, err
        assert "no CA" not in out
        assert f"verifies against the trust bundle in {data_dir / 'vault'}" in out


def test_bundle_says_why_when_neither_disk_nor_vault_has_the_roots(
    tmp_path: Path, cli: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "data"
    monkeypatch.setenv("VAULT_ADDR", "http://127.0.0.1:1")  # nothing listens there
    monkeypatch.setenv("VAULT_TOKEN", "t")
    code, out, err = cli("bundle", "--backend", "vault", "--data-dir", data_dir)
    assert code == 1 and out == ""
    assert f"no copy of Vault's roots in {data_dir / 'vault' / 'root-cert.pem'}" in err
    assert "Vault cannot be read" in err and "meshca init" not in err
    assert err.count("\n") == 1


def test_a_one_shot_command_with_vault_down_prints_its_verdict_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a real process nothing has installed a log handler: the backend's retry
    narration (a server's log line) must not reach the terminal beside the verdict."""
    monkeypatch.setenv("VAULT_ADDR", "http://127.0.0.1:1")  # nothing listens there
    monkeypatch.setenv("VAULT_TOKEN", "t")
    for argv in (
        ["bundle", "--backend", "vault", "--data-dir", "data"],
        ["issue", "spiffe://cluster.local/a", "--out", "out", "--backend", "vault"],
    ):
        result = meshca_process(*argv, cwd=tmp_path)
        assert result.returncode == 1, argv
        assert_one_line_error(result.stderr, "cannot reach http://127.0.0.1:1")
