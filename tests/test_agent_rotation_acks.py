"""A root rotation waits for the attested agents, not only the proxies on xDS streams:
an agent acknowledges through the roots it reports holding at its next bundle poll and
the agent SVID it presents, so the last step (dropping the old root) refuses, naming it,
while an agent that is stopped has not picked the new root up; --force-unacked or
evicting the agent lets it go on."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest

from meshca.cli.main import main
from meshca.rotation.root import AckTimeout
from tests.ca_api_harness import agent_for, ca_api
from tests.serve_harness import kube_id, short_tempdir

WEB = kube_id("shop", "web")
DB = kube_id("shop", "db")
SHORT = timedelta(seconds=1)


async def test_the_last_step_waits_for_an_agent_that_has_not_fetched_the_new_root(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with short_tempdir() as root:
        async with ca_api(root) as api, agent_for(api, root, WEB, poll_interval=3600) as running:
            async with agent_for(api, root, DB, name="stopped") as stopped:
                stopped_svid = stopped.credential.svid
                assert stopped_svid is not None
            stopped_id = str(stopped_svid.spiffe_id)
            running_svid = running.credential.svid
            assert running_svid is not None
            running_id = str(running_svid.spiffe_id)
            assert api.server.rotation is not None
            rotation = api.server.rotation.rotation
            old_root = api.server.store.bundle().roots[0]

            # Step 1 adds the new root; step 2 waits for the running agent to fetch it
            # and, without --force-unacked, for the stopped one too.
            await rotation.step(1)
            with pytest.raises(AckTimeout) as held:
                await rotation.step(2, timeout=SHORT)
            assert any(stopped_id in name for name in held.value.waiting)
            await running.poll_once()  # fetches the bundle holding the new root
            with pytest.raises(AckTimeout) as held:
                await rotation.step(2, timeout=SHORT)
            # Sent is not held: the agent's ACK is its report at the next poll.
            assert any(running_id in name for name in held.value.waiting)
            await running.poll_once()  # reports the roots it applied
            with pytest.raises(AckTimeout) as held:
                await rotation.step(2, timeout=SHORT)
            assert not any(running_id in name for name in held.value.waiting)
            caplog.set_level(logging.WARNING, logger="meshca.rotation")
            await rotation.step(2, timeout=SHORT, force=True)
            assert stopped_id in caplog.text  # went on without it, and said so
            await rotation.step(3)
            for _ in range(2):  # renews its agent SVID under the new root, then shows it
                await running.poll_once()
            await rotation.step(4, timeout=SHORT, force=True)

            # The last step would strand the stopped agent (its SVID chains to the old
            # root): refused, naming it and only it; the old root stays.
            with pytest.raises(AckTimeout) as held:
                await rotation.step(5, timeout=SHORT)
            assert [n for n in held.value.waiting if "agent" in n] == [f"agent {stopped_id}"]
            assert old_root in api.server.store.bundle()
            status = api.server.rotation.operations.status()
            assert status["root_rotation"]["done"] == 4

            # Evicted, it is no longer waited for.
            data_dir = str(api.server.config.data_dir)
            assert main(["agent-admin", "evict", stopped_id, "--data-dir", data_dir]) == 0
            report = await rotation.step(5, timeout=SHORT)
            assert "went on without" not in report.detail
            assert old_root not in api.server.store.bundle()
            # The running agent was not stranded: it still renews under the new root.
            await running.poll_once()
            await running.store.renew(WEB)
