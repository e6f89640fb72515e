"""``meshca serve --kube-tokens`` and ``meshca agent --attestor k8s`` as real processes, as
docs/agent.md runs them: the agent attests with its pod's projected token from a file and
serves that pod's identity to py-spiffe; an agent whose token is for another audience
stops with one line saying why. The token is never logged."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable

import pytest
from spiffe import WorkloadApiClient

from tests.cli_harness import child_environment
from tests.kube_harness import KubeCluster
from tests.serve_harness import MESHCA, make_data_dir, meshca, serving, short_tempdir
from tests.test_agent_process import agent_process

pytestmark = pytest.mark.kube


def test_an_agent_process_attests_with_its_pods_token_file(
    kube: KubeCluster, kube_namespaces: Callable[..., str]
) -> None:
    ns = kube_namespaces("shop")
    kube.service_account(ns, "web")
    pod = kube.pod(ns, "web-0", service_account="web", node="node-a")
    with short_tempdir() as root:
        data_dir = make_data_dir(root)
        (root / "bundle.pem").write_text(meshca("bundle", "--data-dir", str(data_dir)).stdout)
        token_file = root / "token"
        token_file.write_text(kube.token(ns, "web", pod=pod))
        wrong_file = root / "wrong-token"
        wrong_file.write_text(kube.token(ns, "web", audience="vault", pod=pod))
        serve_args = (
            "--listen", "127.0.0.1:0", "--attest-listen", "127.0.0.1:0",
            "--kube-tokens", "--kubeconfig", str(kube.kubeconfig),
        )  # fmt: skip
        with serving(root, data_dir, *serve_args) as server:
            out = server.stdout.read_text()
            attest = re.search(r"attestation on tcp \S+:(\d+) \(TLS, join tokens, Kubernetes", out)
            assert attest is not None and server.tcp_port is not None, out

            def agent_args(token: str, name: str) -> list[str]:
                return [
                    "--attestor", "k8s", "--token-file", token,
                    "--server", f"localhost:{server.tcp_port}",
                    "--attest-server", f"localhost:{attest.group(1)}",
                    "--trust-bundle", str(root / "bundle.pem"),
                    "--socket", str(root / f"{name}.sock"),
                    "--data-dir", str(root / f"{name}-data"),
                ]  # fmt: skip

            with agent_process(root, *agent_args(str(token_file), "web")) as agent:
                with WorkloadApiClient(f"unix://{root / 'web.sock'}") as client:
                    svid = client.fetch_x509_svid(10)
                assert str(svid.spiffe_id) == f"spiffe://cluster.local/ns/{ns}/sa/web"
                assert agent.poll() is None
            refused = subprocess.run(
                [*MESHCA, "agent", *agent_args(str(wrong_file), "wrong")],
                capture_output=True,
                text=True,
                timeout=60,
                env=child_environment(),
            )
            log = server.log()
        assert refused.returncode == 1, refused.stderr
        assert "UNAUTHENTICATED" in refused.stderr and "audience 'meshca'" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        for secret in (token_file.read_text(), wrong_file.read_text()):
            assert secret not in log
            assert secret not in (root / "agent.log").read_text()
        assert f"pod {ns}/web-0" in log
