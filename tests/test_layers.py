"""The dependency direction of docs/design.md, as mapped in docs/architecture.md:
``cli`` -> ``serve`` (the server wiring) -> ``sds`` -> ``xds``; ``serve`` -> ``envoy``,
``rotation`` -> ``backends`` -> ``issuer`` -> ``spiffe``; ``util`` beneath all. Read from
the source (every import, also those inside functions), so a stray import fails here
rather than in review."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "meshca"


def modules(part: str) -> list[Path]:
    path = PACKAGE / part
    return sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")]


def imported(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            # ``from meshca import store`` imports meshca.store
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


RULES = [  # (modules, packages they must not import, why)
    (
        "sds",
        ("meshca.envoy", "meshca.backends"),
        "sds and envoy are siblings; sds is backend-blind",
    ),
    (
        "xds",
        (
            "meshca.sds",
            "meshca.envoy",
            "meshca.backends",
            "meshca.serve",
            "meshca.rotation",
            "meshca.cli",
        ),
        "the xDS engine serves every type: SDS and ADS use it, it knows neither",
    ),
    (
        "envoy",
        ("meshca.sds", "meshca.xds", "meshca.backends"),
        "envoy and sds are siblings; envoy shares only the xDS vocabulary",
    ),
    (
        "issuer",
        ("meshca.backends", "meshca.sds", "meshca.xds", "meshca.envoy"),
        "backends depend on issuer",
    ),
    ("backends", ("meshca.sds", "meshca.xds", "meshca.envoy"), "backends know nothing of SDS"),
    ("spiffe", ("meshca",), "spiffe imports nothing of meshca"),
    (
        "rotation",
        ("meshca.sds", "meshca.xds", "meshca.envoy", "meshca.serve"),
        "rotation asks proxies' ACKs through its AckTracker protocol; the serve wiring adapts SDS",
    ),
    (
        "attest",
        ("grpc", "meshca.sds", "meshca.envoy", "meshca.backends", "meshca.ca_api", "meshca.agent"),
        "attestation state is files the token commands share with serve: no server libraries",
    ),
    (
        "ca_api",
        ("meshca.sds", "meshca.xds", "meshca.envoy", "meshca.backends", "meshca.agent"),
        "the CSR API signs through the issuer; it knows nothing of SDS or the agent runtime",
    ),
    (
        "kube",
        ("meshca.sds", "meshca.backends", "meshca.rotation", "meshca.agent"),
        "Kubernetes is a source of the mesh model (envoy) and an attestor, not a second "
        "path for serving or issuance",
    ),
    (
        "agent",
        (
            "meshca.backends",
            "meshca.serve",
            "meshca.rotation",
            "meshca.attest",
            "meshca.ca_api.service",
        ),
        "the agent signs nothing itself: it reaches meshca serve only through the CSR API",
    ),
]

# The xDS vocabulary (type URLs, versions, the secret-name scheme): the one contract both
# sides of the sds/envoy wall share, so any package may import it.
VOCABULARY = "meshca.xds.resources"


@pytest.mark.parametrize(("part", "forbidden", "why"), RULES, ids=[r[0] for r in RULES])
def test_packages_import_only_downwards(part: str, forbidden: tuple[str, ...], why: str) -> None:
    offenders = sorted(
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in modules(part)
        for name in imported(path)
        if any(name == f or name.startswith(f + ".") for f in forbidden)
        and not (name == VOCABULARY or name.startswith(VOCABULARY + "."))
    )
    assert not offenders, f"{why}: {offenders}"


def test_util_imports_nothing_of_meshca_but_util() -> None:
    """The helper shelf is the ground floor: every layer may use it, it uses none."""
    offenders = sorted(
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in modules("util")
        for name in imported(path)
        if (name == "meshca" or name.startswith("meshca."))
        and not (name == "meshca.util" or name.startswith("meshca.util."))
    )
    assert not offenders


def test_the_serve_runtime_is_imported_only_by_the_command_line() -> None:
    """``meshca serve``'s composition root and what it wires sit just below the CLI: no
    package beneath them reaches back up into the runtime."""
    offenders = sorted(
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in PACKAGE.rglob("*.py")
        if not path.is_relative_to(PACKAGE / "serve") and not path.is_relative_to(PACKAGE / "cli")
        for name in imported(path)
        if name == "meshca.serve" or name.startswith("meshca.serve.")
    )
    assert not offenders


def test_nothing_imports_the_cli() -> None:
    """Except ``python -m meshca``, which runs it."""
    offenders = sorted(
        str(path.relative_to(PACKAGE.parent))
        for path in PACKAGE.rglob("*.py")
        if not path.is_relative_to(PACKAGE / "cli")
        and path != PACKAGE / "__main__.py"
        and any(n == "meshca.cli" or n.startswith("meshca.cli.") for n in imported(path))
    )
    assert not offenders


COMMAND_LINE = ("meshca.cli",)


def test_the_command_line_layer_is_imported_only_by_itself() -> None:
    """The commands and the option table sit on top: the server wiring and everything
    below it take their settings as values (``ServeConfig``), never from ``Settings``."""
    layer = {PACKAGE / "__main__.py"}
    layer.update((PACKAGE / "cli").rglob("*.py"))
    offenders = sorted(
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in PACKAGE.rglob("*.py")
        if path not in layer
        for name in imported(path)
        if any(name == c or name.startswith(c + ".") for c in COMMAND_LINE)
    )
    assert not offenders


# Libraries only `meshca serve` (gRPC, the Envoy API, Prometheus), `bootstrap --ads` (the
# Envoy API), `--backend vault` (hvac, requests) or rotation (`serve`, `meshca ca`: the
# scheduler) need.
SERVER_LIBRARIES = (
    "grpc",
    "google.protobuf",
    "envoy",
    "xds",
    "prometheus_client",
    "hvac",
    "apscheduler",
    "asyncio",
    "lightkube",  # --kubernetes only
    "httpx2",
)
_LOADED = """
import contextlib, io, json, sys
from meshca.cli import main
for argv in {argvs!r}:
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 0, argv
print(json.dumps(sorted(sys.modules)))
"""


def loaded_by(
    code: str, *, cwd: Path | None = None, env: dict[str, str] | None = None
) -> list[str]:
    """The modules a fresh interpreter holds after running ``code`` (which prints them as
    JSON, as the snippets here do); fails with its stderr if it fails."""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    loaded: list[str] = json.loads(result.stdout)
    return loaded


def test_local_commands_do_not_load_the_server_libraries(tmp_path: Path) -> None:
    """The commands that work on files, run one after another in one process (so each
    command module is loaded), must not pay for the server's libraries."""
    argvs = [
        ["--help"],
        ["init"],
        ["issue", "spiffe://cluster.local/a", "--out", "o"],
        ["inspect", "o/cert.pem"],
        ["bundle"],
        ["bootstrap", "spiffe://cluster.local/a", "--server", "unix:///run/meshca.sock"],
        ["ca", "--help"],
        ["token", "create", "--identity", "spiffe://cluster.local/a"],
        ["token", "list"],
    ]
    loaded = loaded_by(_LOADED.format(argvs=argvs), cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    assert not [m for m in loaded for h in SERVER_LIBRARIES if m == h or m.startswith(h + ".")]


# What each file command must not load: the other backends and Vault's settings, the Envoy
# modules, network addresses, the serve runtime and its libraries, YAML (no config file
# is given), token handling; and
# standard modules it has no use for that cost start-up (tempfile and shutil load the
# compression modules: meshca writes its files itself, and sizes argparse's help itself;
# these commands log nothing, and meshca's quiet default handler waits for logging).
NOT_FOR_FILE_COMMANDS = (
    *SERVER_LIBRARIES,
    "requests",
    "yaml",
    "meshca.backends.vault.backend",
    "meshca.backends.vault.settings",
    "meshca.util.netaddr",
    "meshca.envoy",
    "meshca.serve",
    "meshca.xds",
    "meshca.rotation.manager",
    "meshca.attest",
    "meshca.agent",
    "meshca.ca_api",
    "tempfile",
    "shutil",
    "bz2",
    "lzma",
    "logging",
)


# What reading the CA's certificates does not need: the signing machinery and the opened
# backend (inspect and bundle sign nothing).
NOT_FOR_READING = {
    command: ("meshca.issuer.authority", "meshca.issuer.csr", "meshca.backends.opened")
    for command in ("inspect", "bundle")
}


def command_modules() -> dict[str, str]:
    """Each command's module, by command name, from the registry."""
    from meshca.cli.commands import COMMANDS

    return {listed.name: f"meshca.cli.commands.{listed.module}" for listed in COMMANDS}


_ONE_COMMAND = """
import contextlib, io, json, sys
from meshca.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    assert main({argv!r}) == 0
print(json.dumps(sorted(sys.modules)))
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["issue", "spiffe://cluster.local/a", "--out", "o"],
        ["inspect", "o/cert.pem"],
        ["bundle"],
    ],
    ids=lambda argv: argv[0],
)
def test_file_commands_load_only_what_they_use(tmp_path: Path, argv: list[str]) -> None:
    """``meshca issue``, ``inspect`` and ``bundle`` start in a fraction of the time the
    whole package takes to import (bench/cli_startup.py): each loads the issuer and the
    local CA, not what the other commands need."""
    env = {"PATH": "/usr/bin:/bin"}
    for setup in (["init"], ["issue", "spiffe://cluster.local/a", "--out", "o"]):
        prepared = subprocess.run(
            [sys.executable, "-m", "meshca", *setup],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            timeout=60,
        )
        assert prepared.returncode == 0, prepared.stderr
    loaded = loaded_by(_ONE_COMMAND.format(argv=argv), cwd=tmp_path, env=env)
    others = [module for name, module in command_modules().items() if name != argv[0]]
    forbidden = (*NOT_FOR_FILE_COMMANDS, *others, *NOT_FOR_READING.get(argv[0], ()))
    assert not [m for m in loaded for h in forbidden if m == h or m.startswith(h + ".")]


@pytest.mark.parametrize("order", ["logging first", "meshca first"])
def test_meshca_events_stay_quiet_until_a_handler_is_installed(order: str) -> None:
    """Whether ``logging`` was imported before meshca or after, a warning from a meshca
    module reaches no last-resort handler on stderr, while other loggers' still do."""
    imports = (
        "import logging, meshca.backends.vault.backend as backend"
        if order == "logging first"
        else "import meshca.backends.vault.backend as backend, logging"
    )
    code = (
        f"{imports}\n"
        "backend.log.warning('retrying')\n"
        "logging.getLogger('elsewhere').warning('shown')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "shown\n"


def test_meshca_modules_take_their_logger_from_util_logger() -> None:
    """A module calling ``logging.getLogger`` itself could log before meshca's quiet
    default is in place; only the logging modules of ``util`` may."""
    offenders = [
        str(path.relative_to(PACKAGE.parent))
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name not in ("logs.py", "logger.py") and "logging.getLogger(" in path.read_text()
    ]
    assert offenders == []


def test_help_loads_no_command_module(tmp_path: Path) -> None:
    """``meshca --help`` lists every command from the registry's summaries: it imports
    none of the command modules (nor what they import); a command's own ``--help``
    imports that command's module only."""
    for argv, wanted in ((["--help"], set()), (["issue", "--help"], {"issue"})):
        loaded = set(
            loaded_by(_LOADED.format(argvs=[argv]), cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
        )
        modules = command_modules()
        assert {name for name, module in modules.items() if module in loaded} == wanted
        if argv == ["--help"]:  # the option table parses IDs lazily too
            assert not loaded & {"meshca.spiffe", "dataclasses", "logging"}


def test_the_command_registry_names_each_command_module() -> None:
    """The registry is what ``meshca --help`` lists and which module runs a command: each
    entry's module declares that command, and every command module is listed."""
    from meshca.cli.commands import COMMANDS

    for listed in COMMANDS:
        assert listed.load().name == listed.name
    declaring = {
        path.stem
        for path in (PACKAGE / "cli" / "commands").glob("*.py")
        if "\nCOMMAND = Command(" in path.read_text()
    }
    assert declaring == {listed.module for listed in COMMANDS}


def test_serving_a_mesh_file_does_not_load_the_kubernetes_client() -> None:
    """The Kubernetes client library loads for ``serve --kubernetes`` only: the runtime
    that serves a mesh file (or none) imports it nowhere at module level."""
    code = (
        "import json, sys\n"
        "import meshca.serve.server, meshca.cli.commands.serve\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    loaded = loaded_by(code)
    assert not [m for m in loaded if m.startswith(("lightkube", "httpx2", "meshca.kube"))]


_CLIENT_ONLY = """
import contextlib, io, json, sys
from meshca.cli import main
for argv in {argvs!r}:
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 0, argv
import meshca.rotation.admin_client  # what 'meshca ca' loads when a server answers
print(json.dumps(sorted(sys.modules)))
"""


def test_help_and_the_operator_client_do_not_load_the_certificate_library(tmp_path: Path) -> None:
    """``meshca --help``, a command's ``--help`` and ``meshca ca`` talking to a running
    server sign nothing: the cryptography library (more start-up than all the rest of
    meshca) and the CA modules stay unloaded, so an operator's rotation starts sooner."""
    argvs = [["--help"], ["ca", "--help"], ["issue", "--help"], ["inspect", "--help"]]
    loaded = loaded_by(
        _CLIENT_ONLY.format(argvs=argvs), cwd=tmp_path, env={"PATH": "/usr/bin:/bin"}
    )
    heavy = (
        "cryptography",
        "meshca.backends.local",
        "meshca.backends.opened",
        "meshca.issuer.authority",
        "meshca.rotation.manager",
    )
    assert not [m for m in loaded for h in heavy if m == h or m.startswith(h + ".")]
