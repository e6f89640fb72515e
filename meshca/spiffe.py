"""SPIFFE IDs and trust domains, validated by the rules of the SPIFFE ID specification.

Pure: imports nothing of meshca, so every other layer can depend on it. Each refusal
is a :class:`SpiffeIdError` whose ``rule`` names the rule that was broken, so a user
sees *why* an ID is wrong, not just that it is.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

SCHEME = "spiffe://"
# Agent SVIDs live under this path; workload identities never do (SpiffeId.is_agent).
AGENT_PATH = "/meshca/agent"
MAX_ID_BYTES = 2048
MAX_TRUST_DOMAIN_BYTES = 255
DEFAULT_TRUST_DOMAIN = "cluster.local"

_TD_CHARS = frozenset(string.ascii_lowercase + string.digits + ".-_")
_PATH_CHARS = frozenset(string.ascii_letters + string.digits + ".-_")


class SpiffeIdError(ValueError):
    """A string that is not a valid SPIFFE ID or trust domain; ``rule`` says which rule."""

    def __init__(self, rule: str, value: str, detail: str, what: str = "SPIFFE ID") -> None:
        shown = value if len(value) <= 120 else value[:117] + "..."
        super().__init__(f"invalid {what} {shown!r}: {detail} (rule: {rule})")
        self.rule = rule
        self.value = value
        self.detail = detail


def _check_trust_domain(name: str, whole: str) -> None:
    if not name:
        raise SpiffeIdError("trust-domain-empty", whole, "the trust domain is empty")
    if "@" in name:
        raise SpiffeIdError("trust-domain-userinfo", whole, "userinfo is not allowed")
    if ":" in name:
        raise SpiffeIdError("trust-domain-port", whole, "a port is not allowed")
    if "%" in name:
        raise SpiffeIdError("percent-encoding", whole, "percent-encoding is not allowed")
    if len(name.encode()) > MAX_TRUST_DOMAIN_BYTES:
        raise SpiffeIdError(
            "trust-domain-length", whole, f"the trust domain exceeds {MAX_TRUST_DOMAIN_BYTES} bytes"
        )
    bad = sorted({c for c in name if c not in _TD_CHARS})
    if bad:
        hint = " (trust domains are lowercase)" if any(c.isupper() for c in bad) else ""
        raise SpiffeIdError(
            "trust-domain-chars",
            whole,
            f"the trust domain may contain only a-z 0-9 . - _, found {''.join(bad)!r}{hint}",
        )


def _check_path(path: str, whole: str) -> None:
    """Check a path that starts with '/' (the empty path is checked by the caller)."""
    if "%" in path:
        raise SpiffeIdError("percent-encoding", whole, "percent-encoding is not allowed")
    if path.endswith("/"):
        raise SpiffeIdError("path-trailing-slash", whole, "the path must not end with '/'")
    for segment in path[1:].split("/"):
        if segment == "":
            raise SpiffeIdError("path-empty-segment", whole, "the path has an empty segment")
        _check_segment(segment, whole)


def _check_segment(segment: str, whole: str, what: str = "SPIFFE ID") -> None:
    """Check a non-empty path segment (no '%': the caller checks for percent-encoding)."""
    if segment in (".", ".."):
        raise SpiffeIdError(
            "path-dot-segment", whole, f"the path must not contain a {segment!r} segment", what
        )
    bad = sorted({c for c in segment if c not in _PATH_CHARS})
    if bad:
        raise SpiffeIdError(
            "path-chars",
            whole,
            f"path segments may contain only A-Z a-z 0-9 . - _, found {''.join(bad)!r}",
            what,
        )


def check_segment(value: str) -> str:
    """``value`` if it is one SPIFFE ID path segment (a namespace, service account or other
    name that can become part of an ID), else :class:`SpiffeIdError` naming the rule."""
    what = "SPIFFE path segment"
    if not isinstance(value, str):
        raise SpiffeIdError("type", repr(value), "a path segment is a string", what)
    if value == "":
        raise SpiffeIdError("path-empty-segment", value, "the segment is empty", what)
    if "%" in value:
        raise SpiffeIdError("percent-encoding", value, "percent-encoding is not allowed", what)
    if len(value.encode()) > MAX_ID_BYTES:
        raise SpiffeIdError("length", value, f"the segment exceeds {MAX_ID_BYTES} bytes", what)
    _check_segment(value, value, what)
    return value


def _split(value: str) -> tuple[str, str]:
    """Split ``spiffe://td/path`` into (td, path) after the URI-level checks."""
    if not isinstance(value, str):
        raise SpiffeIdError("type", repr(value), "a SPIFFE ID is a string")
    if value == "":
        raise SpiffeIdError("empty", value, "the ID is empty")
    if len(value.encode()) > MAX_ID_BYTES:
        raise SpiffeIdError("length", value, f"the ID exceeds {MAX_ID_BYTES} bytes")
    if not value.startswith(SCHEME):
        if value.lower().startswith(SCHEME):
            raise SpiffeIdError("scheme", value, "the scheme must be lowercase 'spiffe://'")
        raise SpiffeIdError("scheme", value, "the ID must start with 'spiffe://'")
    rest = value[len(SCHEME) :]
    if "?" in rest:
        raise SpiffeIdError("query", value, "a query is not allowed")
    if "#" in rest:
        raise SpiffeIdError("fragment", value, "a fragment is not allowed")
    td, slash, path = rest.partition("/")
    return td, slash + path


@dataclass(frozen=True, order=True, slots=True)
class TrustDomain:
    """A SPIFFE trust domain such as ``cluster.local``."""

    name: str

    def __post_init__(self) -> None:
        _check_trust_domain(self.name, self.name)

    @classmethod
    def parse(cls, value: str) -> TrustDomain:
        """Accept a bare name (``example.org``) or the trust domain's ID (``spiffe://example.org``)."""
        if isinstance(value, str) and "://" in value:  # an ID form, spiffe:// or not
            td, path = _split(value)
            if path:
                raise SpiffeIdError("trust-domain-path", value, "a trust domain ID has no path")
            _check_trust_domain(td, value)
            return cls(td)
        if not isinstance(value, str):
            raise SpiffeIdError("type", repr(value), "a trust domain is a string")
        _check_trust_domain(value, value)
        return cls(value)

    @property
    def id(self) -> str:
        """The trust domain's own SPIFFE ID, ``spiffe://<name>`` (the CA certificate's URI SAN)."""
        return SCHEME + self.name

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, order=True, slots=True)
class SpiffeId:
    """A workload SPIFFE ID: a trust domain and a non-empty path."""

    trust_domain: TrustDomain
    path: str

    def __post_init__(self) -> None:
        whole = SCHEME + self.trust_domain.name + self.path
        if not self.path:
            raise SpiffeIdError("path-empty", whole, "a workload ID needs a non-empty path")
        if not self.path.startswith("/"):
            raise SpiffeIdError("path-absolute", whole, "the path must start with '/'")
        _check_path(self.path, whole)
        if len(whole.encode()) > MAX_ID_BYTES:
            raise SpiffeIdError("length", whole, f"the ID exceeds {MAX_ID_BYTES} bytes")

    @classmethod
    def parse(cls, value: str) -> SpiffeId:
        td, path = _split(value)
        _check_trust_domain(td, value)  # here, so that its errors show the whole ID
        return cls(TrustDomain(td), path)  # the path is checked by __post_init__

    @classmethod
    def from_kubernetes(
        cls, namespace: str, service_account: str, trust_domain: TrustDomain | str
    ) -> SpiffeId:
        """The Istio form ``spiffe://<td>/ns/<ns>/sa/<sa>``."""
        td = (
            trust_domain
            if isinstance(trust_domain, TrustDomain)
            else TrustDomain.parse(trust_domain)
        )
        for what, value in (("namespace", namespace), ("service account", service_account)):
            if not value or "/" in value:
                raise SpiffeIdError(
                    "kubernetes-name",
                    f"{SCHEME}{td.name}/ns/{namespace}/sa/{service_account}",
                    f"the {what} must be one non-empty path segment",
                )
        return cls(td, f"/ns/{namespace}/sa/{service_account}")

    @classmethod
    def for_node_proxy(
        cls, trust_domain: TrustDomain, namespace: str, service_account: str, node: str
    ) -> SpiffeId:
        """An ambient node proxy's identity in Kubernetes, bound to its node:
        ``spiffe://<td>/ns/<ns>/sa/<sa>/node/<node>`` (no workload's: those end at the
        service account). SpiffeIdError when a part is not one path segment."""
        base = cls.from_kubernetes(namespace, service_account, trust_domain)
        if not node or "/" in node:
            raise SpiffeIdError("node-name", f"{base}/node/{node[:253]}", "not a node name")
        return cls(trust_domain, f"{base.path}/node/{node}")

    @property
    def kubernetes(self) -> tuple[str, str] | None:
        """``(namespace, service_account)`` when the ID has the Kubernetes form, else None."""
        parts = self.path.split("/")
        if len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa":
            return parts[2], parts[4]
        return None

    def is_member_of(self, trust_domain: TrustDomain) -> bool:
        return self.trust_domain == trust_domain

    @classmethod
    def for_agent(cls, trust_domain: TrustDomain, attestor: str, name: str) -> SpiffeId:
        """An agent's own ID, ``spiffe://<td>/meshca/agent/<attestor>/<name>``."""
        return cls(trust_domain, f"{AGENT_PATH}/{attestor}/{name}")

    @property
    def is_agent(self) -> bool:
        """Whether the path is under ``/meshca/agent``: reserved for ``meshca agent``'s own
        SVIDs, which authenticate to the CSR API; no workload is ever issued one."""
        return self.path == AGENT_PATH or self.path.startswith(AGENT_PATH + "/")

    def __str__(self) -> str:
        return SCHEME + self.trust_domain.name + self.path
