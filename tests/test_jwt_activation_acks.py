"""A prepared JWT signing key signs only once every attested agent holds it: an agent
acknowledges the key set at its next poll (``GetBundle`` names the key ids it holds),
the operator's activation is refused naming the agents still without it (or goes on
with --force-unacked), the schedule retries and says so once, and an evicted agent is
no longer waited for."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import signal
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from spiffe import JwtSource, JwtSvid
from spiffe.spiffe_id.spiffe_id import TrustDomain as PyTrustDomain

from meshca.cli.main import main
from meshca.rotation.admin_client import admin_request
from meshca.rotation.journal import JwtKeyRecord, RotationError, SlotStatus
from meshca.rotation.jwt_keys import JwtKeyUnacked
from meshca.rotation.operator import ADMIN_SOCKET
from tests.ca_api_harness import agent_for, ca_api
from tests.cli_harness import assert_one_line_error
from tests.serve_harness import kube_id, make_data_dir, serving, short_tempdir
from tests.test_agent_process import agent_process, join_token_files, joining

WEB = kube_id("shop", "web")
DB = kube_id("shop", "db")
SHORT = timedelta(seconds=0.5)


async def test_activation_waits_for_every_agent_and_names_the_ones_without_the_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with short_tempdir() as root:
        async with ca_api(root) as api, agent_for(api, root, WEB) as running:
            async with agent_for(api, root, DB, name="stopped") as stopped:
                assert stopped.credential.svid is not None
                stopped_id = str(stopped.credential.svid.spiffe_id)
            assert running.credential.svid is not None
            running_id = str(running.credential.svid.spiffe_id)
            assert api.server.rotation is not None
            operations = api.server.rotation.operations
            jwt = api.server.rotation.manager.jwt
            signing = jwt.active

            prepared = await operations.jwt_key("prepare")
            await running.poll_once()  # fetches the key set holding the prepared key
            with pytest.raises(JwtKeyUnacked) as refused:
                await operations.jwt_key("activate", timeout=SHORT)
            # Fetched, not yet reported as held: both are waited for.
            assert {n.split()[1] for n in refused.value.waiting} == {running_id, stopped_id}
            await running.poll_once()  # reports holding it: its ACK
            with pytest.raises(JwtKeyUnacked) as refused:
                await operations.jwt_key("activate", timeout=SHORT)
            assert refused.value.waiting == [f"agent {stopped_id}"]
            message = str(refused.value)
            assert prepared["jwt_prepared"] in message and stopped_id in message
            assert running_id not in message and "--force-unacked" in message
            assert jwt.active == signing and jwt.prepared is not None  # nothing changed
            status = operations.status()["jwt_keys"]
            assert status["waiting_count"] == 1 and stopped_id in status["waiting_on"][0]

            caplog.set_level(logging.WARNING, logger="meshca.rotation")
            result = await operations.jwt_key("activate", force=True, timeout=SHORT)
            assert result["kid"] == prepared["kid"] == jwt.active.kid
            assert stopped_id in caplog.text  # went on without it, and said so


async def test_the_operator_activation_waits_for_the_agents_next_poll() -> None:
    with short_tempdir() as root:
        async with ca_api(root) as api, agent_for(api, root, WEB, poll_interval=0.1):
            assert api.server.rotation is not None
            operations = api.server.rotation.operations
            prepared = await operations.jwt_key("prepare")
            # The agent polls on its own: activation returns once it holds the key.
            result = await operations.jwt_key("activate", timeout=timedelta(seconds=20))
            assert result["jwt_activated"] == prepared["jwt_prepared"]


async def test_the_schedule_holds_activation_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with short_tempdir() as root:
        async with ca_api(root) as api, agent_for(api, root, WEB) as agent:
            assert api.server.rotation is not None
            manager = api.server.rotation.manager
            jwt = manager.jwt
            caplog.set_level(logging.INFO, logger="meshca.rotation")
            async with manager.lock:
                due = jwt.schedule().activate_at + timedelta(seconds=1)
                jwt.tick(due)  # prepares: past its prepare moment too
                prepared = jwt.prepared
                assert prepared is not None
                for later in range(3):  # held, retried, logged once
                    again = jwt.tick(due + timedelta(seconds=later))
                    assert min(again) <= due + timedelta(seconds=later) + timedelta(seconds=5)
            assert jwt.prepared == prepared
            held = [r for r in caplog.records if "waits for 1 agent(s)" in r.getMessage()]
            assert len(held) == 1 and "agent spiffe://" in held[0].getMessage()
            await agent.poll_once()
            await agent.poll_once()
            async with manager.lock:
                jwt.tick(due + timedelta(seconds=10))
            assert jwt.active.id == prepared.id


async def test_an_evicted_agent_is_not_waited_for() -> None:
    with short_tempdir() as root:
        async with ca_api(root) as api:
            async with agent_for(api, root, DB, name="stopped") as stopped:
                assert stopped.credential.svid is not None
                stopped_id = str(stopped.credential.svid.spiffe_id)
            assert api.server.rotation is not None
            operations = api.server.rotation.operations
            await operations.jwt_key("prepare")
            with pytest.raises(JwtKeyUnacked):
                await operations.jwt_key("activate", timeout=SHORT)
            data_dir = str(api.server.config.data_dir)
            code = await asyncio.to_thread(
                main, ["agent-admin", "evict", stopped_id, "--data-dir", data_dir]
            )
            assert code == 0
            await operations.jwt_key("activate", timeout=SHORT)


async def test_the_command_line_refusal_is_one_line_and_force_unacked_goes_on(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with short_tempdir() as root:
        async with ca_api(root) as api:
            async with agent_for(api, root, DB, name="stopped") as stopped:
                assert stopped.credential.svid is not None
                stopped_id = str(stopped.credential.svid.spiffe_id)
            args = ["--data-dir", str(api.server.config.data_dir)]

            def run(*argv: str) -> tuple[int, str, str]:
                code = main(["ca", "jwt-key", *argv, *args])
                captured = capsys.readouterr()
                return code, captured.out, captured.err

            assert (await asyncio.to_thread(run, "prepare"))[0] == 0
            code, out, err = await asyncio.to_thread(run, "activate", "--timeout", "1s")
            assert code == 1 and out == ""
            assert_one_line_error(err, stopped_id)
            assert "after 1s" in err and "--force-unacked" in err
            code, out, err = await asyncio.to_thread(run, "activate", "--force-unacked")
            assert code == 0, err
            assert "signs JWT-SVIDs now" in out
            # Each force flag belongs to its own step.
            for argv in (("prepare", "--force-unacked"), ("activate", "--force")):
                code, out, err = await asyncio.to_thread(run, *argv)
                assert code == 2 and out == ""
                assert_one_line_error(err, "applies to")


def test_a_workload_behind_a_real_agent_validates_the_new_keys_token_at_once() -> None:
    """Real ``meshca serve`` and ``meshca agent`` processes, py-spiffe's JwtSource on
    the agent's socket: the moment activation returns, a token the new key signs
    validates against the bundle the source already holds; an agent that cannot poll
    (SIGSTOP) holds the next activation, named in the refusal."""
    with short_tempdir() as root:
        data_dir = make_data_dir(root)
        join_token_files(root, data_dir, str(WEB))
        admin = data_dir / ADMIN_SOCKET

        def jwt_key(step: str, **more: object) -> dict[str, Any]:
            return admin_request(admin, {"op": "jwt-key", "step": step, **more}, timeout=60)

        args = ("--listen", "127.0.0.1:0", "--attest-listen", "127.0.0.1:0")
        with serving(root, data_dir, *args) as server:
            socket = root / "agent.sock"
            with agent_process(
                root,
                *joining(root, server, socket),
                *("--poll-interval", "1s"),
            ) as agent:
                source = JwtSource(socket_path=f"unix://{socket}", timeout_in_seconds=10)
                try:
                    # Prepared and activated back to back: activation returns only once
                    # the agent holds the key, so the source has it already.
                    jwt_key("prepare")
                    activated = jwt_key("activate", timeout=30)
                    svid = source.fetch_svid({"orders"})
                    assert _kid(svid.token) == activated["kid"]
                    bundle = source.get_bundle_for_trust_domain(
                        PyTrustDomain(WEB.trust_domain.name)
                    )
                    assert bundle is not None
                    JwtSvid.parse_and_validate(svid.token, bundle, ["orders"])

                    # A frozen agent does not poll: the next key waits for it.
                    jwt_key("prepare")
                    agent.send_signal(signal.SIGSTOP)
                    try:
                        with pytest.raises(RotationError, match="meshca/agent/join_token/"):
                            jwt_key("activate", timeout=1)
                    finally:
                        agent.send_signal(signal.SIGCONT)
                    assert jwt_key("activate", timeout=30)["jwt_activated"]
                finally:
                    source.close()
        assert "Traceback" not in server.log()


def _kid(token: str) -> str:
    head = token.split(".")[0]
    return str(json.loads(base64.urlsafe_b64decode(head + "=="))["kid"])


def test_the_refusal_names_at_most_twenty_agents() -> None:
    record = JwtKeyRecord("jwt-0002", SlotStatus.PREPARED, "kid2", datetime.now(UTC))
    waiting = [f"agent spiffe://cluster.local/meshca/agent/join_token/a{i}" for i in range(25)]
    message = str(JwtKeyUnacked(record, waiting, 60))
    assert "25 agent(s)" in message and "after 60s" in message
    assert "/a19," not in message and "/a19 and 5 more" in message and "/a20" not in message
