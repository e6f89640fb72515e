"""A replica's own intermediate (``meshca init --from-cacerts DIR --own-intermediate``):
how it is renewed is said at start-up and by ``meshca ca status``, and meshca renews it
itself, under the shared CA, when it can read that CA's key in the cacerts directory."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from meshca.backends.local import init_local_ca, load_local_ca
from meshca.issuer import Issuer
from meshca.rotation.checks import startup_checks
from meshca.rotation.journal import SlotKind
from meshca.rotation.local_ca import LocalCaSource
from meshca.rotation.manager import RotationManager
from meshca.spiffe import SpiffeId, TrustDomain
from tests.cli_harness import clean_environment, runner
from tests.svid_checks import assert_independently_valid

TD = TrustDomain("cluster.local")
WEB = SpiffeId.from_kubernetes("shop", "web", TD)
CACERTS = ("ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem")

Cli = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> Cli:
    clean_environment(monkeypatch, tmp_path)
    return runner(capsys)


@pytest.fixture
def replica(tmp_path: Path, cli: Cli) -> tuple[Path, Path]:
    """(cacerts directory, the replica's data directory), as the Deployment's init
    container leaves them."""
    init_local_ca(tmp_path / "operator", TD, path_length=1)
    cacerts = tmp_path / "cacerts"
    cacerts.mkdir()
    for name in CACERTS:  # what the Secret holds: never the root key
        shutil.copy(tmp_path / "operator" / "ca" / name, cacerts / name)
    data_dir = tmp_path / "replica"
    code, _, err = cli(
        "init", "--from-cacerts", cacerts, "--own-intermediate", "--data-dir", data_dir
    )
    assert code == 0, err
    return cacerts, data_dir


def open_manager(data_dir: Path) -> RotationManager:
    ca = load_local_ca(data_dir)
    manager = RotationManager(data_dir, ca.authority(), LocalCaSource(data_dir, TD))
    manager.open()
    return manager


def test_the_cacerts_directory_is_recorded(replica: tuple[Path, Path]) -> None:
    cacerts, data_dir = replica
    meta = json.loads((data_dir / "ca" / "meta.json").read_text())
    assert meta["origin"].startswith("own intermediate")
    assert meta["cacerts"] == str(cacerts.absolute())


def test_meta_json_is_read_again_only_when_it_changes(
    replica: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cacerts, data_dir = replica
    meta_path = data_dir / "ca" / "meta.json"
    reads: list[Path] = []
    read_bytes = Path.read_bytes

    def counting(self: Path) -> bytes:
        if self == meta_path:
            reads.append(self)
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", counting)
    source = LocalCaSource(data_dir, TD)
    for _ in range(3):
        assert source.own_intermediate
        assert source.cacerts == cacerts.absolute()
    assert len(reads) == 1
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "origin": "imported"}))
    assert not source.own_intermediate
    assert source.cacerts == cacerts.absolute()
    assert len(reads) == 2
    meta_path.unlink()
    assert not source.own_intermediate and source.cacerts is None


def test_without_the_cacerts_key_start_up_and_status_say_how_it_is_renewed(
    replica: tuple[Path, Path], cli: Cli
) -> None:
    cacerts, data_dir = replica
    (cacerts / "ca-key.pem").unlink()  # the serving container does not mount the Secret
    step = f"meshca init --from-cacerts {cacerts.absolute()} --own-intermediate --force"
    manager = open_manager(data_dir)
    try:
        [warning] = startup_checks(manager, timedelta(hours=1))  # what serve logs
        assert "own intermediate" in warning and step in warning
    finally:
        manager.close()
    code, out, err = cli("ca", "status", "--data-dir", data_dir)
    assert code == 0, err
    [problem] = [line for line in out.splitlines() if line.startswith("problem:")]
    assert step in problem and "restart the pod" in problem
    code, out, err = cli("ca", "rotate", "--data-dir", data_dir)
    assert code == 1 and err.count("\n") == 1 and step in err


def test_with_the_cacerts_key_meshca_mints_the_successor_itself(
    replica: tuple[Path, Path], cli: Cli, tmp_path: Path
) -> None:
    cacerts, data_dir = replica
    before = load_local_ca(data_dir)
    code, out, err = cli("ca", "status", "--data-dir", data_dir)
    assert code == 0, err
    assert "problem:" not in out
    assert f"minted under the CA in {cacerts.absolute()}" in out

    code, out, err = cli("ca", "rotate", "--data-dir", data_dir)
    assert code == 0, err
    after = load_local_ca(data_dir)
    assert after.signer.certificate != before.signer.certificate
    assert after.signer.key != before.signer.key
    assert after.bundle == before.bundle  # same shared root
    parent = before.signer.intermediates[0]  # the CA in the cacerts directory
    assert after.signer.intermediates[0] == parent
    assert after.signer.certificate.issuer == parent.subject
    assert after.origin == before.origin  # still this replica's own
    svid = Issuer(after.authority()).issue(WEB)
    assert_independently_valid(svid, after.bundle, tmp_path / "check")
    # and the key of the shared CA stays where it was: not in the data directory
    shared = (cacerts / "ca-key.pem").read_bytes()
    assert not any(
        shared in path.read_bytes() for path in data_dir.rglob("*.pem") if path.is_file()
    )


def test_a_replica_never_makes_a_root_of_its_own(replica: tuple[Path, Path], cli: Cli) -> None:
    _, data_dir = replica
    manager = open_manager(data_dir)
    try:
        problem = manager.source.problem(manager.active, new_root=True)
        assert problem is not None and "not by one replica" in problem
        assert manager.next_kind() is SlotKind.INTERMEDIATE
    finally:
        manager.close()
    journal = data_dir / "rotation" / "journal.json"
    before = journal.read_bytes()
    code, _, err = cli("ca", "rotate-root", "--step", "1", "--data-dir", data_dir)
    assert code == 1 and "not by one replica" in err
    # A refused command changes nothing: no rotation "running", nothing to roll back.
    assert journal.read_bytes() == before
    code, out, err = cli("ca", "status", "--json", "--data-dir", data_dir)
    assert code == 0, err
    assert json.loads(out)["root_rotation"] is None
    code, _, err = cli("ca", "rotate-root", "--rollback", "--data-dir", data_dir)
    assert code == 1 and "no root rotation is in progress" in err
