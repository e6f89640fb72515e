"""``meshca serve --kubernetes`` refuses a configuration it cannot use in one line, before
it serves anything: outside a pod without --kubeconfig, a kubeconfig that is missing, not
YAML or not a kubeconfig, and a mesh file given as well."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.serve_harness import MESHCA, clean_env, make_data_dir, short_tempdir


@pytest.mark.parametrize(
    ("args", "content", "said"),
    [
        (
            [],
            None,
            "not inside a Kubernetes pod (KUBERNETES_SERVICE_HOST is not set): give --kubeconfig",
        ),
        (["--kubeconfig", "{kc}"], None, "cannot read kubeconfig"),
        (["--kubeconfig", "{kc}"], "clusters: [\n", "is not valid YAML"),
        (["--kubeconfig", "{kc}"], "[1, 2]\n", "not a kubeconfig"),
        (["--kubeconfig", "{kc}"], "apiVersion: v1\n", "missing 'clusters'"),
        (["--mesh", "{kc}"], "{}\n", "two sources of the mesh: give one of them"),
    ],
    ids=["outside-a-pod", "missing", "not-yaml", "not-a-mapping", "no-clusters", "and-a-mesh"],
)
def test_an_unusable_kubernetes_configuration_is_one_line(
    args: list[str], content: str | None, said: str
) -> None:
    with short_tempdir() as root:
        kubeconfig = root / "kubeconfig"
        if content is not None:
            kubeconfig.write_text(content)
        env = clean_env()
        env.pop("KUBERNETES_SERVICE_HOST", None)
        result = subprocess.run(
            [*MESHCA, "serve", "--data-dir", str(make_data_dir(root)), "--uds",
             str(root / "s.sock"), "--kubernetes", *(a.format(kc=kubeconfig) for a in args)],
            capture_output=True, text=True, timeout=60, env=env,
        )  # fmt: skip
        assert result.returncode == 1, result.stderr
        assert said in result.stderr
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not Path(root / "s.sock").exists()
