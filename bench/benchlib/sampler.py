"""A wall-clock sampler of one thread's Python stack (the event loop's), for a bench's
server process: what the loop was doing, blocked in a system call or running Python,
every ``interval`` seconds. No dependency beyond the standard library."""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from pathlib import Path
from types import FrameType


class StackSampler:
    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.thread_id = threading.get_ident()  # the thread that creates it: the loop's
        self.stacks: Counter[tuple[str, ...]] = Counter()
        self.timeline: list[tuple[float, str]] = []  # (monotonic, innermost meshca frame)
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None

    def start(self) -> None:
        self.stacks.clear()
        self.timeline.clear()
        self._stop.clear()
        self._worker = threading.Thread(target=self._run, daemon=True)
        self._worker.start()

    def stop(self, path: Path) -> int:
        """Stop and write the collapsed stacks (flame-graph input) to ``path``."""
        self._stop.set()
        if self._worker is not None:
            self._worker.join()
        with open(path, "w") as out:
            for stack, count in self.stacks.most_common():
                out.write(";".join(stack) + f" {count}\n")
        with open(path.with_suffix(".timeline"), "w") as out:
            for at, where in self.timeline:
                out.write(f"{at:.4f} {where}\n")
        return sum(self.stacks.values())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            frames = sys._current_frames()
            frame = frames.get(self.thread_id)
            if frame is not None:
                stack = _stack(frame)
                self.stacks[stack] += 1
                # what other threads (the pool running blocking work) do in meshca
                others = [
                    _innermost_meshca(_stack(f)) for i, f in frames.items() if i != self.thread_id
                ]
                busy = ", ".join(sorted({o for o in others if o}))
                where = _where(stack) + (f" | threads: {busy}" if busy else "")
                self.timeline.append((time.monotonic(), where))


def _stack(frame: FrameType | None) -> tuple[str, ...]:
    names = []
    while frame is not None:
        code = frame.f_code
        names.append(f"{Path(code.co_filename).stem}:{code.co_name}:{frame.f_lineno}")
        frame = frame.f_back
    return tuple(reversed(names))


def _innermost_meshca(stack: tuple[str, ...]) -> str:
    names = [f for f in stack if f.split(":")[0] in _MESHCA_MODULES]
    return names[-1].rsplit(":", 1)[0] if names else ""


_MESHCA_MODULES = {
    Path(p).stem
    for p in __import__("glob").glob(str(Path(__file__).parents[2] / "meshca" / "**" / "*.py"))
}


def _where(stack: tuple[str, ...]) -> str:
    """The outermost meshca frame and the innermost frame: the phase, and what it did."""
    phase = next(
        (
            f
            for f in stack
            if "sds_fanout" not in f
            and "base_events" not in f
            and "runners" not in f
            and "events:_run" not in f
        ),
        stack[-1],
    )
    return f"{phase} > {stack[-1]}"


def summarise(path: Path, top: int = 40) -> str:
    """Self and inclusive sample counts per function from a collapsed-stack file."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [f.rsplit(":", 1)[0] for f in stack.split(";")]
        n = int(count)
        total += n
        own[frames[-1]] += n
        for name in set(frames):
            inclusive[name] += n
    lines = [f"{total} samples", "-- self"]
    lines += [f"{n / total:6.1%} {name}" for name, n in own.most_common(top)]
    lines += ["-- inclusive"]
    lines += [f"{n / total:6.1%} {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarise(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 40))
