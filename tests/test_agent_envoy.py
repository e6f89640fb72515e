"""Two real Envoys, each behind its own ``meshca agent`` (bootstraps from ``meshca
bootstrap --agent``: no certificate directory), carry mTLS traffic; renewals made in
the agents reach the Envoys with no failed request."""

from __future__ import annotations

import asyncio

import pytest

from meshca.spiffe import SpiffeId
from tests.ca_api_harness import agent_for, ca_api
from tests.envoy_harness import EnvoyProcess, RecordingApp, free_port, http_get
from tests.serve_harness import meshca, short_tempdir

pytestmark = [pytest.mark.envoy, pytest.mark.timeout(120)]

WEB = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/web")
BUYER = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/buyer")


async def test_envoys_behind_agents_talk_mtls_through_renewals() -> None:
    with short_tempdir("mca-agent-envoy-") as root, RecordingApp() as app:
        async with (
            ca_api(root) as api,
            agent_for(api, root, WEB, "web") as web_agent,
            agent_for(api, root, BUYER, "buyer") as buyer_agent,
        ):
            web_port, buyer_port = free_port(), free_port()
            web = EnvoyProcess(
                meshca(
                    *("bootstrap", str(WEB), "--agent", f"unix://{web_agent.config.socket}"),
                    *("--inbound", f"{web_port}:{app.port}", "--allow", str(BUYER)),
                ).stdout,
                root,
                "web",
            )
            buyer = EnvoyProcess(
                meshca(
                    *("bootstrap", str(BUYER), "--agent", f"unix://{buyer_agent.config.socket}"),
                    *(
                        "--outbound",
                        f"{buyer_port}:127.0.0.1:{web_port}",
                        "--upstream-id",
                        str(WEB),
                    ),
                    "--admin-port",
                    str(free_port()),
                ).stdout,
                root,
                "buyer",
            )
            try:
                await asyncio.to_thread(web.start)
                await asyncio.to_thread(buyer.start)
                status, body = await asyncio.to_thread(http_get, buyer_port, "/hello")
                assert status == 200, body
                assert app.callers()[-1] == str(BUYER)
                # The keys Envoy holds were made by the agents: both agents renew.
                for agent, identity, envoy in ((web_agent, WEB, web), (buyer_agent, BUYER, buyer)):
                    renewed = await agent.store.renew(identity)
                    for _ in range(100):
                        if f"{renewed.serial:x}" in envoy.serials():
                            break
                        status, body = await asyncio.to_thread(http_get, buyer_port, "/hello")
                        assert status == 200, body
                        await asyncio.sleep(0.1)
                    assert f"{renewed.serial:x}" in envoy.serials()
                status, body = await asyncio.to_thread(http_get, buyer_port, "/hello")
                assert status == 200, body
            finally:
                web.stop()
                buyer.stop()
