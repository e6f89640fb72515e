"""The dependency direction of docs/DESIGN: ``cli`` -> server wiring -> ``sds``, ``envoy``
-> ``issuer`` -> ``spiffe``. Read from the source (every import, also those inside
functions), so a stray import fails here rather than in review."""

from __future__ import annotations

import ast
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
    return found


RULES = [  # (modules, packages they must not import, why)
    (
        "sds",
        ("meshca.envoy", "meshca.backends"),
        "sds and envoy are siblings; sds is backend-blind",
    ),
    ("envoy", ("meshca.sds", "meshca.backends"), "envoy and sds are siblings"),
    ("issuer", ("meshca.backends", "meshca.sds", "meshca.envoy"), "backends depend on issuer"),
    ("backends", ("meshca.sds", "meshca.envoy"), "backends know nothing of SDS"),
    ("spiffe", ("meshca",), "spiffe imports nothing of meshca"),
]


@pytest.mark.parametrize(("part", "forbidden", "why"), RULES, ids=[r[0] for r in RULES])
def test_packages_import_only_downwards(part: str, forbidden: tuple[str, ...], why: str) -> None:
    offenders = sorted(
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in modules(part)
        for name in imported(path)
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    )
    assert not offenders, f"{why}: {offenders}"


def test_nothing_imports_the_cli() -> None:
    """Except ``python -m meshca``, which runs it."""
    offenders = sorted(
        str(path.relative_to(PACKAGE.parent))
        for path in PACKAGE.rglob("*.py")
        if "meshca.cli" in imported(path) and path != PACKAGE / "__main__.py"
    )
    assert not offenders
