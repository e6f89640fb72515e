"""Where keys are written and read, other users get nothing: ``meshca issue --out``
creates missing directories 0700 and refuses a directory another user owns or can
write; a private key file others may read is refused by ``issue``, ``ca`` and ``serve``,
naming the file and the chmod that fixes it."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli_harness import Run, assert_one_line_error, clean_environment, runner
from tests.serve_harness import serving, short_tempdir

GOOD_ID = "spiffe://cluster.local/ns/a/sa/b"
OTHER_UID = 54321  # no account needs to exist: only the owner number matters

as_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to give a directory to another uid (chown)"
)


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from meshca.cli import main

    root = tmp_path_factory.mktemp("modes-ca")
    assert main(["--data-dir", str(root / "data"), "init"]) == 0
    return root / "data"


@pytest.fixture
def run(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[Run]:
    clean_environment(monkeypatch, tmp_path)
    previous = os.umask(0o022)  # the usual umask: directories would be 0755
    try:
        yield runner(capsys)
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_issue_creates_every_missing_directory_0700(run: Run, ca_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "c"
    code, _, err = run("--data-dir", ca_dir, "issue", GOOD_ID, "--out", out)
    assert code == 0, err
    for directory in (tmp_path / "a", tmp_path / "a" / "b", out):
        assert _mode(directory) == 0o700, directory
    assert _mode(out / "key.pem") == 0o600


@as_root
def test_issue_refuses_a_directory_owned_by_another_user(
    run: Run, ca_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "theirs"
    out.mkdir(mode=0o700)
    os.chown(out, OTHER_UID, OTHER_UID)
    code, stdout, err = run("--data-dir", ca_dir, "issue", GOOD_ID, "--out", out)
    assert code == 1 and stdout == ""
    assert_one_line_error(err, f"{out}: is owned by uid {OTHER_UID}, not by this user")
    assert list(out.iterdir()) == []  # nothing written there


@pytest.mark.parametrize(
    ("layout", "refused"),
    [
        ({"out": 0o777}, "is world-writable without the sticky bit"),
        ({"parent": 0o777}, "which is world-writable without the sticky bit"),
        ({"out": 0o1777}, None),  # sticky and ours: others cannot replace our files
        ({"parent": 0o1777}, None),
    ],
)
def test_issue_refuses_world_writable_places(
    run: Run, ca_dir: Path, tmp_path: Path, layout: dict[str, int], refused: str | None
) -> None:
    parent = tmp_path / "shared"
    out = parent / "out"
    out.mkdir(parents=True, mode=0o700)
    for name, mode in layout.items():
        os.chmod(parent if name == "parent" else out, mode)
    code, _, err = run("--data-dir", ca_dir, "issue", GOOD_ID, "--out", out)
    if refused is None:
        assert code == 0, err
        assert _mode(out / "key.pem") == 0o600
    else:
        assert code == 1
        assert_one_line_error(err, refused)
        assert not (out / "key.pem").exists()


@pytest.fixture
def loose_ca(ca_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(ca_dir, copy)
    return copy


@pytest.mark.parametrize("key_file", ["ca-key.pem", "root-key.pem"])
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
@pytest.mark.parametrize(
    "argv",
    [
        ["issue", GOOD_ID, "--out", "out"],
        ["ca", "status"],
        ["ca", "rotate"],
        ["serve", "--uds", "meshca.sock"],
    ],
    ids=["issue", "ca-status", "ca-rotate", "serve"],
)
def test_a_key_file_others_may_read_is_refused(
    run: Run, loose_ca: Path, key_file: str, mode: int, argv: list[str]
) -> None:
    key = loose_ca / "ca" / key_file
    os.chmod(key, mode)
    code, _, err = run("--data-dir", loose_ca, *argv)
    assert code == 1
    assert_one_line_error(err, f"{key} has mode {mode:04o}: private keys must be 0600")
    assert f"run: chmod 600 {key}" in err
    assert not Path("out").exists()


def test_an_unquoted_uds_mode_in_the_config_file_is_the_mode_written(ca_dir: Path) -> None:
    """YAML 1.1 reads ``0640`` as the integer 416; the config file keeps what was
    written, so the socket gets mode 0640 (416 read as octal would be refused as 0416)."""
    with short_tempdir() as root:
        config = root / "meshca.yaml"
        config.write_text("uds_mode: 0640\n")
        data_dir = root / "data"
        shutil.copytree(ca_dir, data_dir)
        with serving(root, data_dir, "--config", str(config)) as running:
            assert _mode(running.uds) == 0o640
