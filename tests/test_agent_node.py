"""Node mode: one agent, registration entries, and callers attested from SO_PEERCRED
(uid, gid, and the executable behind the pid). A second local uid that no entry's
selectors match gets nothing; a caller matching two entries holds both identities."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from spiffe import WorkloadApiClient

from meshca.agent.runtime import MeshcaAgent
from meshca.attest.entries import EntryStore
from meshca.cli.main import main
from meshca.spiffe import SpiffeId
from tests.ca_api_harness import CaApi, agent_for, ca_api
from tests.serve_harness import TD, fetch, kube_id, short_tempdir

WEB = kube_id("shop", "web")
TOOL = kube_id("shop", "tool")
DB = kube_id("shop", "db")
NOBODY = 65534

# A second local user: the script imports py-spiffe as root, then drops to NOBODY (in the
# socket's group, so the file mode lets it connect) before it calls the agent.
SECOND_UID = """
import os, sys
from spiffe import WorkloadApiClient
from spiffe.workloadapi.errors import FetchX509SvidError
os.setgroups([0]); os.setgid(0); os.setuid({uid})
try:
    with WorkloadApiClient("unix://{socket}") as client:
        print(client.fetch_x509_svid(10).spiffe_id)
except FetchX509SvidError as exc:
    print("refused:", exc)
"""


@dataclass
class Node:
    api: CaApi
    agent: MeshcaAgent
    entries: EntryStore
    agent_id: SpiffeId


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    if os.getuid() != 0:
        pytest.skip("needs root to call the agent as a second uid")
    with short_tempdir() as root:
        root.chmod(0o755)  # the second uid must reach the socket inside
        async with ca_api(root) as api:
            token, record = api.tokens.create(None, node=True)
            agent_id = SpiffeId.for_agent(TD, "join_token", record.id)
            entries = EntryStore(api.server.config.data_dir)
            entries.create(WEB, agent_id, [f"unix:uid:{os.getuid()}"])
            python = os.path.realpath(sys.executable)
            entries.create(TOOL, agent_id, [f"unix:path:{python}", f"unix:uid:{os.getuid()}"])
            entries.create(DB, agent_id, [f"unix:uid:{NOBODY}", "unix:gid:12345"])
            async with agent_for(api, root, None, token=token, socket_mode=0o660) as agent:
                yield Node(api, agent, entries, agent_id)


async def test_a_caller_gets_the_identities_whose_selectors_it_matches(node: Node) -> None:
    with WorkloadApiClient(f"unix://{node.agent.config.socket}") as client:
        svids = await asyncio.to_thread(client.fetch_x509_svids, 10)
    assert sorted(str(s.spiffe_id) for s in svids) == sorted([str(WEB), str(TOOL)])
    async with grpc.aio.insecure_channel(f"unix:{node.agent.config.socket}") as channel:
        (secret,) = await fetch(channel, [str(TOOL)])
        assert secret.tls_certificate.private_key.inline_bytes
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await fetch(channel, [str(DB)])  # an entry exists, but not for this caller
    assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED


async def test_a_second_uid_is_refused_by_the_selectors(node: Node) -> None:
    script = SECOND_UID.format(uid=NOBODY, socket=node.agent.config.socket)
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("refused:"), result.stdout
    assert "PERMISSION_DENIED" in result.stdout or "no registration entry" in result.stdout
    # An entry for that uid (and its gid) lets it in, once the agent has polled.
    node.entries.create(DB, node.agent_id, [f"unix:uid:{NOBODY}", "unix:gid:0"])
    await node.agent.poll_once()
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.stdout.strip() == str(DB), result.stdout + result.stderr


def test_entry_commands(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    data = str(tmp_path)
    agent = "spiffe://cluster.local/meshca/agent/join_token/0123456789abcdef"
    argv = ["entry", "create", "--data-dir", data, "--identity", str(WEB), "--node", agent]
    assert main([*argv, "--selector", "unix:uid:1000", "--selector", "unix:path:/usr/bin/app"]) == 0
    entry_id = capsys.readouterr().out.strip()
    assert main(["entry", "list", "--data-dir", data]) == 0
    listing = capsys.readouterr().out
    assert (
        entry_id in listing and "unix:uid:1000" in listing and "unix:path:/usr/bin/app" in listing
    )
    assert (tmp_path / "agents" / "entries.json").stat().st_mode & 0o777 == 0o600
    for bad, needle in (
        (["--selector", "unix:uid:x"], "number"),
        (["--selector", "k8s:ns:default"], "unix:uid"),
        (["--selector", "unix:path:relative"], "absolute"),
    ):
        assert main([*argv, *bad]) == 1
        assert needle in capsys.readouterr().err
    assert (
        main(
            [
                "entry",
                "create",
                "--data-dir",
                data,
                "--identity",
                str(WEB),
                "--node",
                str(WEB),
                "--selector",
                "unix:uid:1",
            ]
        )
        == 1
    )
    assert "not an agent ID" in capsys.readouterr().err
    assert main(["entry", "delete", "--data-dir", data, entry_id]) == 0
    capsys.readouterr()
    assert main(["entry", "list", "--data-dir", data]) == 0
    assert capsys.readouterr().out == ""
