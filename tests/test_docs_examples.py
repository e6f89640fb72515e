"""The README's worked examples and the docs' quick starts run as written.

Every fenced block whose language is ``sh``, ``shell``, ``bash`` or ``console`` in
README.md and docs/*.md is run, in order, one shell session per document (so ``cd``,
``export`` and files carry over from block to block), with ``meshca``, ``envoy``,
``bao`` and ``kubectl`` from the venv on the PATH and nothing but loopback. README.md
starts in the repository root, as it says; a document of docs/ starts in an empty
scratch directory. In a ``console`` block the ``$ `` lines (and their ``\\``
continuations) are the commands; the other lines are what they print.

An HTML comment on the line before a block changes how it runs:

* ``<!-- not run: WHY -->``: not run (Kubernetes, Docker, iptables, a command that
  serves forever); each such block is a skipped test here, with its reason;
* ``<!-- run in the background -->``: the block's last command (a server) runs in the
  background until the end of the document; the run waits until that command has
  printed the last line shown in the block (or, with none shown, checks it is still
  running after a second), and at the end stops it with SIGTERM: it must exit 0.
* ``<!-- run in the background, with a Kubernetes API server -->``: the same, and the
  document runs with ``$KUBECONFIG`` naming the tests' API server
  (``tests/kube_harness.py``, as admin); without that server the document is skipped,
  saying why.

Any other comment before a runnable block is an error, so that a typo cannot turn a
block off. A block with any other language (``text``, ``yaml``, ``json``, none) is
never run: write commands in ``sh`` or ``console`` blocks.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.serve_harness import clean_env

REPO = Path(__file__).resolve().parent.parent
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUNNABLE = {"sh", "shell", "bash", "console"}
DIRECTIVE = re.compile(r"^<!--\s*(.*?)\s*-->$")
BACKGROUND = "run in the background"
KUBE_BACKGROUND = "run in the background, with a Kubernetes API server"
TIMEOUT = 300  # seconds for one document, whatever it runs


@dataclass
class Block:
    document: str
    line: int
    language: str
    body: list[str]
    directive: str | None
    commands: list[str] = field(default_factory=list)
    shown: list[str] = field(default_factory=list)  # a console block's printed lines

    @property
    def where(self) -> str:
        return f"{self.document}:{self.line}"

    @property
    def skipped(self) -> str | None:
        if self.directive and self.directive.startswith("not run:"):
            return self.directive.removeprefix("not run:").strip()
        return None


def split_console(block: Block) -> None:
    """``$ `` lines and their continuations are commands; the rest is output."""
    continued = False
    for line in block.body:
        if continued:
            block.commands[-1] += "\n" + line
        elif line.startswith("$ "):
            block.commands.append(line[2:])
        else:
            block.shown.append(line)
            continue
        continued = line.endswith("\\")


def blocks_of(path: Path) -> list[Block]:
    """The runnable fenced blocks of ``path``, each with the comment before it."""
    lines = path.read_text().splitlines()
    found: list[Block] = []
    index = 0
    before: str | None = None
    while index < len(lines):
        line = lines[index]
        opening = re.match(r"^```(\w*)\s*$", line)
        if opening:
            start = index
            index += 1
            body = []
            while index < len(lines) and lines[index] != "```":
                body.append(lines[index])
                index += 1
            language = opening.group(1)
            if language in RUNNABLE:
                match = DIRECTIVE.match(before or "")
                name = str(path.relative_to(REPO))
                block = Block(name, start + 1, language, body, match.group(1) if match else None)
                if language == "console":
                    split_console(block)
                else:
                    block.commands = ["\n".join(body)]
                found.append(block)
        elif line.strip():
            before = line.strip()
        index += 1
    return found


def script_of(blocks: list[Block], outputs: Path) -> str:
    """One bash script for a document: each block in turn, markers in between."""
    parts = [
        "set -e",
        "__servers=()",
        # whatever a block left running in the background is stopped on the way out
        "trap '__s=$?; kill $(jobs -p) 2>/dev/null || true; wait; exit $__s' EXIT",
        "__wait_for() {  # file, text, pid: the text printed while the pid runs",
        "  for __i in $(seq 600); do",
        '    grep -qxF -- "$2" "$1" && return 0',
        '    kill -0 "$3" 2>/dev/null || break',
        "    sleep 0.1",
        "  done",
        '  echo "@@ not printed: $2"; cat "$1"; return 1',
        "}",
    ]
    for number, block in enumerate(blocks):
        if block.skipped is not None:
            continue
        if block.directive not in (None, BACKGROUND, KUBE_BACKGROUND):
            raise ValueError(f"{block.where}: unknown directive <!-- {block.directive} -->")
        parts.append(f"echo {shlex.quote('@@ ' + block.where)}")
        commands = list(block.commands)
        server = commands.pop() if block.directive in (BACKGROUND, KUBE_BACKGROUND) else None
        parts.extend(commands)
        if server is not None:
            out = shlex.quote(str(outputs / f"server-{number}.out"))
            parts.append(f"{server} > {out} 2>&1 &")
            parts.append("__servers+=($!)")
            shown = [line.strip() for line in block.shown if line.strip()]
            if shown:
                parts.append(f"__wait_for {out} {shlex.quote(shown[-1])} $!")
            else:
                parts.append(f"sleep 1; kill -0 $! || {{ cat {out}; exit 1; }}")
    parts += [
        'for __pid in "${__servers[@]}"; do',
        '  kill -TERM "$__pid"',
        '  wait "$__pid" || { echo "@@ a server stopped with SIGTERM exited $?"; exit 1; }',
        "done",
        "echo '@@ done'",
    ]
    return "\n".join(parts) + "\n"


def needs(blocks: list[Block]) -> list[pytest.MarkDecorator]:
    """The markers of what a document's commands start: Envoy, OpenBao."""
    text = "\n".join(c for b in blocks if b.skipped is None for c in b.commands)
    marks = []
    if re.search(r"\benvoy\b|mtls_demo|bookstore", text):
        marks.append(pytest.mark.envoy)
    if re.search(r"\bbao\b", text):
        marks.append(pytest.mark.vault)
    if uses_kube(blocks):
        marks.append(pytest.mark.kube)
    return marks


def uses_kube(blocks: list[Block]) -> bool:
    return any(b.directive == KUBE_BACKGROUND for b in blocks)


BLOCKS = {path: blocks_of(path) for path in DOCUMENTS}


@pytest.mark.parametrize(
    "document",
    [
        pytest.param(path, id=str(path.relative_to(REPO)), marks=needs(blocks))
        for path, blocks in BLOCKS.items()
        if any(b.skipped is None for b in blocks)
    ],
)
@pytest.mark.timeout(TIMEOUT + 30)
def test_document_runs_as_written(
    document: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    blocks = BLOCKS[document]
    outputs = tmp_path / "outputs"
    scratch = tmp_path / "scratch"
    for directory in (outputs, scratch, tmp_path / "home", tmp_path / "tmp"):
        directory.mkdir()
    venv = REPO / ".venv" / "bin"
    env = clean_env() | {
        "PATH": f"{venv}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": str(tmp_path / "home"),  # bao and kubectl keep nothing in the real one
        "TMPDIR": str(tmp_path / "tmp"),  # mktemp -d lands here
    }
    env.pop("VIRTUAL_ENV", None)
    if uses_kube(blocks):  # the session's API server (skips, saying why, without one)
        env["KUBECONFIG"] = str(request.getfixturevalue("kube").kubeconfig)
    before = sorted(os.listdir(REPO))
    process = subprocess.Popen(
        ["bash", "-c", script_of(blocks, outputs)],
        cwd=REPO if document.name == "README.md" else scratch,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: stopped as one below
    )
    try:
        output, _ = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"not done within {TIMEOUT}s:\n{last_block(output)}")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0 and output.endswith("@@ done\n"), last_block(output)
    assert sorted(os.listdir(REPO)) == before, "the commands wrote into the repository"


def last_block(output: str) -> str:
    """The output from the last block that started, with its place in the document."""
    return "@@ " + output.rsplit("\n@@ ", 1)[-1][-6000:]


@pytest.mark.parametrize(
    "where",
    [b.where for blocks in BLOCKS.values() for b in blocks if b.skipped is not None],
)
def test_block_not_run(where: str) -> None:
    """One skipped test per block marked ``not run``, so the run lists them and why."""
    [block] = [b for blocks in BLOCKS.values() for b in blocks if b.where == where]
    pytest.skip(f"{where} not run: {block.skipped}")
