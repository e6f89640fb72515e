"""Prometheus metrics of ``meshca serve``, and the plain-HTTP ``/metrics`` endpoint.

Every collector lives in the :class:`Metrics` object's own ``CollectorRegistry``: importing
this module registers nothing globally, and two servers in one process (tests, benches)
keep separate numbers.

Events are counted as they happen (an issuance, a push-to-ACK latency sample); state is
read when scraped (streams, served certificates, CA expiry, health), from the objects
that own it, so nothing is counted twice and nothing drifts.

=================================================================  ==========================
metric                                                             from
=================================================================  ==========================
``meshca_certificates_issued_total{backend,result}``               each issuance
``meshca_certificate_issue_seconds{backend}`` (histogram)          each issuance (key + sign)
``meshca_backend_errors_total{backend,error}``                     failed issuances
``meshca_backend_healthy{backend}``                                backends that report it
``meshca_xds_streams{service,kind}``                               open streams (sotw/delta)
``meshca_xds_pushes_total{type}``, ``..._acks_total``,             the xDS engine's counters
``..._nacks_total``, ``..._stale_nonces_total``, ``..._refusals``
``meshca_xds_push_to_ack_seconds`` (histogram)                     each ACK
``meshca_served_certificates``                                     the secret store
``meshca_served_certificate_soonest_expiry_timestamp_seconds``     the secret store
``meshca_signing_ca_expiry_timestamp_seconds``                     the signing CA's NotAfter
``meshca_trust_bundle_soonest_expiry_timestamp_seconds``           the bundle's roots
``meshca_health_serving``                                          the health policy
=================================================================  ==========================
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter as Tally
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from meshca import __version__
from meshca.backends.errors import BackendError, BackendUnavailable
from meshca.backends.opened import OpenedBackend
from meshca.issuer import (
    CsrError,
    IssuerError,
    SignerError,
    TtlError,
)
from meshca.sds.metrics import served_certificates
from meshca.store import SecretStore
from meshca.util.logger import get_logger
from meshca.xds.stats import XdsStats

log = get_logger("meshca.metrics")

ISSUE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ACK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STREAM_KINDS = ("sotw", "delta")
# Refusals by issuance policy (a TTL over the maximum, a bad CSR) are not backend errors.
POLICY_ERRORS: tuple[type[Exception], ...] = (TtlError, CsrError)
# The classic text format, which every Prometheus version reads (meshca's metric names
# need none of the newer format's escaping).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
HTTP_READ_TIMEOUT = 10.0
HTTP_MAX_HEAD = 16 * 1024


def error_kind(error: BaseException) -> str:
    """A small, fixed set of label values for a failed issuance."""
    if isinstance(error, BackendUnavailable):
        return "unavailable"
    if isinstance(error, BackendError):
        return "refused"
    if isinstance(error, SignerError):
        return "signer"
    if isinstance(error, IssuerError):
        return "invalid"
    return "internal"


class StatusView(Protocol):
    """What of a stream the metrics read (``meshca.xds.engine.StreamStatus``)."""

    @property
    def kind(self) -> str: ...


class StreamSource(Protocol):
    """An xDS engine: the resource types it serves, and its open streams."""

    @property
    def sources(self) -> Mapping[str, Any]: ...

    def streams(self) -> Sequence[StatusView]: ...


class HealthView(Protocol):
    @property
    def serving(self) -> bool: ...


def _short_type(type_url: str) -> str:
    """``type.googleapis.com/envoy.extensions...v3.Secret`` -> ``Secret``."""
    return type_url.rsplit("/", 1)[-1].rsplit(".", 1)[-1] or type_url


def _timestamp(moment: Any) -> float:
    return float(moment.timestamp())


class _StateCollector(Collector):
    """Reads the server's state at scrape time."""

    def __init__(
        self,
        backend: str,
        stats: XdsStats,
        engines: Mapping[str, StreamSource],
        store: SecretStore,
        opened: OpenedBackend,
        health: HealthView | None,
    ) -> None:
        self.backend = backend
        self.stats = stats
        self.engines = dict(engines)
        self.store = store
        self.opened = opened
        self.health = health

    def collect(self) -> Iterable[Metric]:
        yield from self._xds()
        yield from served_certificates(self.store)
        yield from self._ca()
        if self.health is not None:
            yield GaugeMetricFamily(
                "meshca_health_serving",
                "1 while the health service reports SERVING (see the health policy), else 0",
                value=1.0 if self.health.serving else 0.0,
            )
        if self.opened.health is not None:
            family = GaugeMetricFamily(
                "meshca_backend_healthy",
                "1 while the signing backend answers, 0 during an outage",
                labels=["backend"],
            )
            family.add_metric([self.backend], 1.0 if self.opened.health.healthy else 0.0)
            yield family

    def _xds(self) -> Iterable[Metric]:
        stats = self.stats
        streams = GaugeMetricFamily(
            "meshca_xds_streams",
            "open xDS streams, by service (sds, ads) and kind (sotw, delta)",
            labels=["service", "kind"],
        )
        for service, engine in sorted(self.engines.items()):
            kinds = Tally(status.kind for status in engine.streams())
            for kind in sorted({*STREAM_KINDS, *kinds}):
                streams.add_metric([service, kind], float(kinds.get(kind, 0)))
        yield streams
        served = {url for engine in self.engines.values() for url in engine.sources}
        for name, help_text, value in (
            ("meshca_xds_streams_opened", "xDS streams opened", stats.streams_opened),
            ("meshca_xds_requests", "xDS discovery requests received", stats.requests),
            ("meshca_xds_fetches", "unary FetchSecrets calls", stats.fetches),
            (
                "meshca_xds_auth_failures",
                "xDS calls refused as UNAUTHENTICATED",
                stats.auth_failures,
            ),
        ):
            yield CounterMetricFamily(name, help_text, value=float(value))
        for name, help_text, tally in (
            ("meshca_xds_pushes", "xDS responses sent (pushes), by resource type", stats.responses),
            ("meshca_xds_acks", "xDS responses acknowledged, by resource type", stats.acks),
            ("meshca_xds_nacks", "xDS responses rejected (NACK), by resource type", stats.nacks),
            (
                "meshca_xds_stale_nonces",
                "requests ignored for a stale nonce, by resource type",
                stats.stale_nonces,
            ),
        ):
            counter = CounterMetricFamily(name, help_text, labels=["type"])
            counts = dict.fromkeys(served, 0) | dict(tally)  # every served type, from 0
            for type_url, value in sorted(counts.items()):
                counter.add_metric([_short_type(type_url)], float(value))
            yield counter
        refusals = CounterMetricFamily(
            "meshca_xds_refusals", "xDS requests refused, by gRPC status code", labels=["code"]
        )
        for code, value in sorted(dict(stats.refusals).items()):
            refusals.add_metric([code], float(value))
        yield refusals

    def _ca(self) -> Iterable[Metric]:
        if self.opened.signer is not None:
            signer = self.opened.signer.signer
            expiry = GaugeMetricFamily(
                "meshca_signing_ca_expiry_timestamp_seconds",
                "NotAfter of the CA that signs the certificates (unix seconds)",
                labels=["backend"],
            )
            expiry.add_metric([self.backend], _timestamp(signer.not_after))
            yield expiry
        bundle = self.store.bundle()
        yield GaugeMetricFamily(
            "meshca_trust_bundle_roots", "root certificates in the bundle", value=float(len(bundle))
        )
        if len(bundle):
            yield GaugeMetricFamily(
                "meshca_trust_bundle_soonest_expiry_timestamp_seconds",
                "NotAfter of the bundle's root that expires first (unix seconds)",
                value=min(_timestamp(r.not_valid_after_utc) for r in bundle),
            )


class Metrics:
    """The collectors of one server, in their own registry."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.registry = CollectorRegistry()
        self.issued = Counter(
            "meshca_certificates_issued",
            "X.509-SVID issuances, by backend and result (success or failure)",
            ["backend", "result"],
            registry=self.registry,
        )
        self.issue_seconds = Histogram(
            "meshca_certificate_issue_seconds",
            "time to issue an X.509-SVID: key generation and signing",
            ["backend"],
            buckets=ISSUE_BUCKETS,
            registry=self.registry,
        )
        self.backend_errors = Counter(
            "meshca_backend_errors",
            "failed issuances the signing backend caused, by kind "
            "(unavailable, refused, signer, invalid, internal)",
            ["backend", "error"],
            registry=self.registry,
        )
        self.ack_seconds = Histogram(
            "meshca_xds_push_to_ack_seconds",
            "time from sending an xDS response to its ACK",
            buckets=ACK_BUCKETS,
            registry=self.registry,
        )
        info = GaugeMetricFamily("meshca_build_info", "meshca version", labels=["version"])
        info.add_metric([__version__], 1.0)
        self.registry.register(_Constant([info]))
        # Both series exist from the start, at 0; the children are looked up once, not
        # on every issuance.
        self._issued_success = self.issued.labels(backend, "success")
        self._issued_failure = self.issued.labels(backend, "failure")
        self._issue_seconds = self.issue_seconds.labels(backend)

    def observe_issue(self, seconds: float, error: BaseException | None) -> None:
        """An issuance ended (thread-safe; an :data:`meshca.issuer.authority.IssueObserver`)."""
        (self._issued_success if error is None else self._issued_failure).inc()
        self._issue_seconds.observe(seconds)
        if error is not None and not isinstance(error, POLICY_ERRORS):
            self.backend_errors.labels(self.backend, error_kind(error)).inc()

    def watch(
        self,
        *,
        stats: XdsStats,
        engines: Mapping[str, StreamSource],
        store: SecretStore,
        backend: OpenedBackend,
        health: HealthView | None = None,
    ) -> None:
        """Read the server's state at scrape time, and time every ACK."""
        stats.ack_latency.observers.append(self.ack_seconds.observe)
        self.registry.register(
            _StateCollector(self.backend, stats, engines, store, backend, health)
        )

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)


class _Constant(Collector):
    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return iter(self._metrics)


# --- /metrics over plain HTTP ----------------------------------------------------------------


def _response(status: str, body: bytes, content_type: str, extra: str = "") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class MetricsServer:
    """``GET /metrics`` over HTTP/1.1 on the server's own event loop, so a scrape reads
    the server's state from the thread that changes it. One request per connection."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._server: asyncio.Server | None = None
        self.port: int | None = None

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._handle, host, port, limit=HTTP_MAX_HEAD)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HTTP_READ_TIMEOUT)
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return  # a slow, truncated or oversized request: just close
            writer.write(self._answer(head))
            await asyncio.wait_for(writer.drain(), HTTP_READ_TIMEOUT)
        except (ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1)

    def _answer(self, head: bytes) -> bytes:
        text = "text/plain; charset=utf-8"
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return _response("400 Bad Request", b"bad request\n", text)
        method, target = parts[0], parts[1]
        if target.split("?", 1)[0] != "/metrics":
            return _response("404 Not Found", b"not found: try /metrics\n", text)
        if method not in ("GET", "HEAD"):
            return _response("405 Method Not Allowed", b"use GET\n", text, "Allow: GET, HEAD\r\n")
        try:
            body = self.metrics.exposition()
        except Exception:
            log.exception("collecting metrics failed")
            return _response("500 Internal Server Error", b"collecting metrics failed\n", text)
        answer = _response("200 OK", body, CONTENT_TYPE)
        return answer[: len(answer) - len(body)] if method == "HEAD" else answer
