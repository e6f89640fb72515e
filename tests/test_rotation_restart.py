"""A restart in the middle of a root rotation: the proxies connected before it are
recorded beside the journal, and the next step waits for those proxies themselves
(until they are back and have acknowledged, within the operator's timeout), not for a
fixed reconnect grace. Driven through ``meshca ca`` and the admin socket of the
rotation service a server runs, with real SDS streams."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

from meshca.rotation.local_ca import LocalCaSource
from meshca.serve.engine_acks import EngineAcks
from meshca.serve.rotation import RotationService
from tests.rotation_harness import TD, Proxy, chain_root
from tests.sds_harness import k8s, wait_until
from tests.test_root_rotation import Mesh, cli, mesh


def service(m: Mesh, data_dir: Path) -> RotationService:
    """The rotation service of a (re)started server, over the same live SDS streams."""
    started = RotationService(
        data_dir,
        m.harness.issuer.authority,  # type: ignore[arg-type]
        m.store,
        acks=EngineAcks(m.harness.servicer.engine, m.store),
        source=LocalCaSource(data_dir, TD),
        ack_timeout=timedelta(seconds=30),
        resume_grace=0.0,  # no fixed grace: only the record can make a step wait
    )
    started.open(timedelta(hours=1))
    return started


def recorded(data_dir: Path) -> dict[str, int]:
    try:
        proxies: dict[str, int] = json.loads((data_dir / "rotation" / "proxies.json").read_text())[
            "proxies"
        ]
    except (OSError, ValueError):
        return {}
    return proxies


async def test_after_a_restart_the_next_step_waits_for_the_recorded_proxies(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    async with mesh(tmp_path) as m:
        m.manager.close()  # the server's rotation service takes the journal
        # node-b has a second stream (Envoy opens one per secret); its next two streams are
        # made while the server's certificate is under the old root.
        second_stream = await Proxy(m.harness, k8s("shop", "db"), "node-b").start()
        back = Proxy(m.harness, k8s("shop", "db"), "node-b")
        back_too = Proxy(m.harness, k8s("shop", "db"), "node-b")
        first = service(m, data_dir)
        await first.start()
        try:
            for step in ("1", "2", "3"):
                code, _, err = await cli(tmp_path, "ca", "rotate-root", "--step", step)
                assert code == 0, err
            await wait_until(
                lambda: (
                    sorted((k.split()[0], n) for k, n in recorded(data_dir).items())
                    == [("node-a", 1), ("node-b", 2)]
                ),
                what="both proxies and their streams recorded",
            )
        finally:
            await first.close()  # the server stops in the middle of the rotation
        await m.b.stop()  # node-b is not back yet when the server is
        await second_stream.stop()
        engine = m.harness.servicer.engine  # a restarted server starts with no streams
        await wait_until(
            lambda: not any(s.node_id == "node-b" for s in engine.streams()),
            what="node-b's streams gone",
        )

        second = service(m, data_dir)
        await second.start()
        try:
            code, _, err = await cli(
                tmp_path, "ca", "rotate-root", "--step", "4", "--timeout", "1s"
            )
            assert code == 1
            assert "node-b" in err and "not reconnected since the restart" in err
            code, out, err = await cli(tmp_path, "ca", "status", "--json")
            assert code == 0, err
            waiting = json.loads(out)["waiting_on"]
            assert [w for w in waiting if "node-b" in w and "not reconnected" in w]

            await back.start()  # one of node-b's streams is back, and ACKs
            await wait_until(lambda: "default" in back.acked, what="node-b's first ACK")
            code, _, err = await cli(
                tmp_path, "ca", "rotate-root", "--step", "4", "--timeout", "1s"
            )
            assert code == 1 and "node-b" in err and "1 of 2 streams" in err

            await back_too.start()  # both are back
            code, out, err = await cli(tmp_path, "ca", "rotate-root", "--step", "4")
            assert code == 0, err
            assert "went on without" not in out
            new_root = second.manager.active.root
            assert chain_root(back.chain(), m.store.bundle()) == new_root
            code, _, err = await cli(tmp_path, "ca", "rotate-root", "--step", "5")
            assert code == 0, err
            await wait_until(lambda: not recorded(data_dir), what="the record removed")
        finally:
            await back.stop()
            await back_too.stop()
            await second.close()
