"""Soak: repeated CA and root rotations, and kill -9 of meshca mid-rotation, under load.

Not a test: it runs for minutes and prints figures. A real ``meshca serve`` serves two
real Envoys (every request through them is a new mTLS handshake); a client sends
requests the whole time. Each cycle: leaf renewals, a signing-CA rotation, then a root
rotation in one command; every second cycle meshca is killed with SIGKILL while that
root rotation is running, restarted, and the rotation resumes by itself.

    python bench/soak_rotation.py [--cycles 10] [--leaf-ttl 4s] [--smoke]

The last line is one JSON object with the figures; any failed request is a failure
of the soak (exit status 1).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshca.rotation.journal import JournalStore
from tests.envoy_harness import eventually
from tests.rotation_envoy_harness import MESHCA, REPO, RotationMesh, rotation_mesh


def renewals(mesh: RotationMesh, count: int) -> None:
    for _ in range(count):
        before = [envoy.serials() for envoy in mesh.envoys]
        eventually(
            lambda before=before: all(
                not (envoy.serials() & seen)
                for envoy, seen in zip(mesh.envoys, before, strict=True)
            ),
            "renewed certificates",
            60,
        )


def checked(result: subprocess.CompletedProcess[str]) -> None:
    if result.returncode != 0:
        raise RuntimeError(result.stderr)


def rotate_root_with_a_crash(mesh: RotationMesh) -> dict[str, float | bool]:
    """Start a one-command root rotation, SIGKILL meshca while it runs, restart, and wait
    for the resumed rotation to finish. Returns what happened."""
    journals = JournalStore(mesh.data_dir)
    command = subprocess.Popen(
        [*MESHCA, "ca", "rotate-root", "--timeout", "120s", "--data-dir", str(mesh.data_dir)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    landed = False
    deadline = time.monotonic() + 60
    while command.poll() is None and time.monotonic() < deadline:
        journal = journals.load()
        state = journal.root_rotation if journal else None
        if state is not None and state.running in (2, 3, 4):
            mesh.kill9()
            landed = True
            break
        time.sleep(0.002)
    command.wait(timeout=60)
    if not landed:
        return {"killed_mid_rotation": False, "resume_seconds": 0.0}
    restarted = time.monotonic()
    mesh.restart()
    eventually(lambda: mesh.status()["root_rotation"] is None, "the resumed rotation", 180)
    return {"killed_mid_rotation": True, "resume_seconds": time.monotonic() - restarted}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--leaf-ttl", default="4s")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="one cycle without renewal waits: checks that the soak runs (make test does)",
    )
    args = parser.parse_args()
    if args.smoke:
        args.cycles = 1
    waited_renewals = 0 if args.smoke else 2
    figures: dict[str, object] = {}
    root_rotation_seconds: list[float] = []
    resumes: list[float] = []
    missed = 0
    started = time.monotonic()
    with rotation_mesh(leaf_ttl=args.leaf_ttl, interval=0.005) as (mesh, load):
        for cycle in range(args.cycles):
            renewals(mesh, waited_renewals)
            checked(mesh.ca("rotate"))
            if cycle % 2:
                outcome = rotate_root_with_a_crash(mesh)
                if outcome["killed_mid_rotation"]:
                    resumes.append(float(outcome["resume_seconds"]))
                else:
                    missed += 1
            else:
                begun = time.monotonic()
                checked(mesh.ca("rotate-root", "--timeout", "120s"))
                root_rotation_seconds.append(time.monotonic() - begun)
            roots = mesh.bundle()
            if len(roots) != 1:
                raise RuntimeError(f"cycle {cycle}: the bundle holds {len(roots)} roots")
            eventually(
                lambda roots=roots: (
                    mesh.trusted_serials() == [{roots[0].serial_number}] * len(mesh.envoys)
                ),
                "Envoys trusting only the newest root",
                60,
            )
            print(
                f"cycle {cycle + 1}/{args.cycles}: {load.total} requests, {load.failed} failed",
                flush=True,
            )
        renewals(mesh, min(1, waited_renewals))
        load.stop()
        figures = {
            "cycles": args.cycles,
            "leaf_ttl": args.leaf_ttl,
            "seconds": round(time.monotonic() - started, 1),
            "requests": load.total,
            "failed": load.failed,
            "root_rotations": args.cycles,
            "signing_ca_rotations": args.cycles,
            "kills_mid_rotation": len(resumes),
            "kills_missed": missed,
            "root_rotation_seconds_max": round(max(root_rotation_seconds, default=0.0), 2),
            "resume_to_done_seconds_max": round(max(resumes, default=0.0), 1),
            "failures": load.failures,
        }
    print(json.dumps(figures))
    return 0 if figures.get("failed") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
