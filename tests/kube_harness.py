"""A real Kubernetes API server for tests: etcd and kube-apiserver on loopback, stopped by PID.

The binaries are the ones ``tests/kube/build.sh`` builds once into
``${MESHCA_KUBE_CACHE:-~/.cache/meshca/k8s-<version>}/bin`` (``make test`` and ``make kube``
run it). Without them the tests that need the API server are skipped, saying why.

``KubeCluster.start`` runs etcd (in a temp directory, no fsync) and kube-apiserver with:

- a serving certificate for 127.0.0.1 from a CA made here (``ca_file``);
- an admin bearer token (``admin_token``, group ``system:masters``) from a static token
  file, and an admin kubeconfig (``kubeconfig``, 0600) naming it;
- RBAC authorization, so a ClusterRole under test is enforced for real;
- a service-account signing key (``sa_signing_key``, the issuer ``SA_ISSUER``): TokenReview
  and the TokenRequest API (projected, audience-bound, pod-bound tokens) work;
- ``--endpoint-reconciler-type=none`` (no kubelet and no other API servers here).

There is no kubelet and no controller manager: Pods never run and EndpointSlices are made
by the tests (``endpoint_slice``), at the loopback addresses where local apps and Envoys
stand in for the pods. The namespace controller's work is done by ``delete_namespace``.

Fixtures (``tests/conftest.py``): ``kube`` (the session's cluster), ``kube_namespaces``
(a factory: ``kube_namespaces("shop", labels=...)`` -> a fresh namespace name, deleted
with everything in it after the test) and ``kube_namespace`` (one fresh namespace,
labelled ``meshca.io/mesh=enabled``).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import ipaddress
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import requests
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.envoy_harness import free_port, stop_process

REPO = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO / "tests" / "kube" / "build.sh"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
MESH_LABEL = "meshca.io/mesh"
START_TIMEOUT = 90.0
# The kinds a test namespace may hold that ``delete_namespace`` removes before the
# namespace itself (every namespaced custom resource is added from the CRDs present).
_NAMESPACED = (
    "/api/v1/namespaces/{ns}/pods",
    "/api/v1/namespaces/{ns}/services",
    "/api/v1/namespaces/{ns}/endpoints",
    "/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices",
    "/api/v1/namespaces/{ns}/serviceaccounts",
    "/api/v1/namespaces/{ns}/configmaps",
    "/api/v1/namespaces/{ns}/secrets",
    "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles",
    "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings",
)


def _default_version() -> str:
    """The version ``tests/kube/build.sh`` builds (its ``KUBE_VERSION`` default)."""
    found = re.search(r"KUBE_VERSION:-(v[0-9.]+)", BUILD_SCRIPT.read_text())
    assert found, "tests/kube/build.sh names no KUBE_VERSION default"
    return found.group(1)


def kube_bin_dir() -> Path:
    version = os.environ.get("KUBE_VERSION") or _default_version()
    cache = os.environ.get("MESHCA_KUBE_CACHE") or str(
        Path.home() / ".cache" / "meshca" / f"k8s-{version}"
    )
    return Path(cache) / "bin"


def missing_binaries() -> str | None:
    """Why the API server cannot start here, or None when it can."""
    wanted = [kube_bin_dir() / name for name in ("etcd", "kube-apiserver")]
    absent = [str(p) for p in wanted if not os.access(p, os.X_OK)]
    if not absent:
        return None
    how = "run `make kube`" if shutil.which("go") else "no Go on PATH to build them"
    return f"no Kubernetes test peers ({', '.join(absent)}): {how}"


class KubeError(Exception):
    """The API server refused a request: ``status`` is the HTTP status, ``reason`` the
    Status object's reason (``NotFound``, ``AlreadyExists``, ``Forbidden``...)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_private(path: Path, data: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    return path


def _serving_pki(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a serving certificate for 127.0.0.1/localhost: (ca, cert, key) paths."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshca-test kube CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = directory / "ca.crt"
    ca_path.write_bytes(_pem_cert(ca))
    cert_path = directory / "apiserver.crt"
    cert_path.write_bytes(_pem_cert(cert))
    key_path = _write_private(directory / "apiserver.key", _pem_key(key))
    return ca_path, cert_path, key_path


class KubeCluster:
    """One etcd and one kube-apiserver; ``stop`` ends both by PID."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.bin = kube_bin_dir()
        self.etcd_port = free_port()
        self.etcd_peer_port = free_port()
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.etcd_url = f"http://127.0.0.1:{self.etcd_port}"
        self.admin_token = secrets.token_urlsafe(32)
        pki = workdir / "pki"
        pki.mkdir(parents=True, exist_ok=True)
        self.ca_file, self._cert, self._key = _serving_pki(pki)
        sa_key = ec.generate_private_key(ec.SECP256R1())
        self.sa_signing_key = _write_private(pki / "sa.key", _pem_key(sa_key))
        self.sa_public_key = pki / "sa.pub"
        self.sa_public_key.write_bytes(
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        self._tokens = _write_private(
            pki / "tokens.csv", f'{self.admin_token},admin,admin-uid,"system:masters"\n'.encode()
        )
        self.kubeconfig = self._write_kubeconfig()
        self.etcd: subprocess.Popen[bytes] | None = None
        self.apiserver: subprocess.Popen[bytes] | None = None
        self.session = requests.Session()
        self.session.trust_env = False  # loopback: no proxy from the environment
        self.session.verify = str(self.ca_file)
        self.session.headers["Authorization"] = f"Bearer {self.admin_token}"

    # process control --------------------------------------------------------------
    @classmethod
    def start(cls, workdir: Path) -> KubeCluster:
        cluster = cls(workdir)
        try:
            cluster.start_etcd()
            cluster.start_apiserver()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the process
        try:
            return subprocess.Popen(
                [str(self.bin / name), *args],
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        finally:
            log.close()

    def _log_tail(self, name: str) -> str:
        with contextlib.suppress(OSError):
            return (self.workdir / f"{name}.log").read_text(errors="replace")[-3000:]
        return ""

    def start_etcd(self) -> None:
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        self.etcd = self._spawn(
            "etcd",
            [
                "--name=default",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=default={peer}",
                "--unsafe-no-fsync",  # a test's data: speed over durability
                "--log-level=warn",
            ],
        )
        self._wait("etcd", self.etcd, lambda: self._etcd_healthy())

    def _etcd_healthy(self) -> bool:
        with contextlib.suppress(requests.RequestException):
            answer = requests.get(f"{self.etcd_url}/health", timeout=2, proxies={})
            return answer.status_code == 200
        return False

    def start_apiserver(self) -> None:
        """Start kube-apiserver (again, after ``stop_apiserver``) on the same port and
        wait until ``/readyz`` says ready."""
        self.apiserver = self._spawn(
            "kube-apiserver",
            [
                f"--etcd-servers={self.etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.port}",
                f"--cert-dir={self.workdir / 'certs'}",
                f"--tls-cert-file={self._cert}",
                f"--tls-private-key-file={self._key}",
                f"--token-auth-file={self._tokens}",
                "--authorization-mode=RBAC",
                f"--service-account-key-file={self.sa_public_key}",
                f"--service-account-signing-key-file={self.sa_signing_key}",
                f"--service-account-issuer={SA_ISSUER}",
                "--service-cluster-ip-range=10.96.0.0/16",
                "--endpoint-reconciler-type=none",
                "--enable-priority-and-fairness=false",
                "--profiling=false",
                "--v=1",
            ],
        )
        self._wait("kube-apiserver", self.apiserver, self._ready)

    def _ready(self) -> bool:
        with contextlib.suppress(requests.RequestException):
            return self.session.get(f"{self.url}/readyz", timeout=2).status_code == 200
        return False

    def _wait(self, name: str, process: subprocess.Popen[bytes], ready: Any) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not ready():
            if process.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {process.returncode}:\n{self._log_tail(name)}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{name} not ready within {START_TIMEOUT:.0f}s:\n{self._log_tail(name)}"
                )
            time.sleep(0.2)

    def stop_apiserver(self) -> None:
        if self.apiserver is not None:
            stop_process(self.apiserver)
            self.apiserver = None

    def restart_apiserver(self) -> None:
        self.stop_apiserver()
        self.start_apiserver()

    def stop(self) -> None:
        self.stop_apiserver()
        if self.etcd is not None:
            stop_process(self.etcd)
            self.etcd = None
        self.session.close()

    def compact_etcd(self) -> int:
        """Compact etcd's history up to now: a watch from an older resourceVersion that
        reaches etcd is answered ``410 Gone``. Returns the revision compacted at."""
        key = base64.b64encode(b"/registry").decode()
        answer = requests.post(
            f"{self.etcd_url}/v3/kv/range", json={"key": key}, timeout=10, proxies={}
        )
        answer.raise_for_status()
        revision = int(answer.json()["header"]["revision"])
        compacted = requests.post(
            f"{self.etcd_url}/v3/kv/compaction",
            json={"revision": str(revision), "physical": True},
            timeout=30,
            proxies={},
        )
        compacted.raise_for_status()
        return revision

    # configuration for clients ----------------------------------------------------
    def _write_kubeconfig(self) -> Path:
        ca_data = base64.b64encode(self.ca_file.read_bytes()).decode()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "test",
                    "cluster": {"server": self.url, "certificate-authority-data": ca_data},
                }
            ],
            "users": [{"name": "admin", "user": {"token": self.admin_token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "admin"}}],
            "current-context": "test",
        }
        return _write_private(self.workdir / "admin.kubeconfig", yaml.safe_dump(config).encode())

    def kubeconfig_for_token(self, path: Path, token: str) -> Path:
        """A kubeconfig at ``path`` that authenticates with ``token`` (for example a
        service account's, to run a client with exactly that account's permissions)."""
        config = yaml.safe_load(self.kubeconfig.read_text())
        config["users"] = [{"name": "admin", "user": {"token": token}}]
        return _write_private(path, yaml.safe_dump(config).encode())

    # the API ----------------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        """One API call as admin; the decoded answer, or KubeError for a refusal."""
        answer = self.session.request(
            method,
            self.url + path,
            json=body,
            params=params,
            headers={"Content-Type": content_type} if body is not None else None,
            timeout=30,
        )
        try:
            decoded = answer.json()
        except ValueError:
            decoded = {"message": answer.text[:300]}
        if answer.status_code >= 400:
            raise KubeError(
                answer.status_code, str(decoded.get("reason", "")), str(decoded.get("message"))
            )
        assert isinstance(decoded, dict)
        return decoded

    def create(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return self.request("POST", path, body)

    def get(self, path: str) -> dict[str, Any]:
        return self.request("GET", path)

    def delete(self, path: str) -> dict[str, Any]:
        """Delete at once (grace period 0: there is no kubelet to confirm a pod's end)."""
        return self.request("DELETE", path, {"gracePeriodSeconds": 0})

    def patch(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """A JSON merge patch."""
        return self.request("PATCH", path, body, content_type="application/merge-patch+json")

    def apply_yaml(self, text: str, namespace: str | None = None) -> list[dict[str, Any]]:
        """Create every object of a YAML stream (core, named groups, custom resources)."""
        return [
            self.create(self.collection_path(doc, namespace), doc)
            for doc in yaml.safe_load_all(text)
            if doc
        ]

    def collection_path(self, obj: Mapping[str, Any], namespace: str | None = None) -> str:
        """The URL path of the collection ``obj`` belongs in (plural = lower kind + s,
        which holds for every kind the tests create; a CRD's plural is looked up)."""
        api_version, kind = str(obj["apiVersion"]), str(obj["kind"])
        base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
        plural = self._plural(api_version, kind)
        ns = namespace or obj.get("metadata", {}).get("namespace")
        if ns and kind not in _CLUSTER_KINDS:
            return f"{base}/namespaces/{ns}/{plural}"
        return f"{base}/{plural}"

    def _plural(self, api_version: str, kind: str) -> str:
        if kind == "EndpointSlice" or "/" not in api_version or "k8s.io" in api_version:
            return {"Endpoints": "endpoints"}.get(kind, kind.lower() + "s")
        group = api_version.split("/")[0]
        for crd in self.get("/apis/apiextensions.k8s.io/v1/customresourcedefinitions")["items"]:
            if crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind:
                return str(crd["spec"]["names"]["plural"])
        return kind.lower() + "s"

    # objects the tests make often -------------------------------------------------
    def create_namespace(self, name: str, labels: Mapping[str, str] | None = None) -> None:
        self.create(
            "/api/v1/namespaces",
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": name, "labels": dict(labels or {})},
            },
        )
        # There is no controller manager to make the default ServiceAccount, which the
        # ServiceAccount admission plugin requires before it admits a Pod without one.
        self.service_account(name, "default")

    def delete_namespace(self, name: str) -> None:
        """Delete ``name`` and everything in it, doing the namespace controller's work:
        the namespace is refused new objects, its contents are deleted, its finalizer
        removed, and it is gone."""
        with contextlib.suppress(KubeError):
            self.request("DELETE", f"/api/v1/namespaces/{name}")
        paths = list(_NAMESPACED)
        for crd in self.get("/apis/apiextensions.k8s.io/v1/customresourcedefinitions")["items"]:
            spec = crd["spec"]
            if spec["scope"] == "Namespaced":
                for version in spec["versions"]:
                    if version.get("served"):
                        plural = spec["names"]["plural"]
                        paths.append(
                            f"/apis/{spec['group']}/{version['name']}/namespaces/{{ns}}/{plural}"
                        )
                        break
        for path in paths:
            with contextlib.suppress(KubeError):
                self.request("DELETE", path.format(ns=name), params={"gracePeriodSeconds": "0"})
        with contextlib.suppress(KubeError):
            namespace = self.get(f"/api/v1/namespaces/{name}")
            namespace["spec"]["finalizers"] = []
            self.request("PUT", f"/api/v1/namespaces/{name}/finalize", namespace)

    def service_account(self, namespace: str, name: str) -> dict[str, Any]:
        return self.create(
            f"/api/v1/namespaces/{namespace}/serviceaccounts",
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}},
        )

    def token(
        self,
        namespace: str,
        service_account: str,
        *,
        audience: str = "meshca",
        seconds: int = 600,
        pod: Mapping[str, Any] | None = None,
    ) -> str:
        """A service account's token from the TokenRequest API, the one a projected
        volume holds: for ``audience``, valid ``seconds`` (the API's minimum is 600) and,
        given ``pod`` (an object as the API returned it), bound to that pod, so it stops
        being valid when the pod is deleted."""
        spec: dict[str, Any] = {"audiences": [audience], "expirationSeconds": seconds}
        if pod is not None:
            spec["boundObjectRef"] = {
                "kind": "Pod",
                "apiVersion": "v1",
                "name": pod["metadata"]["name"],
                "uid": pod["metadata"]["uid"],
            }
        answer = self.create(
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
        )
        return str(answer["status"]["token"])

    def pod(
        self,
        namespace: str,
        name: str,
        *,
        service_account: str = "default",
        labels: Mapping[str, str] | None = None,
        node: str | None = None,
        ip: str | None = None,
    ) -> dict[str, Any]:
        """A Pod (it never runs: there is no kubelet). ``node`` sets ``spec.nodeName``;
        ``ip`` writes ``status.podIP`` and a Ready condition through the status
        subresource, as a kubelet would."""
        spec: dict[str, Any] = {
            "serviceAccountName": service_account,
            "automountServiceAccountToken": False,
            "containers": [{"name": "app", "image": "registry.invalid/app:1"}],
        }
        if node:
            spec["nodeName"] = node
        created = self.create(
            f"/api/v1/namespaces/{namespace}/pods",
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "labels": dict(labels or {})},
                "spec": spec,
            },
        )
        if ip is None:
            return created
        created["status"] = {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True"}],
        }
        return self.request("PUT", f"/api/v1/namespaces/{namespace}/pods/{name}/status", created)

    def service(
        self,
        namespace: str,
        name: str,
        ports: Mapping[str, int],
        *,
        selector: Mapping[str, str] | None = None,
        protocol: str = "TCP",
        app_protocol: str | None = None,
    ) -> dict[str, Any]:
        """A ClusterIP Service with named ports (``{"http": 8080}``)."""
        service_ports: list[dict[str, Any]] = []
        for port_name, port in ports.items():
            entry: dict[str, Any] = {"name": port_name, "port": port, "protocol": protocol}
            if app_protocol:
                entry["appProtocol"] = app_protocol
            service_ports.append(entry)
        return self.create(
            f"/api/v1/namespaces/{namespace}/services",
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name},
                "spec": {"ports": service_ports, "selector": dict(selector or {"app": name})},
            },
        )

    def endpoint_slice(
        self,
        namespace: str,
        service: str,
        endpoints: list[tuple[str, str | None]],
        ports: Mapping[str, int],
        *,
        name: str | None = None,
    ) -> dict[str, Any]:
        """An EndpointSlice of ``service`` (``kubernetes.io/service-name``) as the
        EndpointSlice controller would write it: ``endpoints`` are (address, pod name or
        None), ready; ``ports`` map the Service's port names to the target ports."""
        return self.create(
            f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices",
            endpoint_slice_object(service, endpoints, ports, name=name or f"{service}-slice"),
        )


def endpoint_slice_object(
    service: str,
    endpoints: list[tuple[str, str | None]],
    ports: Mapping[str, int],
    *,
    name: str,
) -> dict[str, Any]:
    entries: list[dict[str, Any]] = []
    for address, pod in endpoints:
        entry: dict[str, Any] = {"addresses": [address], "conditions": {"ready": True}}
        if pod:
            entry["targetRef"] = {"kind": "Pod", "name": pod}
        entries.append(entry)
    family = "IPv6" if ":" in (endpoints[0][0] if endpoints else "") else "IPv4"
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": service}},
        "addressType": family,
        "endpoints": entries,
        "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports.items()],
    }


_CLUSTER_KINDS = frozenset(
    {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "Node"}
)


@contextlib.contextmanager
def running_cluster() -> Iterator[KubeCluster]:
    """A cluster for the duration of the block, in a temp directory removed after."""
    workdir = Path(tempfile.mkdtemp(prefix="meshca-kube-"))
    cluster = KubeCluster.start(workdir)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def namespace_name(test_name: str) -> str:
    """A fresh DNS-label namespace name recognisably from ``test_name``."""
    slug = re.sub(r"[^a-z0-9]+", "-", test_name.lower().removeprefix("test_")).strip("-")
    return f"{slug[:50].rstrip('-')}-{secrets.token_hex(3)}"


class Relay:
    """A TCP relay on loopback in front of the API server, for a client the test wants to
    cut off (``cut``: its connections close and new ones are refused) while the test's
    own admin client, which talks to the API server directly, keeps working; ``restore``
    lets it through again. TLS passes through untouched (the certificate names 127.0.0.1)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self.url = f"https://127.0.0.1:{self.port}"
        self._open = threading.Event()
        self._open.set()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def kubeconfig(self, cluster: KubeCluster, path: Path) -> Path:
        """The admin kubeconfig, pointing at this relay."""
        config = yaml.safe_load(cluster.kubeconfig.read_text())
        config["clusters"][0]["cluster"]["server"] = self.url
        return _write_private(path, yaml.safe_dump(config).encode())

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._open.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            with self._lock:
                self._sockets.discard(source)
                self._sockets.discard(sink)

    def cut(self) -> None:
        self._open.clear()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def restore(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._listener.close()
