"""``meshca agent`` sends the workload CSRs that are due at once in ``BatchSignWorkload``
calls: each thread still gets the certificate for its own key, or its own refusal; a
failure of the whole call reaches every thread of the batch (real gRPC over loopback,
a real agent's issuer)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import grpc
import pytest

from meshca.agent.ca_client import CaRefused
from meshca.cli.main import main
from meshca.issuer import X509Svid
from meshca.issuer.keys import public_keys_equal
from meshca.spiffe import SpiffeId
from tests.ca_api_harness import agent_for, ca_api
from tests.serve_harness import kube_id, short_tempdir

WEB = kube_id("shop", "web")
DB = kube_id("shop", "db")


def at_once(calls: list[Callable[[], X509Svid]]) -> list[X509Svid | BaseException]:
    """Run ``calls`` in as many threads, released together; each one's result or error."""
    start = threading.Barrier(len(calls))
    outcomes: list[X509Svid | BaseException | None] = [None] * len(calls)

    def run(index: int) -> None:
        start.wait()
        try:
            outcomes[index] = calls[index]()
        except Exception as exc:
            outcomes[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(outcome is not None for outcome in outcomes), "a signing thread did not end"
    return [o for o in outcomes if o is not None]


async def test_concurrent_workload_csrs_go_in_batches_each_answered_on_its_own() -> None:
    with short_tempdir() as root:
        async with ca_api(root) as api, agent_for(api, root, WEB) as agent:
            issuer, signer = agent.issuer, agent.authority.signer
            wanted: list[SpiffeId] = [WEB] * 15 + [DB]  # DB: not this agent's
            outcomes = await asyncio.to_thread(
                at_once, [lambda sid=sid: issuer.issue(sid) for sid in wanted]
            )
            assert signer.batches >= 1  # the CSRs that waited went together
            refused = outcomes.pop()
            assert isinstance(refused, CaRefused)
            assert refused.code is grpc.StatusCode.PERMISSION_DENIED
            assert f"not entitled to {DB}" in str(refused)
            for svid in outcomes:
                assert isinstance(svid, X509Svid) and svid.spiffe_id == WEB
                assert svid.private_key is not None  # made here, certified for this key
                assert public_keys_equal(svid.leaf.public_key(), svid.private_key.public_key())
            assert len({svid.serial for svid in outcomes if isinstance(svid, X509Svid)}) == 15

            # The agent is evicted: the whole call is refused, and every thread hears it.
            agent_id = str(agent.credential.svid.spiffe_id)  # type: ignore[union-attr]
            data_dir = str(api.server.config.data_dir)
            assert main(["agent-admin", "evict", agent_id, "--data-dir", data_dir]) == 0
            outcomes = await asyncio.to_thread(
                at_once, [lambda: issuer.issue(WEB) for _ in range(6)]
            )
            for outcome in outcomes:
                assert isinstance(outcome, CaRefused), outcome
                assert outcome.code is grpc.StatusCode.PERMISSION_DENIED
                assert "not attested" in str(outcome)


@pytest.mark.parametrize("size", [1, 3])
async def test_a_lone_or_small_burst_is_signed(size: int) -> None:
    """No timer holds a CSR back: one alone goes at once as SignWorkload."""
    with short_tempdir() as root:
        async with ca_api(root) as api, agent_for(api, root, WEB) as agent:
            before = agent.authority.signer.batches
            outcomes = await asyncio.to_thread(
                at_once, [lambda: agent.issuer.issue(WEB) for _ in range(size)]
            )
            assert all(isinstance(o, X509Svid) for o in outcomes)
            if size == 1:
                assert agent.authority.signer.batches == before
            assert api.server.agent_ca.refusals == 0
