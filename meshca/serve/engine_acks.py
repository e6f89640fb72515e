"""An :class:`~meshca.rotation.acks.AckTracker` over the xDS engine's public view.

The engine marks a stream unsettled the moment a store event wakes it, and settled
again only when the proxy has ACKed what was pushed after that. So once the store's
current secrets satisfy a predicate, the proxies that have not acknowledged it are
exactly the unsettled streams; while the store itself does not satisfy it, every
stream is still waited for.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from typing import Protocol

from meshca.rotation.acks import AckedSecret, SecretPredicate
from meshca.store import SecretStore
from meshca.xds.engine import StreamStatus, XdsEngine


class _StreamView(Protocol):
    @property
    def caller(self) -> str: ...

    @property
    def node_id(self) -> str: ...


class EngineView(Protocol):
    """What is read of :class:`meshca.xds.engine.XdsEngine`."""

    def streams(self) -> Sequence[_StreamView]: ...

    def unsettled_proxies(self) -> set[tuple[str, str]]: ...

    def refusing_proxies(self) -> set[tuple[str, str]]: ...

    def proxies(self) -> Sequence[tuple[str, str]]: ...

    async def wait_pushed(self, timeout: float) -> None: ...


def describe(stream: _StreamView) -> str:
    """A proxy as an operator knows it; Envoy opens one stream per secret, so a proxy's
    streams share this name."""
    return named(stream.node_id, stream.caller)


def named(node_id: str, caller: str) -> str:
    return f"{node_id or '(no node id)'} ({caller})"


class EngineAcks:
    def __init__(self, engine: EngineView, store: SecretStore) -> None:
        self.engine = engine
        self.store = store
        # counted again only when the engine's list of proxies is a new one
        self._connected: tuple[object, dict[str, int]] = (None, {})

    def _store_satisfies(self, predicate: SecretPredicate) -> bool:
        if not predicate(AckedSecret("trust bundle", bundle=self.store.bundle())):
            return False
        for spiffe_id in self.store.identities():
            svid = self.store.cached(spiffe_id)
            if svid is not None and not predicate(AckedSecret(str(spiffe_id), chain=svid.chain)):
                return False
        return True

    def unacked(self, predicate: SecretPredicate) -> list[str]:
        if not self._store_satisfies(predicate):
            return sorted({describe(stream) for stream in self.engine.streams()})
        return sorted({named(*proxy) for proxy in self.engine.unsettled_proxies()})

    def refusing(self) -> list[str]:
        """Streams at rest whose last push was NACKed: a stream about to push new content
        (or writing it) may still accept that."""
        return sorted({named(*proxy) for proxy in self.engine.refusing_proxies()})

    def connected(self) -> dict[str, int]:
        # A stream that has asked for nothing yet was sent nothing: not one to wait for.
        proxies = self.engine.proxies()
        seen, counted = self._connected
        if seen is not proxies:
            counted = dict(Counter(named(node, who) for node, who in proxies))
            self._connected = (proxies, counted)
        return dict(counted)

    async def pushed(self, timeout: float) -> None:
        await self.engine.wait_pushed(timeout)


class EveryStream:
    """The streams of several engines seen as one (what root rotation waits on): a
    proxy on ADS holds the trust bundle as surely as one on SDS."""

    def __init__(self, engines: Sequence[XdsEngine]) -> None:
        self.engines = tuple(engines)
        self._proxies: tuple[tuple[object, ...], list[tuple[str, str]]] = ((), [])

    def streams(self) -> list[StreamStatus]:
        return [stream for engine in self.engines for stream in engine.streams()]

    def unsettled_proxies(self) -> set[tuple[str, str]]:
        return set().union(*(engine.unsettled_proxies() for engine in self.engines))

    def refusing_proxies(self) -> set[tuple[str, str]]:
        return set().union(*(engine.refusing_proxies() for engine in self.engines))

    def proxies(self) -> list[tuple[str, str]]:
        """Every engine's proxies; the same list object while each engine's is."""
        parts = tuple(engine.proxies() for engine in self.engines)
        seen, joined = self._proxies
        if len(seen) != len(parts) or any(a is not b for a, b in zip(seen, parts, strict=False)):
            joined = [proxy for part in parts for proxy in part]
            self._proxies = (parts, joined)
        return joined

    async def wait_pushed(self, timeout: float) -> None:
        await asyncio.gather(*(engine.wait_pushed(timeout) for engine in self.engines))
