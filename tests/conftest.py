"""Shared pytest configuration. Fixtures that start real processes live in
``tests/*_harness.py`` modules and are imported by the tests that need them."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.kube_harness import KubeCluster

# Some tests press Ctrl-C (SIGINT) on a meshca process, as a terminal would. A test run
# started as a background job of a non-interactive shell inherits SIGINT *ignored*, and an
# ignored signal stays ignored across exec, so every meshca started by a test would ignore
# it too. A handled signal is reset to the default at exec: what a terminal gives a command.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """A test that runs ``meshca serve`` in-process installs a handler on pytest's captured
    stderr of that test; it must not outlive the test and write into a closed stream later."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="session")
def kube() -> Iterator[KubeCluster]:
    """The session's real Kubernetes API server (etcd + kube-apiserver on loopback,
    ``tests/kube_harness.py``); the test is skipped, saying why, when the binaries that
    ``make kube`` builds are absent. Tests using it carry ``@pytest.mark.kube``."""
    from tests.kube_harness import missing_binaries, running_cluster

    why = missing_binaries()
    if why:
        pytest.skip(why)
    with running_cluster() as cluster:
        yield cluster


@pytest.fixture
def kube_namespaces(
    kube: KubeCluster, request: pytest.FixtureRequest
) -> Iterator[Callable[..., str]]:
    """A factory of fresh namespaces for this test: ``kube_namespaces("shop",
    labels={...})`` creates one (with its ``default`` ServiceAccount) and returns its
    name; each is deleted, with everything in it, after the test."""
    from tests.kube_harness import namespace_name

    made: list[str] = []

    def make(hint: str = "", labels: Mapping[str, str] | None = None) -> str:
        name = namespace_name(f"{request.node.name}-{hint}" if hint else request.node.name)
        kube.create_namespace(name, labels)
        made.append(name)
        return name

    yield make
    for name in made:
        kube.delete_namespace(name)


@pytest.fixture
def kube_namespace(kube_namespaces: Callable[..., str]) -> str:
    """One fresh namespace labelled ``meshca.io/mesh=enabled`` (in the mesh)."""
    return kube_namespaces(labels={"meshca.io/mesh": "enabled"})
