"""List-watch of one kind: the cache of its objects, kept current as client-go's reflector
keeps it.

1. List every object (in pages), and remember the list's resourceVersion.
2. Watch from that version with bookmarks (``allowWatchBookmarks``): each event updates
   the cache and the version; a bookmark only moves the version, so a reconnect resumes
   from a recent point instead of one the server no longer remembers.
3. When the watch ends (the server's ``timeoutSeconds``, a dropped connection, an API
   server restart), watch again from the last version, after a backoff if it failed.
4. ``410 Gone`` (the version was compacted away) means events were lost: list again and
   replace the whole cache in one step, so deletions missed in between are applied and
   nobody ever sees a cache with part of the objects missing.

``synced`` turns true once the first list is in, and stays true: during an outage or a
re-list the cache keeps the last state it knew. An optional kind (a CRD that is not
installed) counts as an empty list, and is looked for again after a backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx2 as httpx

from meshca.kube.client import KubeApi, KubeApiError, status_error
from meshca.kube.objects import Kind, Unusable, key_of
from meshca.util.logger import get_logger
from meshca.util.logs import shorten
from meshca.util.retry import Backoff

log = get_logger("meshca.kube")

PAGE_SIZE = 500
WATCH_SECONDS = (240, 360)  # the server ends each watch in this range (spread)
RETRY = Backoff(initial=0.5, maximum=10.0)
QUICK_WATCH = 1.0  # seconds: a watch the server ends sooner is not reopened at once
# Failures that mean "try again later": the API server is restarting or unreachable.
TRANSIENT = (httpx.HTTPError, OSError, asyncio.TimeoutError)


class Expired(Exception):
    """The version to resume from is gone (410): list again."""


class Reflector:
    """The objects of one kind (projected by ``kind.project``), by ``ns/name``.
    ``on_change`` runs on the event loop after each change to the cache."""

    def __init__(
        self,
        api: KubeApi,
        kind: Kind,
        on_change: Callable[[], None],
        *,
        retry: Backoff = RETRY,
        watch_seconds: tuple[int, int] = WATCH_SECONDS,
        on_unusable: Callable[[Kind, str, str], None] | None = None,
    ) -> None:
        self.api = api
        self.kind = kind
        self.on_change = on_change
        self.retry = retry
        self.watch_seconds = watch_seconds
        self.on_unusable = on_unusable
        self.items: dict[str, Any] = {}
        self.resource_version: str | None = None
        self.synced = asyncio.Event()
        self.installed = True
        self.lists = 0  # how many times the whole collection was listed
        self.expirations = 0  # watches answered 410 Gone
        self.failures = 0  # consecutive failed attempts (0 once a watch is open)

    async def run(self) -> None:
        """List and watch until cancelled; never raises for the API's sake."""
        while True:
            try:
                if self.resource_version is None:
                    await self._list()
                started = time.monotonic()
                await self._watch()
                self.failures = 0
                if time.monotonic() - started < QUICK_WATCH:  # closed at once: no hot loop
                    await asyncio.sleep(self.retry.delay(0))
            except Expired:
                self.expirations += 1
                log.info("%s watch expired (410 Gone): listing again", self.kind.name)
                self.resource_version = None
            except KubeApiError as exc:
                if exc.status == 404 and self.kind.optional:
                    self._absent()
                elif exc.status == 410:
                    self.expirations += 1
                    self.resource_version = None
                    continue
                else:
                    self._failed(exc)
                await self._pause()
            except TRANSIENT as exc:
                self._failed(exc)
                await self._pause()

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        text = shorten(str(exc) or type(exc).__name__, 300)
        level = logging.WARNING if self.failures in (1, 10) or self.failures % 100 == 0 else 0
        if level:
            log.log(
                level,
                "%s list-watch failed (%d in a row), retrying: %s",
                self.kind.name,
                self.failures,
                text,
            )

    async def _pause(self) -> None:
        await asyncio.sleep(self.retry.delay(max(self.failures - 1, 0)))

    def _absent(self) -> None:
        """An optional kind whose API is not served: empty until it is."""
        if self.installed:
            log.info(
                "%s: %s is not served by the API server (CRD not installed): none applied "
                "until it is",
                self.kind.name,
                self.kind.path,
            )
        self.installed = False
        self.failures = min(self.failures + 1, 7)  # look again every ~30 s at most
        self._replace({})
        self.resource_version = None

    def _project(self, obj: Mapping[str, Any]) -> tuple[str, Any] | None:
        try:
            return key_of(obj), self.kind.project(obj)
        except Unusable as exc:
            if self.on_unusable is not None:
                name = "?"
                with contextlib.suppress(Unusable):
                    name = key_of(obj)
                self.on_unusable(self.kind, name, str(exc))
            return None

    def _replace(self, items: dict[str, Any]) -> None:
        changed = items != self.items
        self.items = items
        self.synced.set()
        if changed:
            self.on_change()

    async def _list(self) -> None:
        items: dict[str, Any] = {}
        params = {"limit": str(PAGE_SIZE)}
        if self.kind.label_selector:
            params["labelSelector"] = self.kind.label_selector
        while True:
            try:
                page = await self.api.get(self.kind.path, params)
            except KubeApiError as exc:
                if exc.status == 410 and "continue" in params:  # the page token expired
                    return await self._list()
                raise
            for obj in page.get("items") or []:
                if isinstance(obj, Mapping) and (found := self._project(obj)) is not None:
                    items[found[0]] = found[1]
            metadata = page.get("metadata") or {}
            token = metadata.get("continue")
            if not token:
                break
            params["continue"] = str(token)
        self.lists += 1
        if not self.installed:
            log.info("%s: the API server now serves %s", self.kind.name, self.kind.path)
        self.installed = True
        self.resource_version = str(metadata.get("resourceVersion") or "") or None
        self._replace(items)

    async def _watch(self) -> None:
        seconds = random.randint(*self.watch_seconds)
        params = {
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(seconds),
        }
        if self.resource_version:
            params["resourceVersion"] = self.resource_version
        if self.kind.label_selector:
            params["labelSelector"] = self.kind.label_selector
        async with self.api.watch(self.kind.path, params, timeout=seconds + 30.0) as events:
            self.failures = 0
            async for event in events:
                self._apply(event)

    def _apply(self, event: Mapping[str, Any]) -> None:
        kind = event.get("type")
        obj = event["object"]
        if kind == "ERROR":
            error = status_error(obj)
            if error.status == 410:
                raise Expired()
            raise error
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if kind in ("ADDED", "MODIFIED"):
            found = self._project(obj)
            if found is not None:
                key, record = found
                if self.items.get(key) != record:
                    self.items[key] = record
                    self.on_change()
            else:  # an object that became unusable is dropped, not kept stale
                self._drop(obj)
        elif kind == "DELETED":
            self._drop(obj)
        if version:
            self.resource_version = str(version)

    def _drop(self, obj: Mapping[str, Any]) -> None:
        try:
            key = key_of(obj)
        except Unusable:
            return
        if self.items.pop(key, None) is not None:
            self.on_change()
