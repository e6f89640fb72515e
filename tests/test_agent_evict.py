"""``meshca agent-admin evict``: the server forgets an agent, whose next renewal (and
every other call) with its still-valid agent SVID is refused with PERMISSION_DENIED and
logged; its workload SVIDs are no longer renewed, and its spent token does not let it
back in."""

from __future__ import annotations

import asyncio
import json
import logging

import grpc
import pytest

from meshca.agent.ca_client import CaRefused
from meshca.cli.main import main
from meshca.issuer.keys import generate_private_key
from tests.ca_api_harness import agent_for, ca_api
from tests.serve_harness import kube_id, short_tempdir

WEB = kube_id("shop", "web")
DB = kube_id("shop", "db")


async def test_an_evicted_agent_is_refused_at_its_next_renewal(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    with short_tempdir() as root:
        async with (
            ca_api(root) as api,
            agent_for(api, root, WEB) as agent,
            agent_for(api, root, DB, name="db") as other,
        ):
            data_dir = str(api.server.config.data_dir)
            evicted = agent.credential.svid
            assert evicted is not None
            agent_id = str(evicted.spiffe_id)
            assert main(["agent-admin", "list", "--json", "--data-dir", data_dir]) == 0
            listed = {row["agent_id"]: row for row in json.loads(capsys.readouterr().out)}
            assert listed[agent_id]["identity"] == str(WEB)
            assert listed[agent_id]["mode"] == "sidecar" and len(listed) == 2

            assert main(["agent-admin", "evict", agent_id, "--data-dir", data_dir]) == 0
            assert "evicted" in capsys.readouterr().out
            # Evicting it again, or an ID nobody has, is one clear line.
            assert main(["agent-admin", "evict", agent_id, "--data-dir", data_dir]) == 2
            assert "no attested agent has the ID" in capsys.readouterr().err

            caplog.set_level(logging.WARNING, logger="meshca.ca_api")
            # Its agent SVID is still within its life, and still refused: renewal, a
            # workload CSR and the bundle poll alike.
            client = agent.client
            with pytest.raises(CaRefused) as refused:
                await asyncio.to_thread(client.renew, generate_private_key())
            assert refused.value.code is grpc.StatusCode.PERMISSION_DENIED
            assert "not attested" in str(refused.value)
            with pytest.raises(CaRefused):
                await asyncio.to_thread(client.fetch_bundle)
            before = agent.store.cached(WEB)
            assert before is not None
            with pytest.raises(CaRefused):
                await agent.store.renew(WEB)
            assert agent.store.cached(WEB) == before  # what it had is not renewed
            # Its renewal falls back to the token file, spent at attestation: still out.
            with pytest.raises(CaRefused) as reattest:
                await asyncio.to_thread(agent.credential.renew_now)
            assert reattest.value.code is grpc.StatusCode.UNAUTHENTICATED
            assert any(
                "refused" in r.getMessage() and agent_id in r.getMessage() for r in caplog.records
            )
            # The other agent is untouched.
            await other.poll_once()
            renewed = await asyncio.to_thread(other.client.renew, generate_private_key())
            assert renewed.svid.spiffe_id == other.credential.svid.spiffe_id  # type: ignore[union-attr]
