"""What a workload change costs the ADS side: regenerating every proxy's snapshot against
keeping those of the proxies the change does not reach, in the same run.

Run: ``.venv/bin/python bench/ads_change.py [--services 1000] [--replicas 10] [--proxies 1000]``

``bench/xds_scale.py``'s synthetic mesh (one identity per service, an AccessPolicy per
service admitting ``--callers`` others); one snapshot per proxy (``--proxies`` identities)
with every generated type built, as the ADS streams hold them. Then one service gains an
endpoint (a new mesh, its index built untimed: both sides need it), and each proxy's
snapshot is asked for again:

  full_s          every snapshot regenerated (what a new mesh cost before
                  ``meshca/envoy/delta.py``: a fresh ``ProxySnapshots``)
  incremental_s   ``ProxySnapshots.forget_stale`` (the delta and the kept snapshots)
                  and the proxies it reports affected, regenerated
  affected        how many proxies that is; ratio_full_vs_incremental
Each side is the median of ``--rounds``. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from xds_scale import synthetic_mesh

from meshca.envoy.mesh import Mesh, parse_mesh
from meshca.serve.ads import ProxyKey, ProxySnapshots
from meshca.spiffe import TrustDomain
from meshca.xds.resources import GENERATED_TYPES

TD = TrustDomain("cluster.local")


def _serve_all(snapshots: ProxySnapshots, keys: list[ProxyKey]) -> None:
    for key in keys:
        generated = snapshots._current(key)
        for type_url in GENERATED_TYPES:
            generated.of_type(type_url)


def _copy(mesh: Mesh) -> Mesh:
    """The same mesh, its index built (untimed), nothing generated from it yet."""
    return mesh.with_policy(mesh.traffic_splits, mesh.policies)


def _one_round(before: Mesh, after: Mesh, keys: list[ProxyKey]) -> tuple[float, float, int]:
    current = [_copy(before)]
    snapshots = ProxySnapshots(lambda: current[0])
    _serve_all(snapshots, keys)
    current[0] = _copy(after)
    started = time.perf_counter()
    affected = snapshots.forget_stale()
    assert affected is not None, "an endpoints-only change must be incremental"
    touched = [key for key in keys if affected(key)]
    _serve_all(snapshots, touched)
    incremental = time.perf_counter() - started
    current[0] = _copy(after)
    fresh = ProxySnapshots(lambda: current[0])
    started = time.perf_counter()
    _serve_all(fresh, keys)
    full = time.perf_counter() - started
    return full, incremental, len(touched)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--replicas", type=int, default=10)
    parser.add_argument("--callers", type=int, default=5)
    parser.add_argument("--proxies", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny counts: checks that it runs")
    args = parser.parse_args()
    if args.smoke:
        args.services, args.replicas, args.callers, args.proxies, args.rounds = 6, 2, 2, 6, 1
    document: Any = synthetic_mesh(args.services, args.replicas, args.callers)
    document["traffic_splits"] = []
    before = parse_mesh(document, TD)
    changed = copy.deepcopy(document)
    extra = dict(changed["workloads"][0], name="extra", address="10.250.0.1")
    changed["workloads"].append(extra)
    after = parse_mesh(changed, TD)
    for mesh in (before, after):
        mesh.service("-", "-")  # builds the mesh's index, untimed
    seen: dict[Any, str] = {}
    for workload in before.workloads:
        seen.setdefault(before.identity_of(workload), workload.key)
    keys: list[ProxyKey] = [(i, "intercept", None, None) for i in list(seen)[: args.proxies]]
    rounds = [_one_round(before, after, keys) for _ in range(args.rounds)]
    full = statistics.median(r[0] for r in rounds)
    incremental = statistics.median(r[1] for r in rounds)
    figures = {
        "services": args.services,
        "workloads": len(before.workloads),
        "proxies": len(keys),
        "affected": rounds[0][2],
        "full_s": round(full, 4),
        "incremental_s": round(incremental, 4),
        "ratio_full_vs_incremental": round(full / max(incremental, 1e-9), 1),
        "load_average": round(os.getloadavg()[0], 1),
    }
    for key, value in figures.items():
        print(f"{key:28} {value}")
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main()
