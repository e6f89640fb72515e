"""The metrics of the X.509-SVIDs held for serving, read from the secret store at scrape
time: the same two families for ``meshca serve`` and ``meshca agent``, which both serve
from a :class:`~meshca.store.SecretStore`."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from meshca.store import SecretStore


def served_certificates(store: SecretStore) -> Iterator[Metric]:
    """How many SVIDs are held, and when the first of them expires."""
    held = [svid for sid in store.identities() if (svid := store.cached(sid))]
    yield GaugeMetricFamily(
        "meshca_served_certificates",
        "X.509-SVIDs held for serving (one per identity in use)",
        value=float(len(held)),
    )
    if held:
        yield GaugeMetricFamily(
            "meshca_served_certificate_soonest_expiry_timestamp_seconds",
            "NotAfter of the served certificate that expires first (unix seconds)",
            value=min(svid.not_after.timestamp() for svid in held),
        )
