"""The agent's Prometheus metrics, read at scrape time: its credential, its streams, its
view of meshca and the SVIDs it holds. The command line gives the agent meshca serve's
metrics registry and HTTP endpoint (``--metrics-listen``), which also count every
CSR-certified SVID as an issuance with backend ``agent``; this module adds the agent's
own collector to that registry."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from meshca.sds.metrics import served_certificates

if TYPE_CHECKING:
    from meshca.agent.runtime import MeshcaAgent

BACKEND = "agent"


class MetricsRegistry(Protocol):
    """Where the agent's collector goes, and who hears about each issuance."""

    @property
    def registry(self) -> CollectorRegistry: ...

    def observe_issue(self, seconds: float, error: BaseException | None) -> None: ...


class MetricsEndpoint(Protocol):
    """The HTTP ``/metrics`` listener."""

    @property
    def port(self) -> int | None: ...

    async def start(self, host: str, port: int) -> int: ...

    async def close(self) -> None: ...


class _AgentCollector(Collector):
    def __init__(self, agent: MeshcaAgent) -> None:
        self.agent = agent

    def collect(self) -> Iterable[Metric]:
        agent = self.agent
        svid = agent.credential.svid
        if svid is not None:
            yield GaugeMetricFamily(
                "meshca_agent_svid_expiry_timestamp_seconds",
                "NotAfter of the agent's own SVID (unix seconds)",
                value=svid.not_after.timestamp(),
            )
        if agent.credential.reattest_by is not None:
            yield GaugeMetricFamily(
                "meshca_agent_reattest_by_timestamp_seconds",
                "when the agent's renewals end and it must attest again (unix seconds)",
                value=agent.credential.reattest_by.timestamp(),
            )
        yield CounterMetricFamily(
            "meshca_agent_svid_renewals",
            "renewals of the agent's own SVID",
            value=float(agent.credential.renewals),
        )
        yield GaugeMetricFamily(
            "meshca_agent_meshca_reachable",
            "1 when the last poll of meshca serve succeeded, else 0 (cached SVIDs are served)",
            value=0.0 if agent.poll_failures else 1.0,
        )
        streams = GaugeMetricFamily(
            "meshca_agent_streams", "open streams on the agent's socket, by API", labels=["api"]
        )
        workload = agent.workload_api.streams if agent.workload_api is not None else 0
        sds = len(agent.sds.engine.streams()) if agent.sds is not None else 0
        streams.add_metric(["workload_api"], float(workload))
        streams.add_metric(["sds"], float(sds))
        yield streams
        yield from served_certificates(agent.store)


def register_agent_collector(registry: CollectorRegistry, agent: MeshcaAgent) -> None:
    registry.register(_AgentCollector(agent))
