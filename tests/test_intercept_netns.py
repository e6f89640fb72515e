"""Intercept capture for real: iptables redirects an app's connection to a service's
ClusterIP into Envoy's outbound listener on 15001, whose ``original_dst`` filter
recovers the address the app dialled and picks that service's filter chain.

Everything runs in a network namespace the test creates (so the rules touch nothing
else, and the bookstore's fixed ports are free): its loopback interface carries the
service and workload addresses (127.0.0.0/8). bookbuyer's Envoy runs in intercept mode;
the two bookstore versions' Envoys in explicit mode next to it. meshca runs outside
the namespace and serves every Envoy over its Unix socket (a path in the file system,
reachable from any network namespace); all bootstraps come from
``meshca bootstrap --ads``.

Needs root, ``ip netns`` and a working ``iptables`` (or ``iptables-nft`` /
``iptables-legacy``) with the nat table; otherwise the test is skipped and says which
of these is missing.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.envoy_harness import (
    BOOKSTORE_MESH,
    EnvoyProcess,
    RecordingApp,
    eventually,
    http_get,
)
from tests.netns_harness import Netns, meshca_stdout, requirements
from tests.serve_harness import ServeProcess, serving, short_tempdir

pytestmark = [pytest.mark.envoy, pytest.mark.timeout(120)]

BOOKSTORE_IP, BOOKSTORE_PORT = "127.0.0.101", 14001
PROXIES = {  # workload -> capture mode
    "bookbuyer": "intercept",
    "bookstore-v1": "explicit",
    "bookstore-v2": "explicit",
}
APPS = {"bookstore-v1": "127.0.0.33", "bookstore-v2": "127.0.0.34"}  # app_address in BOOKSTORE_MESH


def identity(workload: str) -> str:
    namespace = workload.split("-")[0]
    return f"spiffe://cluster.local/ns/{namespace}/sa/{workload}"


# --- the pieces -------------------------------------------------------------------------------


def meshca_serve(root: Path) -> contextlib.AbstractContextManager[ServeProcess]:
    """``meshca serve`` on a Unix socket; every Envoy here runs as root (uid 0), which
    may hold the three identities (each bootstrap's node.id picks its own)."""
    args = ["--mesh", str(BOOKSTORE_MESH), "--log-level", "warning"]
    for workload in PROXIES:
        args += ["--uds-identity", f"0={identity(workload)}"]
    return serving(root, root / "data", *args)


@dataclass
class Intercepted:
    netns: Netns
    apps: dict[str, RecordingApp]
    envoys: dict[str, EnvoyProcess]

    def dial(self, address: str = BOOKSTORE_IP, port: int = BOOKSTORE_PORT) -> tuple[int, str]:
        """What bookbuyer's app gets when it dials ``address:port`` (inside the namespace)."""
        return self.netns.run(lambda: http_get(port, address=address))


@pytest.fixture(scope="module")
def intercepted() -> Iterator[Intercepted]:
    ip, iptables = requirements()
    netns = Netns(ip, iptables)
    apps: dict[str, RecordingApp] = {}
    envoys: dict[str, EnvoyProcess] = {}
    try:
        with short_tempdir("mca-netns-") as root:
            meshca_stdout("init", "--data-dir", str(root / "data"))
            with meshca_serve(root) as server:
                for name, address in APPS.items():
                    apps[name] = netns.run(RecordingApp, address, BOOKSTORE_PORT, name.encode())
                for name, capture in PROXIES.items():
                    bootstrap = meshca_stdout(
                        *("bootstrap", identity(name), "--server", f"unix://{server.uds}"),
                        *("--ads", "--capture", capture, "--workload", name),
                    )
                    envoys[name] = EnvoyProcess(bootstrap, root, name)
                    netns.run(envoys[name].start)
                # the app's connections to bookstore's ClusterIP go to Envoy's 15001
                netns.exec(
                    *(iptables, "-t", "nat", "-A", "OUTPUT", "-p", "tcp"),
                    *("-d", f"{BOOKSTORE_IP}/32", "--dport", str(BOOKSTORE_PORT)),
                    *("-j", "REDIRECT", "--to-ports", "15001"),
                )
                yield Intercepted(netns, apps, envoys)
                for envoy in envoys.values():
                    envoy.stop()
    finally:
        for envoy in envoys.values():
            envoy.stop()
        for app in apps.values():
            app.close()
        netns.delete()


def test_a_connection_to_the_cluster_ip_is_intercepted_split_and_mtls(
    intercepted: Intercepted,
) -> None:
    eventually(lambda: intercepted.dial()[0] == 200, "bookbuyer -> 127.0.0.101:14001 answers")
    seen: Counter[str] = Counter()
    for _ in range(40):
        status, body = intercepted.dial()
        assert status == 200, body
        seen[body] += 1
    assert set(seen) == {"bookstore-v1", "bookstore-v2"}, seen
    for app in intercepted.apps.values():
        assert set(app.callers()) == {identity("bookbuyer")}


def test_only_mesh_services_are_intercepted(intercepted: Intercepted) -> None:
    """Without a rule for it, a connection goes where it was dialled (here: nowhere), and
    the outbound listener itself, dialled directly, matches no service: blackhole."""
    assert intercepted.dial(BOOKSTORE_IP, 14002)[0] == 0
    before = sum(len(app.requests) for app in intercepted.apps.values())
    assert intercepted.dial("127.0.0.1", 15001)[0] != 200
    assert sum(len(app.requests) for app in intercepted.apps.values()) == before
