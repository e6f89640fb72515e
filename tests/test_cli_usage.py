"""What the command line tells a newcomer: unknown options named first and pointing to
the subcommand's help, help texts that describe each command and the current mesh
file, a warning for settings that do nothing, ``bootstrap --cert-dir`` refusing another
identity's certificate, and data directories created private in every mode."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from meshca.cli import main
from meshca.cli.commands.serve import config_from
from meshca.cli.main import build_parser
from meshca.cli.options import load_settings
from meshca.util.files import ensure_private_dir
from tests.cli_harness import Run, assert_one_line_error, assert_refused, clean_environment, runner

WEB = "spiffe://cluster.local/ns/shop/sa/web"
BUYER = "spiffe://cluster.local/ns/shop/sa/buyer"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_environment(monkeypatch, tmp_path)


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Run:
    return runner(capsys)


@pytest.mark.parametrize(
    ("argv", "named", "help_of"),
    [
        (["issue", "--bogus"], "--bogus", "meshca issue --help"),
        (["issue", WEB, "--bogus", "--out", "x"], "--bogus", "meshca issue --help"),
        (["ca", "status", "--bogus"], "--bogus", "meshca ca status --help"),
        (["bootstrap", "--bogus"], "--bogus", "meshca bootstrap --help"),
    ],
)
def test_an_unknown_option_is_named_first_with_the_subcommands_help(
    capsys: pytest.CaptureFixture[str], argv: list[str], named: str, help_of: str
) -> None:
    assert_refused(capsys, argv, 2, f"unrecognized arguments: {named} (see '{help_of}')")


def test_a_missing_argument_is_still_reported(capsys: pytest.CaptureFixture[str]) -> None:
    assert_refused(capsys, ["issue", WEB], 2, "required: --out (see 'meshca issue --help')")
    assert_refused(capsys, ["inspect"], 2, "required: FILE")


@pytest.mark.parametrize("action", ["status", "rotate", "rotate-root"])
def test_every_ca_action_has_a_description(action: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ca", action, "--help"]) == 0
    text = capsys.readouterr().out
    usage, description = text.split("\n\n")[:2]
    assert usage.startswith(f"usage: meshca ca {action}")
    assert not description.startswith("options:") and len(description) > 80, text


def test_mesh_help_describes_the_mesh_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    mesh = text.split("--mesh FILE ", 1)[1].split(" --", 1)[0]
    for part in ("workloads", "services", "traffic splits", "access policies"):
        assert part in mesh, mesh


def test_uds_identity_without_uds_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "meshca.yaml"
    config.write_text(f"uds_identity:\n  1337: {WEB}\n")
    args = build_parser().parse_args(["--config", str(config), "serve", "--listen", "[::1]:0"])
    served = config_from(load_settings(args))
    assert served.uds is None
    err = capsys.readouterr().err
    assert err.startswith("meshca: warning: uds_identity (config file"), err
    assert "no effect without uds" in err
    args = build_parser().parse_args(["--config", str(config), "serve", "--uds", "s.sock"])
    config_from(load_settings(args))
    assert capsys.readouterr().err == ""


def test_handshake_timeout_reaches_the_listeners(capsys: pytest.CaptureFixture[str]) -> None:
    from meshca.serve.listeners import grpc_server_options

    def listener_timeout(*flags: str) -> int:
        args = build_parser().parse_args(["serve", "--listen", "127.0.0.1:0", *flags])
        options = dict(grpc_server_options(config_from(load_settings(args)), 4096))
        return options["grpc.server_handshake_timeout_ms"]

    assert listener_timeout() == 5_000
    assert listener_timeout("--handshake-timeout", "1m") == 60_000
    assert main(["serve", "--listen", "127.0.0.1:0", "--handshake-timeout", "0s"]) == 1
    err = capsys.readouterr().err
    assert (
        err
        == "meshca: error: --handshake-timeout: invalid duration '0s': must be greater than zero\n"
    )


def test_bootstrap_refuses_a_cert_dir_of_another_identity(run: Run) -> None:
    assert run("init")[0] == 0
    assert run("issue", BUYER, "--out", "buyer")[0] == 0
    code, out, err = run("bootstrap", WEB, "--server", "127.0.0.1:15012", "--cert-dir", "buyer")
    assert (code, out) == (1, "")
    assert_one_line_error(err, f"cert.pem is for {BUYER}, not {WEB}")
    code, _, err = run("bootstrap", BUYER, "--server", "127.0.0.1:15012", "--cert-dir", "buyer")
    assert (code, err) == (0, "")
    Path("buyer/cert.pem").write_bytes(Path("buyer/bundle.pem").read_bytes())  # a CA's
    code, _, err = run("bootstrap", BUYER, "--server", "127.0.0.1:15012", "--cert-dir", "buyer")
    assert code == 1
    assert_one_line_error(err, "buyer/cert.pem")


def test_a_private_directory_gets_private_parents(tmp_path: Path) -> None:
    """``<data-dir>/vault`` or ``<data-dir>/rotation`` made first (Vault mode) leaves the
    data directory 0700 too, as the README says."""
    tmp_path.chmod(0o755)
    ensure_private_dir(tmp_path / ".meshca" / "vault")
    for directory in (tmp_path / ".meshca", tmp_path / ".meshca" / "vault"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755  # an existing parent: untouched
