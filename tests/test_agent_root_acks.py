"""A root rotation counts an agent as holding a root only once the agent *reports* it:
each ``GetBundle`` poll names the SHA-256 of the roots it has applied and pushed to its
streams. Being sent the bundle is not enough (the agent may stop before applying it);
an agent that never reports (older than the server) is held and named; a SIGSTOP'd
agent holds the step and is named; ``--force-unacked`` goes on without it; and with no
server running, ``meshca ca rotate-root`` judges by the ACKs the server saved."""

from __future__ import annotations

import asyncio
import signal
from datetime import timedelta
from typing import Any

import pytest
from spiffe import WorkloadApiClient

from meshca.cli.main import main
from meshca.rotation.admin_client import admin_request
from meshca.rotation.journal import RotationError
from meshca.rotation.operator import ADMIN_SOCKET
from meshca.rotation.root import AckTimeout
from tests.ca_api_harness import agent_for, ca_api
from tests.cli_harness import assert_one_line_error
from tests.envoy_harness import eventually
from tests.serve_harness import kube_id, make_data_dir, serving, short_tempdir
from tests.test_agent_process import agent_process, join_token_files, joining

WEB = kube_id("shop", "web")
SHORT = timedelta(seconds=0.5)


async def test_an_agent_that_fetches_but_never_reports_holds_step_2() -> None:
    """What an agent older than the server sends: a poll without the field. Fetching the
    bundle holding the new root is not holding it."""
    with short_tempdir() as root:
        async with ca_api(root) as api, agent_for(api, root, WEB, poll_interval=3600) as agent:
            assert api.server.rotation is not None and agent.credential.svid is not None
            agent_id = str(agent.credential.svid.spiffe_id)
            rotation = api.server.rotation.rotation
            await rotation.step(1)
            for _ in range(2):  # fetches the new root, twice, reporting nothing
                await asyncio.to_thread(agent.client.fetch_bundle)
            with pytest.raises(AckTimeout) as held:
                await rotation.step(2, timeout=SHORT)
            assert held.value.waiting == [
                f"agent {agent_id} (reports no trust bundle: an agent older than the server?)"
            ]
            report = await rotation.step(2, timeout=SHORT, force=True)
            assert "went on without 1" in report.detail and agent_id in report.detail


def test_a_stopped_real_agent_holds_the_step_and_is_named() -> None:
    """Real ``meshca serve`` and ``meshca agent`` processes: the agent fetches the new
    root and pushes it to its Workload API, then is frozen (SIGSTOP) before its next
    poll. Step 2 is held, naming it, until it runs again and reports the root; later a
    frozen agent is left behind only with ``--force-unacked``, named in the report."""
    with short_tempdir() as root:
        data_dir = make_data_dir(root)
        join_token_files(root, data_dir, str(WEB))
        admin = data_dir / ADMIN_SOCKET

        def rotate_root(step: int, timeout: float, **more: object) -> dict[str, Any]:
            request = {"op": "rotate-root", "step": step, "timeout": timeout, **more}
            return admin_request(admin, request, timeout=timeout + 30)

        args = ("--listen", "127.0.0.1:0", "--attest-listen", "127.0.0.1:0")
        with serving(root, data_dir, *args) as server:
            socket = root / "agent.sock"
            with (
                agent_process(
                    root,
                    *joining(root, server, socket),
                    *("--poll-interval", "6s"),
                ) as agent,
                WorkloadApiClient(f"unix://{socket}") as client,
            ):

                def roots_pushed() -> int:
                    bundles = client.fetch_x509_bundles(timeout=10)
                    (bundle,) = bundles.bundles
                    return len(bundle.x509_authorities)

                try:
                    rotate_root(1, 5)
                    # Pushed to the Workload API: fetched in this poll. Frozen before the
                    # next one (6 s later), it has not reported the root.
                    eventually(lambda: roots_pushed() == 2, "the new root at the agent")
                    agent.send_signal(signal.SIGSTOP)
                    with pytest.raises(RotationError, match="meshca/agent/join_token/") as held:
                        rotate_root(2, 2)
                    assert "step 2" in str(held.value) and "--force-unacked" in str(held.value)
                    agent.send_signal(signal.SIGCONT)
                    report = rotate_root(2, 60)["steps"][0]
                    assert "went on without" not in report["detail"]

                    # Frozen again: step 4 would wait for its SVID under the new root.
                    rotate_root(3, 5)
                    agent.send_signal(signal.SIGSTOP)
                    report = rotate_root(4, 1, force=True)["steps"][0]
                    assert "went on without 1" in report["detail"]
                    assert "meshca/agent/join_token/" in report["detail"]
                finally:
                    agent.send_signal(signal.SIGCONT)
                # Running again, it renews under the new root: the last step needs nobody
                # left behind.
                report = rotate_root(5, 60)["steps"][0]
                assert "went on without" not in report["detail"]
                assert eventually(lambda: roots_pushed() == 1, "the old root gone at the agent")
        assert "Traceback" not in server.log()
        assert "Traceback" not in (root / "agent.log").read_text()


async def test_with_no_server_running_rotate_root_judges_by_the_saved_acks(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with short_tempdir() as root:
        async with ca_api(root) as api:
            assert api.server.rotation is not None
            await api.server.rotation.rotation.step(1)
            async with agent_for(api, root, WEB, poll_interval=3600) as agent:
                await agent.poll_once()  # fetches the new root
                await agent.poll_once()  # reports holding it: saved on the way out
                assert agent.credential.svid is not None
                agent_id = str(agent.credential.svid.spiffe_id)
        args = ["--data-dir", str(root / "data")]

        def rotate_root(*argv: str) -> tuple[int, str, str]:
            code = main(["ca", "rotate-root", *argv, *args])
            captured = capsys.readouterr()
            return code, captured.out, captured.err

        # The saved ACK holds the new root: step 2 goes on without a poll.
        code, out, err = await asyncio.to_thread(rotate_root, "--step", "2")
        assert code == 0, err
        assert (await asyncio.to_thread(rotate_root, "--step", "3"))[0] == 0
        # Its agent SVID is still under the old root, and nobody can poll a stopped
        # server: step 4 is refused at once (not after --timeout), naming the agent.
        code, out, err = await asyncio.to_thread(rotate_root, "--step", "4")
        assert code == 1 and out == ""
        assert_one_line_error(err, agent_id)
        assert "no server is running" in err and "--force-unacked" in err
        assert await asyncio.to_thread(main, ["ca", "status", *args]) == 0
        assert agent_id in capsys.readouterr().out  # status names whom it waits for
        # --force-unacked goes on without it, through the last step, and says so.
        code, out, err = await asyncio.to_thread(rotate_root, "--force-unacked")
        assert code == 0, err
        assert "went on without 1" in out and agent_id in out


async def test_a_root_that_arrives_with_a_renewal_reaches_the_streams_and_is_reported() -> None:
    """The agent's own renewal answer carries the bundle too; the next poll must still
    push it to the streams (and only then report it), not take it as already applied."""
    with short_tempdir() as root:
        async with ca_api(root) as api, agent_for(api, root, WEB, poll_interval=3600) as agent:
            assert api.server.rotation is not None
            rotation = api.server.rotation.rotation
            await rotation.step(1)
            await asyncio.to_thread(agent.credential.renew_now)  # answered with the new bundle
            await agent.poll_once()
            assert agent.store.bundle() == api.server.store.bundle()  # pushed to the streams
            await agent.poll_once()  # reports it
            report = await rotation.step(2, timeout=SHORT)
            assert "went on without" not in report.detail
