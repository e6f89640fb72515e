"""A proxy's configuration at one moment: resources by type and name, each versioned by
its content (the go-control-plane snapshot).

Each resource is serialised (deterministically) and hashed once, when the snapshot is
made; a type's version is a hash of its names and their resource versions. So two
generations of the same mesh give the same versions, an unrelated change leaves a
type's version alone, and a stream resends only what really changed. Resources shared
by many proxies (one identity's outbound configuration) are encoded once, in a base
snapshot that the proxies' own snapshots extend.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from google.protobuf.message import Message

from meshca.xds.resources import GENERATED_TYPES, content_version, set_version

_EMPTY: Mapping[str, Message] = MappingProxyType({})


@dataclass(frozen=True)
class Snapshot:
    """``resources[type_url][name]`` -> message; ``encoded`` holds the same as bytes and
    ``resource_versions`` their content versions; ``versions[type_url]`` versions a type.

    ``secret_names`` are the SDS secrets the resources refer to (served on the same
    stream from the secret store, not part of this snapshot).
    """

    resources: Mapping[str, Mapping[str, Message]]
    encoded: Mapping[str, Mapping[str, bytes]]
    resource_versions: Mapping[str, Mapping[str, str]]
    versions: Mapping[str, str]
    secret_names: tuple[str, ...] = field(default=())

    @classmethod
    def of(
        cls,
        resources: Mapping[str, Mapping[str, Message]],
        secret_names: tuple[str, ...] = (),
        *,
        base: Snapshot | None = None,
    ) -> Snapshot:
        """A snapshot of ``resources``; with ``base``, of ``base``'s resources (reused as
        encoded there) plus these (a name given here replaces ``base``'s)."""
        frozen: dict[str, Mapping[str, Message]] = {}
        encoded: dict[str, Mapping[str, bytes]] = {}
        resource_versions: dict[str, Mapping[str, str]] = {}
        versions: dict[str, str] = {}
        inherited = base.resources if base is not None else {}
        for type_url in sorted(set(GENERATED_TYPES) | set(resources) | set(inherited)):
            if base is not None and not resources.get(type_url):  # as it is in the base
                frozen[type_url] = base.get(type_url)
                encoded[type_url] = base.encoded.get(type_url, MappingProxyType({}))
                resource_versions[type_url] = base.resource_versions.get(
                    type_url, MappingProxyType({})
                )
                versions[type_url] = base.versions.get(type_url) or set_version({})
                continue
            messages = dict(inherited.get(type_url, {}))
            raw = dict(base.encoded.get(type_url, {})) if base is not None else {}
            content = dict(base.resource_versions.get(type_url, {})) if base is not None else {}
            for name, message in resources.get(type_url, {}).items():
                messages[name] = message
                raw[name] = data = message.SerializeToString(deterministic=True)
                content[name] = content_version(data)
            order = sorted(messages)
            frozen[type_url] = MappingProxyType({name: messages[name] for name in order})
            encoded[type_url] = MappingProxyType({name: raw[name] for name in order})
            resource_versions[type_url] = MappingProxyType({name: content[name] for name in order})
            versions[type_url] = set_version(content)
        if base is not None:
            secret_names = (*base.secret_names, *secret_names)
        return cls(
            MappingProxyType(frozen),
            MappingProxyType(encoded),
            MappingProxyType(resource_versions),
            MappingProxyType(versions),
            tuple(sorted(set(secret_names))),
        )

    def get(self, type_url: str) -> Mapping[str, Message]:
        return self.resources.get(type_url, _EMPTY)

    def resource_version(self, type_url: str, name: str) -> str | None:
        """One resource's content version (delta xDS), None when it is not in the snapshot."""
        return self.resource_versions.get(type_url, {}).get(name)
