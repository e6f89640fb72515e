"""The bookstore through the command line only: a real ``meshca serve --mesh`` process and
real Envoys whose bootstraps come from ``meshca bootstrap --ads`` (nothing else), driven
by the example ``examples/bookstore/run.py``.

mTLS on every hop with the caller's SPIFFE ID, the 50/50 split, RBAC refusing
bookthief at bookwarehouse, and an edit of the mesh file that running Envoys follow
without a restart. The example's mesh file is copied with free ports in place of its
fixed ones, so it can be edited and cannot collide with anything else listening.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.envoy_harness import bookstore_mesh_copy, http_get, reserve_base_ids

pytestmark = pytest.mark.timeout(120)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "bookstore"
BOOKBUYER = "spiffe://cluster.local/ns/bookbuyer/sa/bookbuyer"
BOOKTHIEF = "spiffe://cluster.local/ns/bookthief/sa/bookthief"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bookstore_example", EXAMPLE / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


example = load_example()


@pytest.fixture(scope="module")
def bookstore(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    root = tmp_path_factory.mktemp("bookstore-cli")
    base_id = reserve_base_ids(len(example.PROXIES))
    mesh = bookstore_mesh_copy(root)
    with example.Bookstore(mesh, root / "run", base_id=base_id, say=lambda _: None) as running:
        example.wait_for(
            lambda: running.via("bookbuyer", "bookstore")[0] == 200, "bookbuyer -> bookstore"
        )
        yield running
        for name, process in running.envoys.items():
            assert process.poll() is None, f"{name}'s Envoy exited"
    assert running.meshca_returncode == 0, "meshca serve did not stop cleanly on SIGTERM"


def rejected_updates(bookstore: Any, name: str) -> dict[str, int]:
    """Envoy's own count of xDS updates it rejected (NACKed), by subscription."""
    port = bookstore.admin_ports[name]
    status, body = http_get(port, "/stats?filter=update_rejected")
    assert status == 200, body
    found = {}
    for line in body.splitlines():
        key, _, value = line.partition(": ")
        found[key] = int(value)
    return found


def test_each_hop_is_mtls_and_tells_the_app_its_callers_spiffe_id(bookstore: Any) -> None:
    purchase = example.wait_for(
        lambda: (p := bookstore.buy()).get("restock", {}).get("app") and p,
        "a purchase that restocks from bookwarehouse",
    )
    assert purchase["app"] in ("bookstore-v1", "bookstore-v2")
    assert purchase["caller"] == BOOKBUYER
    store_id = bookstore.identities[purchase["app"]]
    assert purchase["restock"] == {"app": "bookwarehouse", "caller": store_id}


def test_both_bookstore_versions_receive_requests(bookstore: Any) -> None:
    seen = Counter(bookstore.buy()["app"] for _ in range(40))
    assert set(seen) == {"bookstore-v1", "bookstore-v2"}, seen


def test_bookthief_is_refused_by_bookwarehouse(bookstore: Any) -> None:
    assert bookstore.via("bookthief", "bookstore")[0] == 200  # browsing is allowed
    assert bookstore.via("bookthief", "bookwarehouse")[0] == 404  # no route in its config
    before = len(bookstore.apps["bookwarehouse"].callers)
    assert bookstore.direct("bookthief", "bookwarehouse") == 403  # RBAC, own certificate
    assert len(bookstore.apps["bookwarehouse"].callers) == before
    assert bookstore.direct("bookstore-v1", "bookwarehouse") == 200  # the same path, allowed


def test_the_walkthrough_says_what_the_mesh_did(
    bookstore: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    assert example.walkthrough(bookstore, 20) is True
    out = capsys.readouterr().out
    assert f"bookbuyer     -> bookstore-v1   caller {BOOKBUYER}" in out
    assert "HTTP 403 (refused by bookwarehouse's RBAC)" in out


def test_a_policy_edit_reaches_running_envoys(bookstore: Any) -> None:
    pids = bookstore.pids()

    def admit_bookthief(document: dict[str, Any]) -> None:
        policy = next(
            p for p in document["access"]["policies"] if p["service"].endswith("/bookwarehouse")
        )
        policy["from"].append("bookthief/bookthief")

    original = bookstore.mesh.read_text()
    bookstore.edit_mesh(admit_bookthief)
    try:
        # bookwarehouse's RBAC admits it now, and bookthief's own proxy routes there
        example.wait_for(
            lambda: bookstore.direct("bookthief", "bookwarehouse") == 200, "RBAC admits bookthief"
        )
        _, body = example.wait_for(
            lambda: (r := bookstore.via("bookthief", "bookwarehouse"))[0] == 200 and r,
            "bookthief's proxy routes to bookwarehouse",
        )
        assert json.loads(body) == {"app": "bookwarehouse", "caller": BOOKTHIEF}
    finally:
        bookstore.write_mesh(original)
    example.wait_for(
        lambda: bookstore.direct("bookthief", "bookwarehouse") == 403, "RBAC refuses again"
    )
    assert bookstore.pids() == pids
    assert all(process.poll() is None for process in bookstore.envoys.values())
    for name in bookstore.envoys:
        rejected = rejected_updates(bookstore, name)
        assert rejected and not any(rejected.values()), (name, rejected)
