"""SVIDs that never outlive the client certificate of the caller they are served to.

Over mutual TLS, the store's SVID of an identity is served only while it ends before the
caller's certificate does; otherwise an SVID cut to end with that certificate is issued
(and kept for reuse), so a stolen SVID cannot obtain a longer-lived one, and so on for
ever. Unix-socket callers have no certificate and get the store's SVID.
"""

from __future__ import annotations

from collections import OrderedDict
from datetime import UTC, datetime, timedelta

from meshca.issuer import X509Svid
from meshca.issuer.errors import ChainError
from meshca.spiffe import SpiffeId
from meshca.store import SecretStore
from meshca.util.aio import call_inline_or_in_thread
from meshca.xds.auth import Caller

MAX_BOUNDED_SVIDS = 1024  # SVIDs cut short for callers, kept for reuse (oldest dropped)


class BoundedSvids:
    """SVIDs that end no later than the credential of the caller they are served to."""

    def __init__(self, store: SecretStore, max_entries: int = MAX_BOUNDED_SVIDS) -> None:
        self.store = store
        self.max_entries = max_entries
        # (identity, caller's NotAfter) -> (the store's SVID it was cut from, the SVID)
        self._issued: OrderedDict[tuple[SpiffeId, datetime], tuple[X509Svid, X509Svid]] = (
            OrderedDict()
        )

    async def svid(self, caller: Caller, identity: SpiffeId) -> X509Svid:
        """The store's SVID of ``identity``, or one cut to end with ``caller``'s
        certificate when the store's would outlive it."""
        svid = await self.store.svid(identity)
        limit = caller.not_after
        if limit is None or svid.not_after <= limit:
            return svid
        key = (identity, limit)
        held = self._issued.get(key)
        if held is not None and held[0] is svid:
            self._issued.move_to_end(key)
            return held[1]
        # Whole seconds, rounded down: NotAfter is written in seconds and must not pass limit.
        ttl = timedelta(seconds=int((limit - datetime.now(UTC)).total_seconds()))
        if ttl <= timedelta(0):
            raise ChainError(f"the client certificate of caller {caller} has expired")
        dns = self.store.dns_names.get(identity, ())
        issuer = self.store.issuer
        bounded = await call_inline_or_in_thread(
            issuer.issues_quickly(), issuer.issue, identity, ttl=ttl, dns_names=dns
        )
        self._issued[key] = (svid, bounded)
        while len(self._issued) > self.max_entries:
            self._issued.popitem(last=False)
        return bounded
