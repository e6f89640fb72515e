"""``meshca bootstrap --ads``: the bootstrap a proxy configured entirely over ADS gets,
through the option table (flags, environment, config file), and its refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from meshca.cli import main
from tests.cli_harness import assert_refused, clean_environment
from tests.envoy_harness import validate_config

pytestmark = pytest.mark.envoy

STORE_V1 = "spiffe://cluster.local/ns/bookstore/sa/bookstore-v1"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_environment(monkeypatch, tmp_path)


def bootstrap(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert main(["bootstrap", STORE_V1, "--server", "unix:///run/meshca.sock", *argv]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# Envoy bootstrap for")
    document = yaml.safe_load(out)
    assert isinstance(document, dict)
    return document


def test_ads_bootstrap_from_the_command_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    document = bootstrap(
        capsys, "--ads", "--capture", "explicit", "--workload", "bookstore-v1", "--delta"
    )
    assert [c["name"] for c in document["static_resources"]["clusters"]] == ["meshca_sds"]
    assert "listeners" not in document["static_resources"]
    dynamic = document["dynamic_resources"]
    assert dynamic["ads_config"]["api_type"] == "DELTA_GRPC"
    assert (
        dynamic["cds_config"] == dynamic["lds_config"] == {"ads": {}, "resource_api_version": "V3"}
    )
    assert document["node"]["id"] == STORE_V1
    assert document["node"]["metadata"] == {
        "meshca.capture": "explicit",
        "meshca.workload": "bookstore-v1",
    }
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(document))
    result = validate_config(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ads_defaults_and_the_other_sources(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    document = bootstrap(capsys, "--ads")
    assert document["dynamic_resources"]["ads_config"]["api_type"] == "GRPC"
    assert document["node"]["metadata"] == {"meshca.capture": "intercept"}
    # the environment and the config file, below the flag
    config = tmp_path / "meshca.yaml"
    config.write_text("ads: true\ndelta: true\ncapture: explicit\n")
    monkeypatch.setenv("MESHCA_CONFIG", str(config))
    document = bootstrap(capsys)
    assert document["dynamic_resources"]["ads_config"]["api_type"] == "DELTA_GRPC"
    assert document["node"]["metadata"] == {"meshca.capture": "explicit"}
    monkeypatch.setenv("MESHCA_CAPTURE", "intercept")
    assert bootstrap(capsys)["node"]["metadata"] == {"meshca.capture": "intercept"}
    assert bootstrap(capsys, "--capture", "explicit")["node"]["metadata"] == {
        "meshca.capture": "explicit"
    }
    # ADS settings in the environment do not stop an SDS-only bootstrap
    monkeypatch.delenv("MESHCA_CONFIG")
    document = bootstrap(capsys)
    assert "dynamic_resources" not in document


@pytest.mark.parametrize(
    ("argv", "environ", "code", "needle"),
    [
        (["--capture", "explicit"], {}, 2, "--capture applies to --ads"),
        (["--workload", "bookstore-v1"], {}, 2, "--workload applies to --ads"),
        (["--delta"], {}, 2, "--delta applies to --ads"),
        (["--ads", "--inbound", "15003:14001"], {}, 2, "--inbound does not apply to --ads"),
        (["--ads", "--capture", "tproxy"], {}, 1, "--capture: 'tproxy' is not a capture mode"),
        (["--ads"], {"MESHCA_CAPTURE": "tproxy"}, 1, "environment MESHCA_CAPTURE: 'tproxy'"),
        ([], {"MESHCA_ADS": "maybe"}, 1, "environment MESHCA_ADS: 'maybe' is not a boolean"),
        (["--ads", "--workload", "a/b/c"], {}, 1, "--workload 'a/b/c': expected NAME"),
    ],
    ids=[
        "capture-without-ads",
        "workload-without-ads",
        "delta-without-ads",
        "ads-with-inbound",
        "unknown-capture",
        "unknown-capture-env",
        "not-a-boolean",
        "bad-workload",
    ],
)
def test_refusals_are_one_line(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    environ: dict[str, str],
    code: int,
    needle: str,
) -> None:
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    argv = ["bootstrap", STORE_V1, "--server", "unix:///run/meshca.sock", *argv]
    assert_refused(capsys, argv, code, needle)


def test_ads_proxies_have_kubernetes_identities(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bootstrap", "spiffe://cluster.local/gateway", "--server", "unix:///m.sock", "--ads"]
    assert main(argv) == 1
    assert "spiffe://<td>/ns/<ns>/sa/<account>" in capsys.readouterr().err
