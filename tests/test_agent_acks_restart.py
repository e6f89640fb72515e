"""What agents acknowledged survives a restart of ``meshca serve``
(``<data-dir>/agents/sightings.json``): a step an agent ACKed before the restart goes on
after it without the agent polling again, a saved ACK never counts for a key or root
added later, the file is written coalesced (not per poll) and 0600, and a damaged file
is one log line and everyone counts as unseen, never a crash."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import stat
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from meshca.ca_api import sightings_file
from meshca.ca_api.sightings import AgentSightings, Sighting, root_sha256
from meshca.ca_api.sightings_file import SightingsFileError, load, save, sightings_path
from meshca.cli.main import main
from meshca.rotation.jwt_keys import JwtKeyUnacked
from meshca.rotation.root import AckTimeout
from meshca.serve.server import MeshcaServer
from meshca.serve.sightings_saver import SightingsSaver
from meshca.spiffe import SpiffeId
from tests.ca_api_harness import CaApi, agent_for, ca_api
from tests.ca_factory import make_ca
from tests.cli_harness import assert_one_line_error
from tests.serve_harness import TD, default_config, kube_id, served, short_tempdir

WEB = kube_id("shop", "web")
SHORT = timedelta(seconds=0.5)
AGENT = SpiffeId.for_agent(TD, "join_token", "a1")


@contextlib.asynccontextmanager
async def restarted(root: Path) -> AsyncIterator[MeshcaServer]:
    """``meshca serve`` again on the same data directory (the agents are not running; no
    proxy is expected to reconnect)."""
    config = default_config(
        root, attest_listen=("127.0.0.1", 0), rotation_resume_grace=timedelta(0)
    )
    async with served(config) as server:
        yield server


async def acked_then_stopped(api: CaApi, root: Path) -> str:
    """An agent that fetched and acknowledged the current key set and bundle, then
    stopped; its agent ID."""
    async with agent_for(api, root, WEB) as agent:
        await agent.poll_once()
        await agent.poll_once()  # reports the key set the first poll fetched
        assert agent.credential.svid is not None
        return str(agent.credential.svid.spiffe_id)


async def test_a_jwt_key_acknowledged_before_a_restart_activates_after_it() -> None:
    with short_tempdir() as root:
        async with ca_api(root) as api:
            assert api.server.rotation is not None
            prepared = await api.server.rotation.operations.jwt_key("prepare")
            agent_id = await acked_then_stopped(api, root)
        async with restarted(root) as server:
            assert server.rotation is not None
            operations = server.rotation.operations
            # No poll since the restart: the saved ACK is enough.
            result = await operations.jwt_key("activate", timeout=SHORT)
            assert result["kid"] == prepared["kid"]
            # A key prepared after the agent's last ACK is not in what it acknowledged.
            await operations.jwt_key("prepare")
            with pytest.raises(JwtKeyUnacked) as refused:
                await operations.jwt_key("activate", timeout=SHORT)
            assert refused.value.waiting == [f"agent {agent_id}"]


async def test_a_root_acknowledged_before_a_restart_lets_step_2_go_on() -> None:
    with short_tempdir() as root:
        async with ca_api(root) as api:
            assert api.server.rotation is not None
            await api.server.rotation.rotation.step(1)
            await acked_then_stopped(api, root)
        async with restarted(root) as server:
            assert server.rotation is not None
            rotation = server.rotation.rotation
            report = await rotation.step(2, timeout=timedelta(seconds=5))
            assert "went on without" not in report.detail
            # Step 4 wants the agent's SVID under the new root: not ACKed before the
            # restart, so the saved sighting does not count for it.
            await rotation.step(3)
            with pytest.raises(AckTimeout) as held:
                await rotation.step(4, timeout=SHORT)
            assert any("agent spiffe://" in name for name in held.value.waiting)


async def test_a_damaged_file_is_one_log_line_and_everyone_is_unseen(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with short_tempdir() as root:
        async with ca_api(root) as api:
            assert api.server.rotation is not None
            await api.server.rotation.operations.jwt_key("prepare")
            agent_id = await acked_then_stopped(api, root)
        path = sightings_path(root / "data")
        path.write_text('{"format": 1, "roots": {}, "agents": {"spiffe://x/y": 3')
        caplog.set_level(logging.INFO)
        async with restarted(root) as server:
            assert server.rotation is not None
            with pytest.raises(JwtKeyUnacked) as refused:
                await server.rotation.operations.jwt_key("activate", timeout=SHORT)
            assert refused.value.waiting == [f"agent {agent_id} (no ACK on record)"]
        lines = [r for r in caplog.records if str(path) in r.getMessage()]
        assert len(lines) == 1 and "not restored" in lines[0].getMessage()
        assert "Traceback" not in caplog.text


def test_the_file_is_private_and_refuses_what_it_did_not_write(tmp_path: Path) -> None:
    path = sightings_path(tmp_path)
    sightings = AgentSightings()
    ca = make_ca(trust_domain=TD)
    sightings.called(AGENT, ca.signer.certificate)
    other = make_ca(trust_domain=TD).bundle.roots[0]  # a root meshca does not publish
    sightings.held_roots(AGENT, [root_sha256(other), *map(root_sha256, ca.bundle)], ca.bundle)
    sightings.held_jwt(AGENT, ["k1", "k2", "forged"], ["k1", "k2", "k3"])
    save(path, sightings.snapshot())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    loaded = load(path, TD)[str(AGENT)]
    assert loaded.jwt_kids == frozenset({"k1", "k2"})  # only keys meshca publishes
    assert loaded.presented == ca.signer.certificate and loaded.bundle == ca.bundle
    assert loaded.bundle is not None and other not in loaded.bundle  # nor roots
    # A report is read up to 64 key ids: one named after thousands of others is not held.
    sightings.held_jwt(AGENT, [f"x{i}" for i in range(5000)] + ["k3"], ["k1", "k2", "k3"])
    held = sightings.get(str(AGENT))
    assert held is not None and held.jwt_kids == frozenset()
    # Likewise 64 root fingerprints: the real one after 5,000 others is not held.
    forged = [bytes([i % 256, i // 256]) * 16 for i in range(5000)]
    sightings.held_roots(AGENT, [*forged, *map(root_sha256, ca.bundle)], ca.bundle)
    held = sightings.get(str(AGENT))
    assert held is not None and held.bundle is not None and len(held.bundle) == 0
    document = json.loads(path.read_text())
    # A file from a server that noted the bundle it *sent* ("bundle"): no ACK, not read.
    older = json.loads(json.dumps(document))
    older["agents"][str(AGENT)]["bundle"] = older["agents"][str(AGENT)].pop("held_roots")
    path.write_text(json.dumps(older))
    assert load(path, TD)[str(AGENT)].bundle is None
    entry = str(AGENT)
    for damage in (
        lambda d: d.update(format=2),
        lambda d: d["agents"].update({"spiffe://cluster.local/ns/a/sa/b": {"last_call": 1}}),
        lambda d: d["roots"].update({"00": d["agents"][entry]["presented"]}),
        lambda d: d["agents"][entry].update(held_roots=["ff" * 32]),
        lambda d: d["agents"][entry].update(jwt_kids=["k"] * 65),
        lambda d: d["agents"][entry].update(presented="not base64!"),
    ):
        damaged = json.loads(json.dumps(document))
        damage(damaged)
        path.write_text(json.dumps(damaged))
        with pytest.raises(SightingsFileError, match="damaged"):
            load(path, TD)


async def test_polls_are_saved_coalesced_and_acks_at_once(tmp_path: Path) -> None:
    path = sightings_path(tmp_path)
    sightings = AgentSightings()
    saver = SightingsSaver(sightings, path, idle_interval=3600)
    cert = make_ca(trust_domain=TD).signer.certificate
    sightings.called(AGENT, cert)
    await saver.save_if_changed()
    first = path.stat().st_ino
    for _ in range(50):  # polls that acknowledge nothing new: not written again
        sightings.called(AGENT, cert)
        await saver.save_if_changed()
    assert path.stat().st_ino == first
    sightings.held_jwt(AGENT, ["k1"], ["k1"])  # an ACK: written
    await saver.save_if_changed()
    assert path.stat().st_ino != first
    assert load(path, TD)[str(AGENT)].jwt_kids == frozenset({"k1"})
    second = path.stat().st_ino
    sightings.called(AGENT, cert)
    await saver.close()  # the last call's time is saved on the way out
    assert path.stat().st_ino != second


async def test_with_no_server_running_the_saved_acks_decide_at_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with short_tempdir() as root:
        async with ca_api(root) as api:
            assert api.server.rotation is not None
            await api.server.rotation.operations.jwt_key("prepare")
            agent_id = await acked_then_stopped(api, root)
        args = ["--data-dir", str(root / "data")]
        assert (
            await asyncio.to_thread(main, ["ca", "jwt-key", "activate", *args]) == 0
        )  # it held the key
        assert await asyncio.to_thread(main, ["ca", "jwt-key", "prepare", *args]) == 0
        capsys.readouterr()
        # Nobody can poll a stopped server: refused at once, not after --timeout (5m).
        assert await asyncio.to_thread(main, ["ca", "jwt-key", "activate", *args]) == 1
        captured = capsys.readouterr()
        assert_one_line_error(captured.err, agent_id)
        assert (
            await asyncio.to_thread(main, ["ca", "jwt-key", "activate", "--force-unacked", *args])
            == 0
        )


def test_the_file_keeps_the_most_recent_callers_within_its_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sightings_file, "MAX_AGENTS", 2)
    cert = make_ca(trust_domain=TD).signer.certificate
    saved = {
        str(SpiffeId.for_agent(TD, "join_token", name)): Sighting(when, cert)
        for name, when in (("old", 1.0), ("newer", 2.0), ("newest", 3.0))
    }
    path = sightings_path(tmp_path)
    save(path, saved)
    assert {key.rsplit("/", 1)[1] for key in load(path, TD)} == {"newer", "newest"}
    document = json.loads(path.read_text())
    document["agents"][str(SpiffeId.for_agent(TD, "join_token", "old"))] = {"last_call": 1}
    path.write_text(json.dumps(document))
    with pytest.raises(SightingsFileError, match="more than"):
        load(path, TD)
    monkeypatch.setattr(sightings_file, "MAX_BYTES", 100)
    with pytest.raises(SightingsFileError, match="larger than 100 bytes"):
        load(path, TD)
