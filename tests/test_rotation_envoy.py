"""CA and root rotation with real Envoys under continuous load: not one request fails.

A real ``meshca serve`` (leaf TTL 20 s, so certificates renew about every 10 seconds)
serves two real Envoys; requests flow buyer -> mTLS -> web -> app for the whole test.
In order: renewals, a signing-CA rotation, a full root rotation in one command, then a
second root rotation run step by step with ``kill -9`` of meshca between steps 3 and 4
and a restart. At the end every Envoy trusts only the newest root, the old ones are
gone from the bundle, and every served certificate chains to the newest root.
"""

from __future__ import annotations

import pytest

from meshca.rotation.journal import JournalStore
from tests.envoy_harness import eventually
from tests.rotation_envoy_harness import rotation_mesh

pytestmark = [pytest.mark.envoy, pytest.mark.timeout(150)]

# Short enough for several renewals in each phase, long enough to outlast the crash: when
# meshca is killed, the certificate an Envoy holds may have only 45 % of its life left
# (renewal is at 50 % +/- 5 %), less up to a second of NotAfter truncation. That must
# cover meshca's restart and Envoy's SDS reconnect backoff on a busy machine (3.2 s and
# 2.3 s more at a load average of 40); with a 4 s TTL that was under 2 s, and requests
# failed with expired certificates while meshca was down.
LEAF_TTL = "20s"


def test_rotations_and_a_crash_under_load_fail_no_request() -> None:
    with rotation_mesh(leaf_ttl=LEAF_TTL) as (mesh, load):
        web, buyer = mesh.envoys
        [first_root] = mesh.bundle()

        # Several renewals reach both Envoys.
        for _ in range(2):
            before = [web.serials(), buyer.serials()]
            eventually(
                lambda before=before: (
                    not (web.serials() & before[0]) and not (buyer.serials() & before[1])
                ),
                "renewed certificates in both Envoys",
                30,
            )

        # A signing-CA rotation: same root, new intermediate, every SVID re-issued.
        result = mesh.ca("rotate")
        assert result.returncode == 0, result.stderr
        status = mesh.status()
        assert [s["id"] for s in status["slots"] if s["status"] == "active"] == ["ca-0002"]
        assert mesh.bundle() == [first_root]

        # A full root rotation in one command, driven by the Envoys' ACKs.
        result = mesh.ca("rotate-root", "--timeout", "60s")
        assert result.returncode == 0, result.stderr
        assert "the rotation is complete" in result.stdout
        [second_root] = mesh.bundle()
        assert second_root != first_root
        assert mesh.trusted_serials() == [{second_root.serial_number}] * 2

        # Another root rotation, step by step, with kill -9 of meshca after step 3.
        for step in ("1", "2", "3"):
            result = mesh.ca("rotate-root", "--step", step, "--timeout", "60s")
            assert result.returncode == 0, result.stderr
        assert len(mesh.bundle()) == 2
        mesh.kill9()
        journal = JournalStore(mesh.data_dir).load()
        assert journal is not None and journal.root_rotation is not None
        assert journal.root_rotation.done == 3
        mesh.restart()
        status = mesh.status()
        assert status["root_rotation"]["done"] == 3  # resumed exactly where it was
        # Envoy opens one SDS stream per secret and retries each with its own backoff:
        # both Envoys back (by name) is not yet both identities' certificate streams.
        eventually(
            lambda: (
                len((now := mesh.status())["connected"]) == 2
                and sum(root["served_under"] for root in now["bundle"]) == 2
            ),
            "both Envoys and both identities reconnected",
            60,
        )
        result = mesh.ca("rotate-root", "--timeout", "60s")
        assert result.returncode == 0, result.stderr
        [third_root] = mesh.bundle()
        assert third_root not in (first_root, second_root)
        eventually(
            lambda: mesh.trusted_serials() == [{third_root.serial_number}] * 2,
            "both Envoys trusting only the newest root",
            30,
        )
        status = mesh.status()
        assert status["root_rotation"] is None
        [root] = status["bundle"]
        assert root["served_under"] >= 2  # web and buyer (and nothing else) chain to it
        assert len(status["slots"]) == 1
        served = load.total
        eventually(lambda: load.total > served + 20, "requests after the last rotation", 30)
    assert load.failed == 0, f"{load.failed} of {load.total} failed: {load.failures}"
    assert load.total > 200
