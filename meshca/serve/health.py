"""The health policy of ``meshca serve``, and the plaintext health listener.

Policy: SERVING only when the CA is loaded, meshca's own serving certificate (when it
listens on TCP) is valid, and either

* the signing backend is reachable (it reports itself healthy, its signing CA has not
  expired, and the last issuance did not fail), or
* every served certificate is still comfortably valid: more than a quarter of its
  life left, so proxies hold certificates that outlive a backend outage for a while
  and a replica that can still hand them out is worth routing to;

NOT_SERVING otherwise. A proxy sent to a NOT_SERVING replica would get a certificate
that is about to expire, or none at all.

:class:`HealthMonitor` re-evaluates the policy periodically and on events (a
certificate renewed, the bundle changed, an issuance whose outcome differs from the
last one's: a failure, or a success after one) and sets the
status of the overall service ``""`` and of the SDS service on the shared gRPC
``HealthServicer``. The main server and the plaintext health listener
(``--health-listen``, for the kubelet's gRPC probe, which presents no client
certificate) serve that same servicer, so they always agree. With ``backend_service``
it also publishes the signing backend's own state under that name (``meshca.backend``):
SERVING while the backend can sign (reachable, its signing CA valid), NOT_SERVING
during an outage, while the server as a whole may stay SERVING on what it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshca.backends.opened import OpenedBackend
from meshca.issuer import SignerError, SigningAuthority, TrustBundle, X509Svid
from meshca.issuer.policy import issued_at
from meshca.issuer.profile import DEFAULT_SKEW
from meshca.serve.config import DEFAULT_HEALTH_INTERVAL
from meshca.spiffe import SpiffeId
from meshca.store import SecretStore, StoreEvent
from meshca.util.aio import Periodic
from meshca.util.logger import get_logger
from meshca.util.netaddr import format_address

log = get_logger("meshca.health")

COMFORT_FRACTION = 0.25
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class Verdict:
    serving: bool
    reason: str


def life_left(
    svid: X509Svid,
    now: datetime,
    skew: timedelta = DEFAULT_SKEW,
    issued: datetime | None = None,
) -> float:
    """The fraction (0..1) of ``svid``'s life still ahead. Its life starts at issuance:
    ``issued`` when known (the store records it), else NotBefore plus the skew."""
    issued = issued_at(svid.not_before, svid.not_after, requested=issued, skew=skew)
    life = (svid.not_after - issued).total_seconds()
    if life <= 0:
        return 0.0 if now >= svid.not_after else 1.0
    return max(0.0, min(1.0, (svid.not_after - now).total_seconds() / life))


def backend_problem(
    backend: OpenedBackend, now: datetime, last_failure: str | None = None
) -> str | None:
    """Why the backend cannot sign now, or None when it is reachable."""
    health = backend.health
    if health is not None and not health.healthy:
        return f"the signing backend is unreachable ({health.last_error or 'no answer'})"
    if backend.signer is not None:
        try:
            backend.signer.signer.check_can_sign(now)
        except SignerError as exc:
            return str(exc)
    if last_failure is not None:
        return f"the last issuance failed: {last_failure}"
    return None


def evaluate(
    *,
    ca_loaded: bool,
    backend: str | None,
    served: Iterable[tuple[SpiffeId, X509Svid]],
    now: datetime,
    skew: timedelta = DEFAULT_SKEW,
    comfort: float = COMFORT_FRACTION,
    own: tuple[SpiffeId, X509Svid | None] | None = None,
    issued: Mapping[SpiffeId, datetime] | None = None,
) -> Verdict:
    """The policy. ``backend`` is the backend's problem (None: reachable); ``own`` is
    meshca's serving identity and certificate, when it serves TLS; ``issued`` when each
    served certificate was issued, where known."""
    if not ca_loaded:
        return Verdict(False, "no CA is loaded")
    if own is not None:
        own_id, own_svid = own
        if own_svid is None or not own_svid.not_before <= now < own_svid.not_after:
            return Verdict(False, f"meshca's own serving certificate ({own_id}) is not valid")
    if backend is None:
        return Verdict(True, "the signing backend is reachable")
    issued = issued or {}
    short = sorted(
        str(sid) for sid, svid in served if life_left(svid, now, skew, issued.get(sid)) <= comfort
    )
    if not short:
        return Verdict(
            True,
            f"{backend}; every served certificate has more than {comfort:.0%} of its life left",
        )
    shown = ", ".join(short[:3]) + (f" and {len(short) - 3} more" if len(short) > 3 else "")
    return Verdict(False, f"{backend}; {comfort:.0%} or less of its life left: {shown}")


def ca_is_loaded(authority: SigningAuthority | None) -> bool:
    if authority is None:
        return False
    try:
        bundle: TrustBundle = authority.bundle()
    except Exception:
        return False
    return len(bundle) > 0


class HealthMonitor:
    """Applies the policy to one server and publishes it on a gRPC ``HealthServicer``."""

    def __init__(
        self,
        servicer: Any,  # grpc_health.v1.health.aio.HealthServicer (untyped)
        backend: OpenedBackend,
        store: SecretStore,
        *,
        services: Sequence[str] = (),
        backend_service: str | None = None,
        serving_id: SpiffeId | None = None,
        interval: float = DEFAULT_HEALTH_INTERVAL,
        comfort: float = COMFORT_FRACTION,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.servicer = servicer
        self.backend = backend
        self.store = store
        self.services = ("", *services)
        self.backend_service = backend_service
        self.serving_id = serving_id  # meshca's own TLS identity, when it listens on TCP
        self.interval = interval
        self.comfort = comfort
        self.clock = clock
        self.verdict = Verdict(False, "not started")
        self._lock = threading.Lock()
        self._last_failure: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._periodic = Periodic(
            self.evaluate, lambda: self.interval, log=log, what="health evaluation"
        )
        self._unsubscribe: Callable[[], None] | None = None
        self._published: bool | None = None
        self._backend_published: bool | None = None

    @property
    def serving(self) -> bool:
        return self.verdict.serving

    # events ---------------------------------------------------------------------------
    def issue_result(self, seconds: float, error: BaseException | None) -> None:
        """An issuance ended (called from the issuing thread). Re-evaluated only when the
        outcome differs from the last one: a success after a success changes no input of
        the policy, and an evaluation per issuance cost the event loop more than the
        issuance's own bookkeeping."""
        failure = None if error is None else (str(error) or type(error).__name__)
        with self._lock:
            changed = failure != self._last_failure
            self._last_failure = failure
        if changed:
            self._poke()

    def _store_event(self, event: StoreEvent) -> None:
        self._poke()

    def _poke(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop is shutting down
            loop.call_soon_threadsafe(self._periodic.wake)

    # evaluation -----------------------------------------------------------------------
    def check(self) -> Verdict:
        """The policy applied now (no side effects)."""
        now = self.clock()
        with self._lock:
            last_failure = self._last_failure
        backend = backend_problem(self.backend, now, last_failure)
        served: list[tuple[SpiffeId, X509Svid]] = []
        issued: dict[SpiffeId, datetime] = {}
        if backend is not None:  # served certificates matter only while nothing can be signed
            served = [
                (sid, svid) for sid in self.store.identities() if (svid := self.store.cached(sid))
            ]
            issued = {
                sid: schedule[0] for sid, _ in served if (schedule := self.store.renewal(sid))
            }
        own = None
        if self.serving_id is not None:
            own = (self.serving_id, self.store.cached(self.serving_id))
        return evaluate(
            ca_loaded=ca_is_loaded(self.backend.authority),
            backend=backend,
            served=served,
            now=now,
            skew=self.store.issuer.policy.skew,
            comfort=self.comfort,
            own=own,
            issued=issued,
        )

    async def evaluate(self) -> Verdict:
        """Apply the policy and publish the status when it changed."""
        verdict = self.check()
        self.verdict = verdict
        if verdict.serving != self._published:
            status = SERVING if verdict.serving else NOT_SERVING
            for service in self.services:
                await self.servicer.set(service, status)
            if self._published is not None or not verdict.serving:
                level = logging.INFO if verdict.serving else logging.WARNING
                log.log(
                    level,
                    "health: %s: %s",
                    "SERVING" if verdict.serving else "NOT_SERVING",
                    verdict.reason,
                    extra={"health": "serving" if verdict.serving else "not_serving"},
                )
            self._published = verdict.serving
        if self.backend_service is not None:
            reachable = backend_problem(self.backend, self.clock()) is None
            if reachable != self._backend_published:
                await self.servicer.set(self.backend_service, SERVING if reachable else NOT_SERVING)
                self._backend_published = reachable
        return verdict

    # lifecycle --------------------------------------------------------------------------
    async def start(self) -> Verdict:
        """Publish the first verdict now, then keep it current."""
        self._loop = asyncio.get_running_loop()
        self._unsubscribe = self.store.subscribe(self._store_event)
        verdict = await self.evaluate()
        self._periodic.start()
        return verdict

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        await self._periodic.stop()
        self._loop = None


async def start_health_listener(servicer: Any, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """A plaintext gRPC server with the health service only. Returns it and its port;
    OSError when the address cannot be used."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])  # the port is ours alone
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    address = format_address(host, port)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if not bound:
        raise OSError(f"cannot listen on {address}: the address is in use or not available")
    await server.start()
    return server, bound
