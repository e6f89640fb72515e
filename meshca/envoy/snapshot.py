"""A proxy's configuration at one moment: resources by type and name, each type versioned
by its content (the go-control-plane snapshot).

Versions are hashes of the deterministically serialised resources in name order, so two
generations of the same mesh give the same versions and an unrelated change leaves a
type's version alone: a stream resends only what really changed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from google.protobuf.message import Message

from meshca.envoy.xds import RESOURCE_TYPES

_EMPTY: Mapping[str, Message] = MappingProxyType({})


def _digest(parts: Mapping[str, bytes]) -> str:
    hasher = hashlib.sha256()
    for name in sorted(parts):
        encoded_name = name.encode()
        hasher.update(len(encoded_name).to_bytes(4, "big") + encoded_name)
        hasher.update(len(parts[name]).to_bytes(8, "big") + parts[name])
    return hasher.hexdigest()[:16]


@dataclass(frozen=True)
class Snapshot:
    """``resources[type_url][name]`` -> message; ``encoded`` holds the same as bytes.

    ``secret_names`` are the SDS secrets the resources refer to (served on the same
    stream from the secret store, not part of this snapshot).
    """

    resources: Mapping[str, Mapping[str, Message]]
    encoded: Mapping[str, Mapping[str, bytes]]
    versions: Mapping[str, str]
    secret_names: tuple[str, ...] = field(default=())

    @classmethod
    def of(
        cls, resources: Mapping[str, Mapping[str, Message]], secret_names: tuple[str, ...] = ()
    ) -> Snapshot:
        frozen: dict[str, Mapping[str, Message]] = {}
        encoded: dict[str, Mapping[str, bytes]] = {}
        versions: dict[str, str] = {}
        for type_url in sorted(set(RESOURCE_TYPES) | set(resources)):
            by_name = resources.get(type_url, {})
            ordered = {name: by_name[name] for name in sorted(by_name)}
            raw = {name: m.SerializeToString(deterministic=True) for name, m in ordered.items()}
            frozen[type_url] = MappingProxyType(ordered)
            encoded[type_url] = MappingProxyType(raw)
            versions[type_url] = _digest(raw)
        return cls(
            MappingProxyType(frozen),
            MappingProxyType(encoded),
            MappingProxyType(versions),
            tuple(sorted(set(secret_names))),
        )

    def get(self, type_url: str) -> Mapping[str, Message]:
        return self.resources.get(type_url, _EMPTY)

    def version(self, type_url: str) -> str:
        """The content version of one type (also for a type with no resources)."""
        return self.versions.get(type_url) or _digest({})

    def resource_version(self, type_url: str, name: str) -> str | None:
        """One resource's content version (delta xDS), None when it is not in the snapshot."""
        raw = self.encoded.get(type_url, {}).get(name)
        return None if raw is None else hashlib.sha256(raw).hexdigest()[:16]
