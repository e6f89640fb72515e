"""CLI start-up: ``meshca issue``, ``inspect`` and ``bundle`` as whole processes, as ratios
of ``python -c pass`` measured in the same run.

Run: ``.venv/bin/python bench/cli_startup.py [--runs 20]``

Each command runs ``--runs`` times, interleaved with the baseline so load on the machine
hits both alike (in the manner of hyperfine: a warm-up run first, then min / median / max
per run). Two clocks: wall time, and the CPU time (user + system) the process used,
which other work on a shared machine barely disturbs. ``ratio`` is the command's median
CPU time over the baseline's (``wall_ratio`` the same in wall time); the goal is at most
2.5 for ``issue``, ``inspect`` and ``bundle``. ``import x509`` (``python -c "import
cryptography.x509"``) is the floor of any command that reads or signs a certificate;
``--help`` and ``ca --help`` load no certificate code at all. The last line is one JSON
object with every figure.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL_RATIO = 2.5
GOAL_COMMANDS = ("meshca issue", "meshca inspect", "meshca bundle")
SPIFFE_ID = "spiffe://cluster.local/ns/bench/sa/cli"


def meshca_command() -> list[str]:
    """The installed ``meshca`` script next to this interpreter (what users run)."""
    script = Path(sys.executable).with_name("meshca")
    if not script.exists():
        sys.exit(f"{script} not found: install meshca into this venv first (make .venv/.installed)")
    return [str(script)]


def commands(data: Path, out: Path) -> dict[str, list[str]]:
    meshca = meshca_command()
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "meshca issue": [
            *meshca,
            "issue",
            "--data-dir",
            str(data),
            SPIFFE_ID,
            "--out",
            str(out),
        ],
        "meshca inspect": [*meshca, "inspect", "--data-dir", str(data), str(out / "cert.pem")],
        "meshca bundle": [*meshca, "bundle", "--data-dir", str(data)],
        # References, not goals: the floor of a command that reads or signs a certificate
        # (importing the certificate library alone), and commands that need none of it.
        "import x509": [sys.executable, "-c", "import cryptography.x509"],
        "meshca --help": [*meshca, "--help"],
        "meshca ca --help": [*meshca, "ca", "--help"],
    }


def run_once(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child: user + system)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def measure(
    argvs: dict[str, list[str]], runs: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(wall times, CPU times) per command; rounds interleave every command, so noise hits
    all alike."""
    for argv in argvs.values():
        run_once(argv)  # warm-up: page cache, .pyc files
    walls: dict[str, list[float]] = {name: [] for name in argvs}
    cpus: dict[str, list[float]] = {name: [] for name in argvs}
    for _ in range(runs):
        for name, argv in argvs.items():
            wall, cpu = run_once(argv)
            walls[name].append(wall)
            cpus[name].append(cpu)
    return walls, cpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="runs of each command")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny counts: checks that it runs (make test does)"
    )
    args = parser.parse_args()
    runs = 2 if args.smoke else args.runs
    root = Path(tempfile.mkdtemp(prefix="mca-cli-bench-"))
    try:
        data, out = root / "data", root / "out"
        subprocess.run(
            [*meshca_command(), "init", "--data-dir", str(data)], check=True, capture_output=True
        )
        argvs = commands(data, out)
        subprocess.run(argvs["meshca issue"], check=True, capture_output=True)
        walls, cpus = measure(argvs, runs)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    base_wall = statistics.median(walls["python -c pass"])
    base_cpu = statistics.median(cpus["python -c pass"])
    result: dict[str, object] = {"runs": runs, "goal_ratio": GOAL_RATIO}
    print(
        f"{'command':<16} {'CPU min':>8} {'median':>8} {'max':>8}  {'wall median':>11}   "
        "ratio CPU (wall), median / python -c pass"
    )
    met = True
    for name in walls:
        cpu, wall = cpus[name], walls[name]
        ratio = statistics.median(cpu) / base_cpu
        wall_ratio = statistics.median(wall) / base_wall
        key = (
            name.replace("python -c pass", "python")
            .replace("meshca ", "")
            .replace("--", "")
            .replace(" ", "_")
        )
        for clock, samples in (("cpu", cpu), ("wall", wall)):
            result[f"{key}_{clock}_min_s"] = round(min(samples), 4)
            result[f"{key}_{clock}_median_s"] = round(statistics.median(samples), 4)
            result[f"{key}_{clock}_max_s"] = round(max(samples), 4)
        if name != "python -c pass":
            result[f"{key}_ratio"] = round(ratio, 2)
            result[f"{key}_wall_ratio"] = round(wall_ratio, 2)
            if name in GOAL_COMMANDS:
                met = met and ratio <= GOAL_RATIO
        print(
            f"{name:<16} {min(cpu) * 1000:6.1f}ms {statistics.median(cpu) * 1000:6.1f}ms "
            f"{max(cpu) * 1000:6.1f}ms  {statistics.median(wall) * 1000:9.1f}ms   "
            f"{ratio:5.2f} ({wall_ratio:.2f})"
        )
    verdict = "met" if met else "NOT met"
    print(f"goal: issue, inspect, bundle each <= {GOAL_RATIO} x python -c pass: {verdict}")
    result["goal_met"] = met
    print(json.dumps(result))


if __name__ == "__main__":
    main()
