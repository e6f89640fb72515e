"""A bench's measured process: started with a command line, answering one JSON line per
command on stdout (its first line, ``hello``, unasked), stopped by ``quit``. Running the
server under test in its own process keeps its CPU and memory apart from the clients'."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
from typing import Any


class JsonChild:
    def __init__(self, argv: list[str], what: str) -> None:
        self.what = what
        self.process = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.lock = threading.Lock()  # one question and its answer at a time
        self.hello = self.ask_sync(None)

    def ask_sync(self, command: str | None) -> dict[str, Any]:
        """Send ``command`` (None: only read the next line) and return the answer."""
        assert self.process.stdin is not None and self.process.stdout is not None
        with self.lock:
            if command is not None:
                self.process.stdin.write(command + "\n")
                self.process.stdin.flush()
            line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"the {self.what} process exited ({self.process.wait()})")
        return dict(json.loads(line))

    async def ask(self, command: str) -> dict[str, Any]:
        return await asyncio.to_thread(self.ask_sync, command)

    def stop(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.write("quit\n")
            self.process.stdin.flush()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
