"""JWT-SVIDs on the agent: signed by meshca serve on request, cached per identity and
audience while more than half their life is left, and validated locally against the
trust domain's JWT authorities (which the agent polls with the X.509 bundle)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from meshca.agent.ca_client import CaClient
from meshca.issuer.jwt_svid import JwtError, parse_jwt_bundle, validate_jwt_svid
from meshca.spiffe import SpiffeId

MAX_CACHED = 1024

Key = tuple[SpiffeId, tuple[str, ...]]


class JwtSvids:
    def __init__(self, client: CaClient, bundle: bytes = b"") -> None:
        self.client = client
        self._bundle = bundle
        self._kids: tuple[str, ...] = ()
        self._cache: dict[Key, tuple[str, datetime, datetime]] = {}  # token, issued, exp
        self._listeners: list[Callable[[], None]] = []

    # the JWT bundle ------------------------------------------------------------------
    @property
    def bundle(self) -> bytes:
        return self._bundle or b'{"keys": []}'

    @property
    def kids(self) -> tuple[str, ...]:
        """The key ids of the JWT authorities held (and pushed to every stream): what the
        agent reports at its next poll, meshca serve's signal that a prepared key may sign."""
        return self._kids

    def update_bundle(self, data: bytes) -> None:
        if data and data != self._bundle:
            try:
                kids = tuple(sorted(parse_jwt_bundle(data)))
            except JwtError:
                kids = ()  # nothing usable in it: nothing acknowledged
            self._bundle = data
            for listener in list(self._listeners):
                listener()
            self._kids = kids  # reported only once every stream was told

    def subscribe(self, listener: Callable[[], None]) -> Callable[[], None]:
        self._listeners.append(listener)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return unsubscribe

    # tokens --------------------------------------------------------------------------
    async def svid(self, spiffe_id: SpiffeId, audience: list[str]) -> str:
        key = (spiffe_id, tuple(sorted(set(audience))))
        now = datetime.now(UTC)
        cached = self._cache.get(key)
        if cached is not None and now < cached[1] + (cached[2] - cached[1]) / 2:
            return cached[0]
        token, expires = await asyncio.to_thread(self.client.sign_jwt, spiffe_id, audience)
        if len(self._cache) >= MAX_CACHED:
            self._cache = {k: v for k, v in self._cache.items() if v[2] > now}
            if len(self._cache) >= MAX_CACHED:
                self._cache.clear()
        self._cache[key] = (token, now, expires)
        return token

    def validate(self, token: str, audience: str) -> tuple[SpiffeId, dict[str, Any]]:
        authorities = parse_jwt_bundle(self.bundle)
        if not authorities:
            raise JwtError("no JWT authority is known yet")
        return validate_jwt_svid(token, audience, authorities, self.client.trust_domain)
