"""What rotation says about each CA is what that CA is: a signing CA under a new root is
shown as a signing CA, the log gives the new root's own expiry, and adopting a
self-signed CA says where its (root) key is kept."""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from pathlib import Path

import pytest

from meshca.backends.local import load_local_ca
from tests.cli_harness import Run, clean_environment, runner
from tests.rotation_harness import init_ca, init_self_signed_ca


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> Run:
    clean_environment(monkeypatch, tmp_path)
    return runner(capsys)


def test_a_signing_ca_under_a_new_root_is_shown_as_a_signing_ca(
    tmp_path: Path, cli: Run, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = init_ca(tmp_path / "data")
    caplog.set_level(logging.INFO, logger="meshca.rotation")
    code, _, err = cli("ca", "rotate-root", "--step", "1", "--data-dir", data_dir)
    assert code == 0, err

    code, out, err = cli("ca", "status", "--json", "--data-dir", data_dir)
    assert code == 0, err
    status = json.loads(out)
    prepared = next(s for s in status["slots"] if s["status"] == "prepared")
    new_root = next(r for r in status["bundle"] if r["fingerprint"] == prepared["root"])
    assert prepared["what"] == "signing CA, new root"

    code, out, err = cli("ca", "status", "--data-dir", data_dir)
    line = next(line for line in out.splitlines() if prepared["id"] in line)
    assert "signing CA, new root" in line and line.split()[2] != "root"

    # The log gives the new root's expiry, and says whose each date is.
    message = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("prepared"))
    assert f"the signing CA ends {prepared['not_after']}" in message
    assert f"(ends {new_root['not_after']}) added to the trust bundle" in message


def test_adopting_a_self_signed_ca_says_meshca_keeps_its_key(tmp_path: Path, cli: Run) -> None:
    init_self_signed_ca(tmp_path / "seed", timedelta(days=365))  # writes tmp_path/cacerts
    data_dir = tmp_path / "data"
    code, out, err = cli("init", "--from-cacerts", tmp_path / "cacerts", "--data-dir", data_dir)
    assert code == 0, err
    assert "not held by meshca" not in out
    key = load_local_ca(data_dir).directory / "ca-key.pem"
    assert f"root key:    {key} (the signing CA is the root itself)" in out
