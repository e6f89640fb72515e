"""The agents' sightings on disk (``<data-dir>/agents/sightings.json``, 0600), so a
restart of ``meshca serve`` keeps what every agent acknowledged.

Each sighting keeps the content it acknowledged, not a counter: the roots it reported
holding (``held_roots``; each root's DER once, shared by every agent), its agent SVID's
leaf, and the JWT key ids it holds. A sighting read back counts only for that content,
so it never acknowledges a root or key added after it was written. A file written before
agents reported their roots names the bundle each was *sent* (``bundle``): that is no
ACK, and is not read. A file that cannot be read is reported in one line and everyone
counts as unseen (they acknowledge again at their next poll); nothing in it is trusted
beyond these bounds.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshca.attest.state_file import agents_dir
from meshca.ca_api.sightings import MAX_REPORTED_KIDS, Sighting
from meshca.issuer import TrustBundle
from meshca.spiffe import SpiffeId, SpiffeIdError, TrustDomain
from meshca.util.files import PRIVATE, atomic_write, ensure_private_dir

SIGHTINGS_FILE = "sightings.json"
FORMAT = 1
MAX_AGENTS = 100_000  # saved: the most recent callers beyond this are dropped
MAX_ROOTS = 64
MAX_CERT_BYTES = 16 * 1024
MAX_KID = 128
MAX_BYTES = 256 * 1024 * 1024  # far above MAX_AGENTS' worth; a bigger file is refused


class SightingsFileError(ValueError):
    """The file is unreadable or damaged: the message names it and says why."""


def sightings_path(data_dir: Path) -> Path:
    return agents_dir(data_dir) / SIGHTINGS_FILE


def _der(cert: x509.Certificate) -> str:
    return base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()


def _root_id(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def encode(sightings: Mapping[str, Sighting]) -> bytes:
    """The document for ``sightings`` (the :data:`MAX_AGENTS` most recent callers)."""
    recent = sorted(sightings.items(), key=lambda item: item[1].last_call, reverse=True)
    roots: dict[str, str] = {}
    agents: dict[str, Any] = {}
    bundles: dict[int, list[str]] = {}  # agents share a few held sets: each encoded once
    for agent_id, sighting in recent[:MAX_AGENTS]:
        entry: dict[str, Any] = {"last_call": round(sighting.last_call, 3)}
        if sighting.presented is not None:
            entry["presented"] = _der(sighting.presented)
        bundle = sighting.bundle
        if bundle is not None:
            if id(bundle) not in bundles:
                ids = []
                for root in bundle:
                    root_id = _root_id(root)
                    if root_id not in roots:
                        roots[root_id] = _der(root)
                    ids.append(root_id)
                bundles[id(bundle)] = ids
            entry["held_roots"] = bundles[id(bundle)]
        if sighting.jwt_kids is not None:
            entry["jwt_kids"] = sorted(sighting.jwt_kids)
        agents[agent_id] = entry
    document = {"format": FORMAT, "roots": roots, "agents": agents}
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode() + b"\n"


def save(path: Path, sightings: Mapping[str, Sighting]) -> None:
    """Write atomically (0600, in the 0700 agents directory: it maps the mesh's agents)."""
    ensure_private_dir(path.parent)
    atomic_write(path, encode(sightings), PRIVATE)


def load(path: Path, trust_domain: TrustDomain) -> dict[str, Sighting]:
    """The saved sightings (none when there is no file); SightingsFileError when it
    cannot be read or any part of it is out of shape or bounds."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise SightingsFileError(f"{path} cannot be read: {exc.strerror or exc}") from None
    if len(data) > MAX_BYTES:
        raise SightingsFileError(f"{path} is larger than {MAX_BYTES} bytes")
    try:
        return _decode(json.loads(data), trust_domain)
    except (ValueError, TypeError, KeyError, AttributeError, SpiffeIdError) as exc:
        raise SightingsFileError(f"{path} is damaged: {_reason(exc)}") from None


def _reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def _cert(text: Any) -> x509.Certificate:
    raw = base64.b64decode(str(text), validate=True)
    if len(raw) > MAX_CERT_BYTES:
        raise ValueError("a certificate is too large")
    return x509.load_der_x509_certificate(raw)


def _decode(document: Any, trust_domain: TrustDomain) -> dict[str, Sighting]:
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ValueError(f"not a format-{FORMAT} sightings document")
    roots_in, agents_in = document["roots"], document["agents"]
    if len(roots_in) > MAX_ROOTS or len(agents_in) > MAX_AGENTS:
        raise ValueError(f"more than {MAX_ROOTS} roots or {MAX_AGENTS} agents")
    roots = {str(root_id): _cert(der) for root_id, der in roots_in.items()}
    if any(_root_id(cert) != root_id for root_id, cert in roots.items()):
        raise ValueError("a root does not match its fingerprint")
    sightings: dict[str, Sighting] = {}
    for agent_id, entry in agents_in.items():
        if not SpiffeId.parse(agent_id).is_agent:
            raise ValueError(f"{agent_id[:200]} is not an agent ID")
        bundle = None
        if "held_roots" in entry:  # (not "bundle": the bundle sent, by an older server)
            bundle = TrustBundle.of(trust_domain, [roots[str(i)] for i in entry["held_roots"]])
        kids = None
        if "jwt_kids" in entry:
            listed = [str(kid) for kid in entry["jwt_kids"]]
            if len(listed) > MAX_REPORTED_KIDS or any(len(kid) > MAX_KID for kid in listed):
                raise ValueError("too many or too long JWT key ids")
            kids = frozenset(listed)
        sightings[agent_id] = Sighting(
            float(entry["last_call"]),
            _cert(entry["presented"]) if "presented" in entry else None,
            bundle,
            kids,
        )
    return sightings
