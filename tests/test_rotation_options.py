"""The rotation options of the option table reach the rotation service of ``meshca
serve``, from flags, ``MESHCA_*`` variables and the config file; bad values are one line."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from meshca.cli.commands.serve import config_from
from meshca.cli.main import build_parser
from meshca.cli.main import main as cli_main
from meshca.cli.options import load_settings
from meshca.issuer import TtlError
from meshca.rotation.local_ca import LocalCaSource
from meshca.serve.config import parse_fraction
from meshca.serve.server import MeshcaServer
from tests.cli_harness import assert_one_line_error, clean_environment
from tests.serve_harness import make_data_dir, served, short_tempdir


@pytest.fixture
def root() -> Iterator[Path]:
    with short_tempdir("mca-ropt-") as path:
        make_data_dir(path)
        yield path


def serve_config(root: Path, *flags: str, environ: dict[str, str] | None = None) -> object:
    argv = ["serve", "--data-dir", str(root / "data"), "--uds", str(root / "sds.sock"), *flags]
    args = build_parser().parse_args(argv)
    return config_from(load_settings(args, environ or {}))


@pytest.mark.parametrize(
    ("text", "value"), [("0.25", 0.25), ("40%", 0.4), ("5/6", 5 / 6), (" 1/2 ", 0.5)]
)
def test_fractions_are_written_as_decimals_percentages_or_ratios(text: str, value: float) -> None:
    assert parse_fraction(text) == pytest.approx(value)


async def test_flags_environment_and_file_reach_the_rotation_service(root: Path) -> None:
    (root / "meshca.yaml").write_text("rotation_ca_ttl: 30d\nrotation_resume_grace: 0s\n")
    config = serve_config(
        root,
        "--config",
        str(root / "meshca.yaml"),
        "--rotation-activate-at",
        "0.75",
        "--rotation-ack-timeout",
        "90s",
        environ={"MESHCA_ROTATION_PREPARE_AT": "40%"},
    )
    async with served(config) as meshca:  # type: ignore[arg-type]
        rotation = meshca.rotation
        assert rotation is not None
        policy = rotation.manager.policy
        assert policy.prepare_fraction == pytest.approx(0.4)
        assert policy.activate_fraction == pytest.approx(0.75)
        source = rotation.manager.source
        assert isinstance(source, LocalCaSource) and source.ca_ttl == timedelta(days=30)
        assert rotation.rotation.ack_timeout == timedelta(seconds=90)
        assert rotation.resume_grace == 0
        schedule = rotation.manager.schedule()
        life = schedule.not_after - schedule.issued
        assert schedule.prepare_at == schedule.issued + life * 0.4


def test_defaults_are_the_documented_ones(root: Path) -> None:
    config = serve_config(root)
    server = MeshcaServer(config)  # type: ignore[arg-type]
    try:
        assert server.rotation is not None
        policy = server.rotation.manager.policy
        assert (policy.prepare_fraction, policy.activate_fraction) == (0.5, pytest.approx(5 / 6))
        assert server.rotation.rotation.ack_timeout == timedelta(minutes=5)
        assert server.rotation.resume_grace == 15
    finally:
        server.rotation.manager.close()  # type: ignore[union-attr]


def test_a_new_ca_lifetime_that_cannot_cover_the_leaves_is_refused(root: Path) -> None:
    config = serve_config(root, "--rotation-ca-ttl", "5h", "--ttl", "1h")
    with pytest.raises(TtlError, match="lifetime configured for new signing CAs"):
        MeshcaServer(config)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (("--rotation-prepare-at", "1.5"), "--rotation-prepare-at: '1.5' is not between 0 and 1"),
        (("--rotation-activate-at", "half"), "--rotation-activate-at: 'half' is not a fraction"),
        (
            ("--rotation-prepare-at", "0.9"),
            "rotation_prepare_at 0.9 (--rotation-prepare-at) is not earlier than "
            "rotation_activate_at 0.833333 (default)",
        ),
        (("--rotation-ack-timeout", "0s"), "--rotation-ack-timeout: invalid duration"),
    ],
)
def test_bad_rotation_options_are_one_line(
    root: Path,
    flags: tuple[str, ...],
    expected: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clean_environment(monkeypatch, root)
    code = cli_main(
        ["serve", "--data-dir", str(root / "data"), "--uds", str(root / "sds.sock"), *flags]
    )
    err = capsys.readouterr().err
    assert code == 1, err
    assert_one_line_error(err, expected)
