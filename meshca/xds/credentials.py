"""What an mTLS caller's certificate is good for, and for how long.

A client certificate is a credential with an end: its NotAfter, and the roots of the
trust bundle it chains to. Whatever it obtains must end with it, or a stolen SVID
would renew itself for ever (each served SVID authenticating the next call):

* :func:`meshca.xds.auth.credential_problem` (checked when each call is authenticated):
  why a caller's certificate no longer authenticates it (expired, or no longer chaining
  to the current bundle after a root rotation);
* :class:`CredentialWatch`: ends a stream when that happens while it is open;
* :class:`meshca.sds.bounded.BoundedSvids`: the SVID served to a caller never outlives
  the certificate that asked for it (a shorter one is issued when the store's would).

Unix-socket callers carry no certificate: the kernel authenticates every connection
afresh, so they get the store's SVIDs with their full lifetime.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import grpc
import grpc.aio

from meshca.issuer.bundle import TrustBundle
from meshca.util.logger import get_logger
from meshca.xds.auth import Caller, credential_problem

log = get_logger("meshca.sds")

# How long a stream whose certificate stopped chaining to the bundle (not expired) is kept
# after the bundle change, so that it receives that bundle before it ends.
BUNDLE_CHANGE_GRACE = 5.0


class CredentialWatch:
    """Ends a caller's stream when its client certificate expires or stops chaining to
    the trust bundle. ``bundle`` gives the current bundle; whoever changes it calls
    :meth:`bundle_changed` (once for every stream)."""

    def __init__(self, bundle: Callable[[], TrustBundle]) -> None:
        self.bundle = bundle
        self._bundle_changed = asyncio.Event()

    def bundle_changed(self) -> None:
        """Check every watched stream's certificate against the new bundle."""
        self._bundle_changed.set()
        self._bundle_changed = asyncio.Event()

    async def _lapse(self, caller: Caller) -> str:
        """Returns why the credential lapsed, when it does."""
        while True:
            changed = self._bundle_changed
            now = datetime.now(UTC)
            problem = credential_problem(caller, self.bundle(), now)
            if problem is not None:
                return problem
            assert caller.not_after is not None
            left = (caller.not_after - now).total_seconds()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), max(left, 0.0) + 0.001)

    @staticmethod
    def _expired(caller: Caller) -> bool:
        return caller.not_after is not None and caller.not_after <= datetime.now(UTC)

    async def serve(
        self,
        caller: Caller,
        call: Awaitable[None],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        """Run ``call`` (a stream) until it ends or the caller's credential lapses; then
        the stream ends with UNAUTHENTICATED."""
        if not caller.chain:
            await call
            return
        served = asyncio.ensure_future(call)
        lapse = asyncio.ensure_future(self._lapse(caller))
        try:
            await asyncio.wait((served, lapse), return_when=asyncio.FIRST_COMPLETED)
            if lapse.done() and not served.done() and not self._expired(caller):
                # A root rotation's last step took the caller's root away: the push of
                # that bundle is already on its way; let it arrive, then end the stream.
                await asyncio.wait((served,), timeout=BUNDLE_CHANGE_GRACE)
        finally:
            if not served.done():
                served.cancel()
                with contextlib.suppress(asyncio.CancelledError, grpc.aio.AbortError):
                    await served
            lapse.cancel()
        if lapse.done() and not lapse.cancelled():
            reason = lapse.result()
            log.warning("ended the stream of caller %s: %s", caller, reason)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"caller {caller}: {reason}")
        served.result()
