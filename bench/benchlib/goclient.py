"""bench/goclient's sdsclient: N SDS streams held by one compiled process (a stand-in for
Envoys), so a fan-out bench measures the server rather than a Python client sharing its
cores. Built once by ``bench/goclient/build.sh`` into ``~/.cache/meshca/goclient``;
without Go, :func:`sdsclient` says why and returns None (the bench skips that client)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from benchlib.child import JsonChild

BUILD = Path(__file__).resolve().parents[1] / "goclient" / "build.sh"


def sdsclient() -> str | None:
    """The built client's path, or None (with the reason on stderr)."""
    if shutil.which("go") is None:
        print("Go client skipped: no Go", file=sys.stderr)
        return None
    built = subprocess.run([str(BUILD)], capture_output=True, text=True)
    if built.returncode != 0:
        print(f"Go client skipped: its build failed: {built.stderr.strip()}", file=sys.stderr)
        return None
    return built.stdout.strip().splitlines()[-1]


class GoStreams(JsonChild):
    """``streams`` ROOTCA streams on ``connections`` connections to ``target``; its hello
    (once every stream is open or failed): opened, failed (status code -> count), open_s,
    subscribe_p50_s, subscribe_p99_s. ``ask("wait K SECONDS")``: the arrivals of every
    stream's K-th response after its first (first, p50, p99, last, received, cpu)."""

    def __init__(
        self,
        binary: str,
        target: str,
        *,
        streams: int,
        connections: int,
        max_opening: int,
        tls: tuple[Path, Path, Path] | None = None,
        node_id: str = "sdsclient",
    ) -> None:
        argv = [
            binary,
            "-target", target,
            "-streams", str(streams),
            "-connections", str(connections),
            "-max-opening", str(max_opening),
            "-node-id", node_id,
        ]  # fmt: skip
        if tls is not None:
            bundle, chain, key = tls
            argv += ["-ca", str(bundle), "-cert", str(chain), "-key", str(key)]
        super().__init__(argv, "Go client")
