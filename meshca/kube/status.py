"""Verdicts written where users look: the status of each HTTPRoute and AccessPolicy.

An AccessPolicy's ``status.conditions`` holds one ``Accepted`` condition; an HTTPRoute's
``status.parents[]`` holds, per Service parent, ``controllerName: meshca.io/mesh`` and its
``Accepted`` and ``ResolvedRefs`` conditions (Gateway API route status). Entries of
other controllers are kept as they are, and meshca's own entries for parents it no
longer handles are removed.

A status is written (a merge patch of the status subresource, carrying the
resourceVersion it was computed from, so a concurrent writer makes it fail and the next
round recomputes) only when what it says changed: the same verdict on every
regeneration costs no API call, and ``lastTransitionTime`` moves only when a condition's
status does. A change of verdict is also logged, once: a refusal as a warning naming the
object and why, its recovery as info. Messages are bounded by ``policy.MAX_MESSAGE``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from meshca.kube.policy import (
    CONTROLLER_NAME,
    GATEWAY_GROUP,
    MESHCA_GROUP,
    Condition,
    ObjectRef,
    Verdict,
)
from meshca.util.logger import get_logger
from meshca.util.logs import shorten

logger = get_logger("meshca.kube.status")

# (path of the status subresource, merge patch) -> awaitable; raises on a refusal
PatchStatus = Callable[[str, Mapping[str, Any]], Awaitable[object]]

_PLURALS = {"HTTPRoute": "httproutes", "AccessPolicy": "accesspolicies"}
_GROUPS = {"HTTPRoute": GATEWAY_GROUP, "AccessPolicy": MESHCA_GROUP}


def status_path(obj: Mapping[str, Any]) -> str:
    """The URL path of ``obj``'s status subresource."""
    meta = obj["metadata"]
    plural = _PLURALS[obj["kind"]]
    return (
        f"/apis/{obj['apiVersion']}/namespaces/{meta['namespace']}/{plural}/{meta['name']}/status"
    )


def ref_of(obj: Mapping[str, Any]) -> ObjectRef:
    meta = obj.get("metadata") or {}
    return ObjectRef(str(obj.get("kind")), str(meta.get("namespace")), str(meta.get("name")))


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _conditions(
    wanted: Iterable[Condition], generation: int, previous: Any, now: str
) -> list[dict[str, Any]]:
    """API conditions for ``wanted``; a condition whose status did not change keeps its
    lastTransitionTime."""
    before = {
        c.get("type"): c
        for c in (previous if isinstance(previous, list) else [])
        if isinstance(c, dict)
    }
    out = []
    for condition in wanted:
        status = "True" if condition.status else "False"
        old = before.get(condition.type) or {}
        out.append(
            {
                "type": condition.type,
                "status": status,
                "reason": condition.reason,
                "message": condition.message,
                "observedGeneration": generation,
                "lastTransitionTime": (
                    old.get("lastTransitionTime") if old.get("status") == status else None
                )
                or now,
            }
        )
    return out


def _same(a: Any, b: Any) -> bool:
    """Conditions lists equal but for lastTransitionTime (and order)."""

    def key(conditions: Any) -> list[tuple[Any, ...]]:
        items = conditions if isinstance(conditions, list) else []
        return sorted(
            tuple(
                str(c.get(k)) for k in ("type", "status", "reason", "message", "observedGeneration")
            )
            for c in items
            if isinstance(c, dict)
        )

    return key(a) == key(b)


def _route_status(
    obj: Mapping[str, Any], verdict: Verdict | None, now: str
) -> dict[str, Any] | None:
    status = obj.get("status") if isinstance(obj.get("status"), dict) else {}
    current = [p for p in (status or {}).get("parents") or [] if isinstance(p, dict)]
    others = [p for p in current if p.get("controllerName") != CONTROLLER_NAME]
    mine = [p for p in current if p.get("controllerName") == CONTROLLER_NAME]
    wanted = []
    for parent in verdict.parents if verdict is not None else ():
        previous = next((p for p in mine if p.get("parentRef") == dict(parent.parent_ref)), {})
        wanted.append(
            {
                "parentRef": dict(parent.parent_ref),
                "controllerName": CONTROLLER_NAME,
                "conditions": _conditions(
                    parent.conditions,
                    verdict.generation if verdict else 0,
                    previous.get("conditions"),
                    now,
                ),
            }
        )
    unchanged = len(wanted) == len(mine) and all(
        any(
            w["parentRef"] == m.get("parentRef") and _same(w["conditions"], m.get("conditions"))
            for m in mine
        )
        for w in wanted
    )
    if unchanged:
        return None
    return {"parents": others + wanted}


def _policy_status(
    obj: Mapping[str, Any], verdict: Verdict | None, now: str
) -> dict[str, Any] | None:
    if verdict is None:
        return None  # not in the mesh's namespaces: not meshca's to judge
    status = obj.get("status") if isinstance(obj.get("status"), dict) else {}
    previous = (status or {}).get("conditions")
    wanted = _conditions(verdict.conditions, verdict.generation, previous, now)
    if _same(wanted, previous):
        return None
    return {"conditions": wanted}


def desired_status(
    obj: Mapping[str, Any], verdict: Verdict | None, now: str | None = None
) -> dict[str, Any] | None:
    """The merge patch that makes ``obj``'s status say ``verdict``, or None when it already
    does. An HTTPRoute without a verdict loses meshca's entries (if it has any)."""
    when = now or _now()
    if obj.get("kind") == "HTTPRoute":
        body = _route_status(obj, verdict, when)
    elif obj.get("kind") == "AccessPolicy":
        body = _policy_status(obj, verdict, when)
    else:
        return None
    if body is None:
        return None
    meta = obj.get("metadata") or {}
    return {"metadata": {"resourceVersion": meta.get("resourceVersion")}, "status": body}


class StatusWriter:
    """Writes verdicts to objects' status through ``patch`` and logs each change of verdict
    once.

    ``write`` is one round over the objects as last seen (with their status);
    ``submit`` hands the latest objects and verdicts to ``run``, the loop a server
    runs, which writes only the newest of several submitted meanwhile and retries a
    round that could not write everything after ``retry`` seconds. What it remembers is
    bounded by the objects present.
    """

    def __init__(self, patch: PatchStatus, *, retry: float = 5.0) -> None:
        self._patch = patch
        self.retry = retry
        self._logged: dict[ObjectRef, Verdict] = {}
        # the resourceVersion each object's status was last written from: until the watch
        # brings the object back with what was written, it is not written again
        self._written: dict[ObjectRef, str] = {}
        self._failed = 0
        self._pending: tuple[list[Mapping[str, Any]], list[Verdict]] | None = None
        self._wake = asyncio.Event()

    async def write(self, objects: Iterable[Mapping[str, Any]], verdicts: Iterable[Verdict]) -> int:
        """Bring every object's status in line with its verdict; returns how many were
        patched. A refused patch (a conflict, the object gone, the API server away) is
        logged and retried later: it never stops the others."""
        by_ref = {v.ref: v for v in verdicts}
        present: set[ObjectRef] = set()
        patched = failed = 0
        for obj in objects:
            ref = ref_of(obj)
            present.add(ref)
            verdict = by_ref.get(ref)
            if verdict is not None:
                self._log(verdict)
            version = str((obj.get("metadata") or {}).get("resourceVersion"))
            if self._written.get(ref) == version:
                continue
            body = desired_status(obj, verdict)
            if body is None:
                continue
            try:
                await self._patch(status_path(obj), body)
            except Exception as exc:  # one object's status never stops the rest
                failed += 1
                logger.info(
                    "status of %s not written (tried again later): %s", ref, shorten(str(exc))
                )
                continue
            self._written[ref] = version
            patched += 1
        for gone in set(self._logged) - present:
            del self._logged[gone]
        for gone in set(self._written) - present:
            del self._written[gone]
        self._failed = failed
        return patched

    def submit(self, objects: Iterable[Mapping[str, Any]], verdicts: Iterable[Verdict]) -> None:
        """The objects and verdicts of the newest mesh, for ``run`` to write."""
        self._pending = (list(objects), list(verdicts))
        self._wake.set()

    async def run(self) -> None:
        last: tuple[list[Mapping[str, Any]], list[Verdict]] | None = None
        while True:
            with contextlib.suppress(TimeoutError):  # a timeout: retry the last round
                await asyncio.wait_for(self._wake.wait(), self.retry if self._failed else None)
            self._wake.clear()
            if self._pending is not None:
                last, self._pending = self._pending, None
            if last is not None:
                await self.write(*last)

    def _log(self, verdict: Verdict) -> None:
        before = self._logged.get(verdict.ref)
        if before is not None and before.problems() == verdict.problems():
            return
        self._logged[verdict.ref] = verdict
        if not verdict.accepted:
            logger.warning("%s not applied: %s", verdict.ref, "; ".join(verdict.problems()))
        elif before is not None and not before.accepted:
            logger.info("%s applied again", verdict.ref)
