"""A proxy that refuses (NACKs) a root rotation's change never traps the operator: the
wait ends naming it, ``--force-unacked`` goes on without it (logged), and a rollback is
never held up by it. Driven through the real ``meshca ca`` command and the admin socket
of a manager serving real SDS streams."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from meshca.rotation.admin import AdminServer, CaOperations
from tests.sds_harness import wait_until
from tests.test_root_rotation import Mesh, cli, mesh, roots_of

LONG = "30s"  # longer than any of these tests may take: a wait must end for another reason


@asynccontextmanager
async def served(root: Path) -> AsyncIterator[Mesh]:
    async with mesh(root) as m:
        admin = AdminServer(CaOperations(m.manager, m.rotation), root / "data" / "admin.sock")
        await admin.start()
        try:
            yield m
        finally:
            await admin.close()


async def status(root: Path) -> dict[str, object]:
    code, out, err = await cli(root, "ca", "status", "--json")
    assert code == 0, err
    result: dict[str, object] = json.loads(out)
    return result


async def test_a_refusing_proxy_is_named_and_can_be_gone_on_without(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with served(tmp_path) as m:
        m.b.refusing = True
        code, out, err = await cli(tmp_path, "ca", "rotate-root", "--step", "1")
        assert code == 0, err
        await wait_until(lambda: m.b.nacked > 0, what="node-b's NACK of the new bundle")

        # The wait ends (well before its timeout), naming the proxy that refuses.
        code, out, err = await cli(tmp_path, "ca", "rotate-root", "--step", "2", "--timeout", LONG)
        assert code == 1
        assert "node-b" in err and "refused" in err and "node-a" not in err
        assert "--force-unacked" in err and err.count("\n") == 1
        now = await status(tmp_path)
        rotation = now["root_rotation"]
        assert isinstance(rotation, dict) and rotation["done"] == 1  # held, not moved on
        assert now["connected_count"] == 2 and now["waiting_count"] == 1

        # The operator goes on without it; the log says who was left behind.
        caplog.set_level(logging.WARNING, logger="meshca.rotation")
        code, out, err = await cli(
            tmp_path, "ca", "rotate-root", "--step", "2", "--timeout", LONG, "--force-unacked"
        )
        assert code == 0, err
        assert "went on without 1: node-b" in out
        assert any(
            "--force-unacked" in r.getMessage() and "node-b" in r.getMessage()
            for r in caplog.records
            if r.levelno == logging.WARNING
        )
        rotation = (await status(tmp_path))["root_rotation"]
        assert isinstance(rotation, dict) and rotation["done"] == 2


async def test_a_proxy_that_does_not_answer_is_gone_on_without_only_when_asked(
    tmp_path: Path,
) -> None:
    async with served(tmp_path) as m:
        m.b.holding = True  # never ACKs, never NACKs: only the timeout ends the wait
        assert (await cli(tmp_path, "ca", "rotate-root", "--step", "1"))[0] == 0
        code, out, err = await cli(tmp_path, "ca", "rotate-root", "--step", "2", "--timeout", "1s")
        assert code == 1 and "timed out after 1s" in err and "node-b" in err
        code, out, err = await cli(
            tmp_path, "ca", "rotate-root", "--step", "2", "--timeout", "1s", "--force-unacked"
        )
        assert code == 0, err
        assert "went on without 1: node-b" in out


@pytest.mark.parametrize("after_step", [1, 4])
async def test_a_refusing_proxy_never_blocks_a_rollback(tmp_path: Path, after_step: int) -> None:
    """After step 1 nothing was signed under the new root, so there is nothing to wait
    for; after step 4 node-b refuses its certificate back under the old root."""
    async with served(tmp_path) as m:
        m.b.refusing = after_step == 1  # refuses the new bundle
        for step in range(1, after_step + 1):
            code, out, err = await cli(tmp_path, "ca", "rotate-root", "--step", str(step))
            assert code == 0, err
        if after_step == 1:
            await wait_until(lambda: m.b.nacked > 0, what="node-b's NACK of the new bundle")
        m.b.refusing = True  # refuses whatever comes next
        code, out, err = await cli(tmp_path, "ca", "rotate-root", "--rollback", "--timeout", LONG)
        assert code == 0, err
        if after_step == 1:
            assert "no new root" not in out and "the new root left the trust bundle" in out
        else:
            assert "node-b" in out  # named as gone on without
        assert (await status(tmp_path))["root_rotation"] is None
        assert list(m.store.bundle()) == [m.old_root]
        await wait_until(lambda: roots_of(m.a) == [m.old_root], what="node-a's bundle")
