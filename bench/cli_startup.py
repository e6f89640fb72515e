"""CLI start-up: ``meshca issue``, ``inspect`` and ``bundle`` as whole processes, as ratios
of ``python -c pass`` measured in the same run, beside the floors nothing in meshca can
go under.

Run: ``.venv/bin/python bench/cli_startup.py [--runs 20] [--no-wheel]``

Each command runs ``--runs`` times, interleaved with the baseline so load on the machine
hits both alike (in the manner of hyperfine: a warm-up run first, then min / median / max
per run). Two clocks: wall time, and the CPU time (user + system) the process used,
which other work on a shared machine barely disturbs. ``ratio`` is the command's median
CPU time over the baseline's (``wall_ratio`` the same in wall time); the goal is at most
2.5 for ``issue``, ``inspect`` and ``bundle``.

What else each run shows, so the figures can be read against what is possible:

- the floors: ``import x509`` (``python -c "import cryptography.x509"``), which any
  command reading or signing a certificate pays; ``import x509+keys``, what ``issue``
  needs of the library at least (x509, key serialization, and the OpenSSL backend that
  an ECDSA signature loads);
- ``python -S -c pass``: the interpreter without ``site``, so the difference to the
  baseline is what the venv's ``.pth`` files cost every process (an editable install's
  import finder among them);
- ``python -m meshca --version`` beside ``meshca --version``: the console script's own
  cost;
- the install measured: this venv's meshca is an editable install when it says so; and
  (unless ``--no-wheel``) the same commands from a wheel of this tree installed into a
  temporary venv (dependencies from this one), as a user's ``pip install`` gets them,
  each against that venv's own ``python -c pass``.

meshca's modules are compiled to bytecode first (``compileall``), as ``pip install`` does:
with ``PYTHONDONTWRITEBYTECODE`` set, an editable install would otherwise compile every
module from source in every run. The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

GOAL_RATIO = 2.5
GOAL_COMMANDS = ("meshca issue", "meshca inspect", "meshca bundle")
SPIFFE_ID = "spiffe://cluster.local/ns/bench/sa/cli"
REPO = Path(__file__).resolve().parent.parent
PIP = (sys.executable, "-m", "pip")
# What `meshca issue` needs of the certificate library, and no more.
KEYS_FLOOR = (
    "import cryptography.x509, cryptography.hazmat.primitives.serialization\n"
    "from cryptography.hazmat.primitives import hashes\n"
    "from cryptography.hazmat.primitives.asymmetric import ec\n"
    "ec.ECDSA(hashes.SHA256())"
)


def script_beside(python: Path) -> Path:
    """The installed ``meshca`` script next to ``python`` (what users run)."""
    script = python.with_name("meshca")
    if not script.exists():
        sys.exit(f"{script} not found: install meshca into this venv first (make .venv/.installed)")
    return script


def commands(python: Path, data: Path, out: Path) -> dict[str, list[str]]:
    py = str(python)
    meshca = str(script_beside(python))
    return {
        "python -c pass": [py, "-c", "pass"],
        "meshca issue": [meshca, "issue", "--data-dir", str(data), SPIFFE_ID, "--out", str(out)],
        "meshca inspect": [meshca, "inspect", "--data-dir", str(data), str(out / "cert.pem")],
        "meshca bundle": [meshca, "bundle", "--data-dir", str(data)],
        # References, not goals.
        "import x509": [py, "-c", "import cryptography.x509"],
        "import x509+keys": [py, "-c", KEYS_FLOOR],
        "python -S -c pass": [py, "-S", "-c", "pass"],
        "meshca --version": [meshca, "--version"],
        "python -m meshca --version": [py, "-m", "meshca", "--version"],
        "meshca --help": [meshca, "--help"],
        "meshca ca --help": [meshca, "ca", "--help"],
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
        run_once(argv)  # warm-up: page cache
    walls: dict[str, list[float]] = {name: [] for name in argvs}
    cpus: dict[str, list[float]] = {name: [] for name in argvs}
    for _ in range(runs):
        for name, argv in argvs.items():
            wall, cpu = run_once(argv)
            walls[name].append(wall)
            cpus[name].append(cpu)
    return walls, cpus


def installed_package(python: Path) -> Path:
    """Where ``python`` imports meshca from."""
    found = subprocess.run(
        [str(python), "-c", "import meshca; print(meshca.__file__)"],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(found.stdout.strip()).parent


def purelib_of(python: Path) -> str:
    """``python``'s site-packages directory."""
    return subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def editable_finders(python: Path) -> list[str]:
    """The ``.pth`` files in ``python``'s site-packages that run code at start-up."""
    purelib = purelib_of(python)
    return sorted(
        path.name
        for path in Path(purelib).glob("*.pth")
        if any(line.startswith("import") for line in path.read_text().splitlines())
    )


def wheel_venv(root: Path) -> Path:
    """A venv holding a wheel of this tree (dependencies: this venv's site-packages, on
    its path without running their ``.pth`` files). Its python."""
    wheels = root / "wheels"
    subprocess.run(
        [*PIP, "wheel", "--quiet", "--no-deps", "-w", str(wheels), str(REPO)],
        check=True,
        capture_output=True,
    )
    venv = root / "wheel-venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True
    )
    python = venv / "bin" / "python"
    wheel = next(wheels.glob("meshca-*.whl"))
    subprocess.run(
        [
            *PIP,
            "--python",
            str(python),
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    purelib = purelib_of(python)
    Path(purelib, "meshca-bench-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def bench_install(python: Path, root: Path, runs: int) -> tuple[dict[str, list[float]], ...]:
    compileall.compile_dir(installed_package(python), quiet=1)
    data, out = root / "data", root / "out"
    meshca = str(script_beside(python))
    subprocess.run([meshca, "init", "--data-dir", str(data)], check=True, capture_output=True)
    argvs = commands(python, data, out)
    subprocess.run(argvs["meshca issue"], check=True, capture_output=True)
    return measure(argvs, runs)


def report(
    prefix: str, walls: dict[str, list[float]], cpus: dict[str, list[float]], result: dict
) -> bool:
    """Print the table; add the figures to ``result`` (keys prefixed ``prefix``). Whether
    the goal is met."""
    base_wall = statistics.median(walls["python -c pass"])
    base_cpu = statistics.median(cpus["python -c pass"])
    print(
        f"{'command':<27} {'CPU min':>8} {'median':>8} {'max':>8}  {'wall median':>11}   "
        "ratio CPU (wall), median / python -c pass"
    )
    met = True
    for name in walls:
        cpu, wall = cpus[name], walls[name]
        ratio = statistics.median(cpu) / base_cpu
        wall_ratio = statistics.median(wall) / base_wall
        key = prefix + (
            name.replace("python -c pass", "python")
            .replace("python -S -c pass", "python_no_site")
            .replace("python -m meshca", "module")
            .replace("meshca ", "")
            .replace("--", "")
            .replace("+", "_")
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
            f"{name:<27} {min(cpu) * 1000:6.1f}ms {statistics.median(cpu) * 1000:6.1f}ms "
            f"{max(cpu) * 1000:6.1f}ms  {statistics.median(wall) * 1000:9.1f}ms   "
            f"{ratio:5.2f} ({wall_ratio:.2f})"
        )
    median = {name: statistics.median(cpus[name]) for name in cpus}
    for command in GOAL_COMMANDS:
        over = median[command] - median["import x509+keys"]
        print(f"  {command}: {over * 1000:+.1f} ms CPU over the import x509+keys floor")
    site = median["python -c pass"] - median["python -S -c pass"]
    script = median["meshca --version"] - median["python -m meshca --version"]
    print(f"  site and .pth files: {site * 1000:.1f} ms CPU of every process here")
    print(f"  console script vs python -m: {script * 1000:+.1f} ms CPU")
    return met


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="runs of each command")
    parser.add_argument(
        "--no-wheel", action="store_true", help="measure this venv's install only (no wheel)"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny counts: checks that it runs (make test does)"
    )
    args = parser.parse_args()
    runs = 2 if args.smoke else args.runs
    load_start = [round(x, 2) for x in os.getloadavg()]
    python = Path(sys.executable)
    finders = editable_finders(python)
    package = installed_package(python)
    editable = not package.is_relative_to(sysconfig.get_paths()["purelib"])
    result: dict[str, object] = {
        "runs": runs,
        "goal_ratio": GOAL_RATIO,
        "install": "editable" if editable else "regular",
        "pth_files_run_at_startup": finders,
        "load_average_start": load_start,
    }
    root = Path(tempfile.mkdtemp(prefix="mca-cli-bench-"))
    try:
        walls, cpus = bench_install(python, root / "venv", runs)
        kind = "an editable install" if editable else "a regular install"
        print(f"this venv: {kind} of meshca ({package}); .pth files run at start-up: {finders}")
        met = report("", walls, cpus, result)
        verdict = "met" if met else "NOT met"
        print(f"goal: issue, inspect, bundle each <= {GOAL_RATIO} x python -c pass: {verdict}")
        result["goal_met"] = met
        if not (args.smoke or args.no_wheel):
            try:
                wheel_python = wheel_venv(root)
            except subprocess.CalledProcessError as exc:
                reason = (exc.stderr or b"").decode(errors="replace").strip().splitlines()[-1:]
                print(f"wheel install: not measured ({' '.join(reason) or exc})")
                result["wheel_error"] = " ".join(reason) or str(exc)
            else:
                walls, cpus = bench_install(wheel_python, root / "wheel", runs)
                print("\na wheel of this tree in a fresh venv (what pip install gives a user):")
                wheel_met = report("wheel_", walls, cpus, result)
                verdict = "met" if wheel_met else "NOT met"
                print(f"goal, wheel install: {verdict}")
                result["wheel_goal_met"] = wheel_met
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    print(f"load average: {load_start} at the start, {result['load_average_end']} at the end")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
