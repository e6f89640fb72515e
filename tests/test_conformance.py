"""The conformance tables of docs/mesh.md are true: every row's check holds against the
resources meshca generates, and the counts printed above the tables are the rows'.

A table follows a heading ``### Conformance: <layout>``; its last column holds the
row's check, in backticks::

    <workload>[@passthrough] <CDS|EDS|LDS|RDS|SDS> <name glob> exists | absent
    <workload>[@passthrough] <CDS|EDS|LDS|RDS|SDS> <name glob> <path> = <value> | != <value>
    <workload>[@passthrough] <CDS|EDS|LDS|RDS|SDS> <name glob> <path> has | none

The workload's proxy is generated in that layout (intercept capture) from the bookstore
mesh with bookwarehouse ``mtls: permissive`` (``@passthrough``: and ``egress:
passthrough``). In the ``ambient`` layout the first word names a node of
``test_ambient.py``'s two-node mesh instead, and the proxy is that node's. The path
walks the resources as JSON (``MessageToDict``, typed configs expanded): ``a.b``
descends, ``a[]`` takes every element, ``**`` any depth. ``= v``: some value there
equals ``v``; ``!= v``: values are there and none equals ``v``; ``has``: the
field is set somewhere; ``none``: nowhere, in every resource the glob names. SDS
resources are the secret names the configuration refers to. ``a ; b``: both hold.
"""

from __future__ import annotations

import fnmatch
import re
from collections import Counter
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from meshca.envoy.generate import generate
from meshca.envoy.layouts import LAYOUTS
from meshca.envoy.mesh import parse_mesh
from meshca.envoy.snapshot import Snapshot
from meshca.spiffe import SpiffeId, TrustDomain
from meshca.xds.resources import CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE
from tests.envoy_harness import bookstore_document
from tests.test_ambient import ambient_document

DOC = Path(__file__).resolve().parent.parent / "docs" / "mesh.md"
TD = TrustDomain("cluster.local")
KINDS = {"CDS": CLUSTER_TYPE, "EDS": ENDPOINT_TYPE, "LDS": LISTENER_TYPE, "RDS": ROUTE_TYPE}
VERDICTS = ("match", "partial", "missing")
HEADING = re.compile(r"^### Conformance: (\S+)$")
COUNTS = re.compile(r"^\| `(\S+)` \| (\d+) \| (\d+) \| (\d+) \| (\d+) \|$")


def _cells(line: str) -> list[str]:
    parts = re.split(r"(?<!\\)\|", line.strip())[1:-1]
    return [p.strip().replace("\\|", "|") for p in parts]


def rows() -> Iterator[tuple[str, str, str, str]]:
    """(layout, row id, verdict, check) for every row of every conformance table."""
    layout = None
    for line in DOC.read_text().splitlines():
        heading = HEADING.match(line)
        if heading:
            layout = heading.group(1)
            continue
        if line.startswith("#"):
            layout = None
        if layout is None or not line.startswith("| "):
            continue
        cells = _cells(line)
        if cells[0] in ("#", "") or set(cells[0]) <= {"-", " "}:
            continue
        verdict, check = cells[-2], cells[-1]
        assert check.startswith("`") and check.endswith("`"), f"{layout} {cells[0]}: {check}"
        yield layout, cells[0], verdict, check.strip("`")


ROWS = list(rows())


@cache
def snapshot(layout: str, workload: str) -> Snapshot:
    if layout == "ambient":
        ambient = ambient_document()
        node = next(n for n in ambient["nodes"] if n["name"] == workload)
        return generate(parse_mesh(ambient, TD), SpiffeId.parse(node["identity"]))
    name, _, variant = workload.partition("@")
    document = bookstore_document()
    for service in document["services"]:
        if service["name"] == "bookwarehouse":
            service["mtls"] = "permissive"
    if variant == "passthrough":
        document["egress"] = "passthrough"
    mesh = parse_mesh(document, TD)
    entry = next(w for w in document["workloads"] if w["name"] == name)
    proxy = SpiffeId.from_kubernetes(entry["namespace"], entry["service_account"], TD)
    return generate(mesh, proxy, workload=name, layout=layout)


def _walk(value: Any, path: list[str]) -> Iterator[Any]:
    if not path:
        yield value
        return
    step, rest = path[0], path[1:]
    if step == "**":
        yield from _walk(value, rest)
        children = value.values() if isinstance(value, dict) else value
        if isinstance(value, (dict, list)):
            for child in children:
                yield from _walk(child, path)
        return
    many = step.endswith("[]")
    key = step.removesuffix("[]")
    if not isinstance(value, dict) or key not in value:
        return
    found = value[key]
    if many:
        for item in found if isinstance(found, list) else []:
            yield from _walk(item, rest)
    else:
        yield from _walk(found, rest)


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def evaluate(layout: str, check: str) -> None:
    """Raises AssertionError saying what does not hold; ``a ; b`` checks both."""
    for part in check.split(" ; "):
        _evaluate_one(layout, part)


def _evaluate_one(layout: str, check: str) -> None:
    workload, kind, glob, *rest = check.split(" ")
    generated = snapshot(layout, workload)
    if kind == "SDS":
        resources: dict[str, Any] = {n: n for n in generated.secret_names}
    else:
        resources = {
            name: json_format.MessageToDict(message, preserving_proto_field_name=True)
            for name, message in generated.get(KINDS[kind]).items()
        }
    named = {n: r for n, r in resources.items() if fnmatch.fnmatchcase(n, glob)}
    if rest == ["exists"]:
        assert named, f"no {kind} resource named {glob}: {sorted(resources)}"
        return
    if rest == ["absent"]:
        assert not named, f"{kind} {sorted(named)} exist"
        return
    assert named, f"no {kind} resource named {glob}: {sorted(resources)}"
    path, op, *value = rest
    found = [v for r in named.values() for v in _walk(r, path.split("."))]
    if op == "has":
        assert found, f"{path} is set in none of {sorted(named)}"
    elif op == "none":
        assert not found, f"{path} is set: {found[:3]}"
    elif op == "!=":
        assert len(value) == 1 and found, f"{path} is set in none of {sorted(named)}"
        assert value[0] not in [_text(v) for v in found], f"{path}: {value[0]} is there"
    else:
        assert op == "=" and len(value) == 1, f"unknown check {check!r}"
        assert value[0] in [_text(v) for v in found], f"{path}: {found[:6]}"


@pytest.mark.parametrize(
    ("layout", "row", "verdict", "check"), ROWS, ids=[f"{r[0]}-{r[1]}" for r in ROWS]
)
def test_each_conformance_row_holds(layout: str, row: str, verdict: str, check: str) -> None:
    assert layout in LAYOUTS
    assert verdict in VERDICTS, f"{row}: verdict {verdict!r}"
    evaluate(layout, check)


def test_every_layout_has_a_table_and_the_counts_are_the_rows() -> None:
    measured = {
        layout: Counter(verdict for lay, _, verdict, _ in ROWS if lay == layout)
        for layout in LAYOUTS
    }
    assert all(measured[layout] for layout in LAYOUTS), measured
    printed = {}
    for line in DOC.read_text().splitlines():
        found = COUNTS.match(line)
        if found and found.group(1) in LAYOUTS:
            printed[found.group(1)] = tuple(int(n) for n in found.groups()[1:])
    for layout in LAYOUTS:
        counts = measured[layout]
        total = sum(counts.values())
        expected = (total, counts["match"], counts["partial"], counts["missing"])
        assert printed.get(layout) == expected, f"{layout}: docs say {printed.get(layout)}"


def test_a_false_row_fails() -> None:
    """The evaluator can say no: a wrong value, a missing resource, a present field."""
    for check in (
        "bookbuyer LDS outbound-listener address.socket_address.port_value = 15006",
        "bookbuyer CDS nope exists",
        "bookbuyer LDS outbound-listener use_original_dst has",
        "bookbuyer LDS outbound-listener listener_filters[].name != "
        "envoy.filters.listener.original_dst",
        "bookbuyer LDS outbound-listener address none",
        "bookbuyer SDS default exists",
    ):
        with pytest.raises(AssertionError):
            evaluate("osm", check)
