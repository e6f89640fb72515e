"""The one xDS protocol engine: state of the world and delta, over any resource type.

Resources come from a :class:`ResourceSource` per type URL, which turns a caller's
subscribed names into ``name -> Resource | ResourceError``. The engine owns the
protocol: versions, nonces, ACK/NACK, subscriptions, pushes. SDS is this engine with
one source; ADS is the same engine with several sources on one stream.

Rules (each stream keeps them per type URL):

* every response has a fresh nonce; a resource's version is a hash of its content,
  so unchanged content keeps its version and a push happens only when content differs
  from what was last sent: an ACKed or NACKed payload is never sent again as is;
* an ACK (the latest nonce, no ``error_detail``) records what the proxy applied and the
  push-to-ACK latency; a NACK is logged and counted, and nothing is resent until the
  content changes;
* SotW: a request carrying a nonce that is not the latest is stale and ignored (its
  ``resource_names`` are repeated by the proxy's next ACK); a changed name set is
  answered with every subscribed resource; a first request whose ``version_info``
  equals the current version (a reconnecting proxy) gets no redundant response;
* Delta: a stale nonce does not count as ACK/NACK, but its subscribe/unsubscribe
  lists are applied (they are never repeated); ``initial_resource_versions`` is
  honoured; a subscribed resource that disappears is sent in ``removed_resources``;
  an unsubscribed name is forgotten (the proxy already dropped it), so subscribing
  again sends it again;
* the node of the first request that carries one is kept for the stream and checked
  against the caller once (:meth:`meshca.xds.auth.Caller.with_node`); the checked
  caller is what the sources see on every resolve of the stream.

Errors: a name that cannot be served when it is first subscribed (malformed, unknown,
forbidden) ends the stream with that status code and a message naming the caller and
the name. Envoy opens one SDS stream per secret, so this fails only that secret, loudly,
and Envoy retries with backoff. A resource that disappears later is removed (Delta)
or left as the proxy last received it (SotW cannot express removal for SDS); a
transient failure keeps the last resource sent.

On ADS one stream carries every type, so ending it for one name would drop the proxy's
whole configuration: a mesh change racing with Envoy's first request for an endpoint,
route or secret name (or a reconnecting proxy asking again for the secret of a service
removed meanwhile) would restart the stream, again on each reconnect. Types listed in
``absent_types`` treat NOT_FOUND as "does not exist (yet)": the name is omitted (SotW)
or not sent (Delta) until it exists, and removed like any resource that disappears.
Every other refusal, above all PERMISSION_DENIED, still ends the stream.

Each stream runs in its own task: change notifications only set the stream's wake-up
event, so a proxy that never reads (``write`` blocks on flow control) delays nobody.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import grpc.aio
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from meshca.util import gc_pause
from meshca.util.aio import wait_event
from meshca.util.logger import get_logger
from meshca.util.logs import Throttle, shorten, suppressed_note
from meshca.xds.auth import WARNING_INTERVAL, Caller, Forbidden, bounded_text
from meshca.xds.limits import CallerLimits
from meshca.xds.resources import TYPE_PREFIX, content_version, set_version
from meshca.xds.stats import XdsStats

log = get_logger("meshca.xds")

WILDCARD = "*"
INBOX_SIZE = 64
# Streams a change wakes are let run this many at a time, with a look at the sockets in
# between: the first pushes leave (and their ACKs come back) while later streams are
# still being computed, instead of every stream computing before any byte is sent.
WAKE_BATCH = 256
# A change waking this many streams pauses the cyclic GC until they have pushed (when
# the process opted in: meshca.util.gc_pause); one identity's renewal does not.
GC_PAUSE_AT = 1000
MAX_MESSAGE = 1024  # characters of a refusal message (it can echo what the caller sent)
# Stream ids are unique in the process, so one source can serve several engines (SDS, ADS).
_stream_ids = itertools.count(1)

# Which refusal ends a stream when several names fail at once: the security signal first.
_CODE_PRIORITY = {
    grpc.StatusCode.PERMISSION_DENIED: 0,
    grpc.StatusCode.UNAUTHENTICATED: 1,
    grpc.StatusCode.INVALID_ARGUMENT: 2,
    grpc.StatusCode.NOT_FOUND: 3,
    grpc.StatusCode.FAILED_PRECONDITION: 4,
}


@dataclass(frozen=True)
class Resource:
    """One named, versioned resource, already packed as the ``Any`` sent on the wire."""

    name: str
    version: str
    body: any_pb2.Any = field(repr=False)

    @classmethod
    def of(cls, name: str, message: Message) -> Resource:
        data = message.SerializeToString(deterministic=True)
        body = any_pb2.Any(type_url=TYPE_PREFIX + message.DESCRIPTOR.full_name, value=data)
        return cls(name, content_version(data), body)


@dataclass(frozen=True)
class ResourceError:
    """Why one name cannot be served: a gRPC status code and a message for the proxy."""

    code: grpc.StatusCode
    message: str


Resolution = Mapping[str, Resource | ResourceError]


class StreamHandle(Protocol):
    """What a source sees of a stream: who is on it, and how to wake it after a change."""

    @property
    def id(self) -> int: ...

    @property
    def caller(self) -> Caller: ...

    @property
    def node(self) -> Any: ...

    def wake(self, type_url: str | None = None) -> None: ...


class ResourceSource(Protocol):
    """Resources of one type URL, resolved per caller.

    ``resolve`` must answer every name it is given (``names`` None: a wildcard
    subscription, answer every resource the caller may see). ``watch`` is told the
    stream's full name set whenever it changes (before the matching ``resolve``), so
    the source can wake the stream when one of them changes; ``unwatch`` when the
    stream ends.
    """

    type_url: str
    wildcard: bool

    async def resolve(
        self, caller: Caller, node: Any, names: frozenset[str] | None
    ) -> Resolution: ...

    def watch(self, stream: StreamHandle, names: frozenset[str] | None) -> None: ...

    def unwatch(self, stream: StreamHandle) -> None: ...


class StreamRefused(Exception):
    """End the stream with ``code``; the message goes to the proxy and to the log."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class TypeStatus:
    names: frozenset[str] | None
    sent_version: str | None
    acked_version: str | None
    awaiting_ack: bool
    nacked: bool


@dataclass(frozen=True)
class StreamStatus:
    """A read-only view of one stream, for operators and for waiting on ACKs."""

    id: int
    kind: str
    caller: str
    node_id: str
    writing: bool
    types: Mapping[str, TypeStatus]
    pending: bool = False  # a request to handle or a change to push: its state is moving
    identity: str = ""  # the caller's identities, without how it came (stable on reconnect)


@dataclass
class _TypeState:
    source: ResourceSource
    names: frozenset[str] | None = frozenset()
    unserved: set[str] = field(default_factory=set)  # subscribed, never resolved yet
    nonce: str | None = None
    nonce_number: int = 0  # SotW: the engine-wide number behind ``nonce``
    sent_at: float = 0.0
    awaiting_ack: bool = False
    nacked: bool = False
    # SotW: resources of the last response; Delta: what the proxy holds, name -> Resource
    sent: dict[str, Resource] = field(default_factory=dict)
    sent_version: str | None = None
    acked_version: str | None = None
    client_version: str | None = None  # SotW: version_info of a reconnecting proxy
    client: dict[str, str] = field(default_factory=dict)  # Delta: name -> version held
    requested: bool = False  # a request for this type arrived (the first one is answered)

    def status(self) -> TypeStatus:
        return TypeStatus(
            self.names, self.sent_version, self.acked_version, self.awaiting_ack, self.nacked
        )


def _check_node(caller: Caller, node: Any, names: Iterable[str]) -> Caller:
    """The caller bound to ``node`` (checked once, reused by every resolve on the stream);
    StreamRefused when the node claims another identity, saying what was asked for."""
    try:
        return caller.with_node(node)
    except Forbidden as exc:
        raise StreamRefused(
            grpc.StatusCode.PERMISSION_DENIED,
            f"caller {caller}: {exc}; refused request for {_some_names(names)}",
        ) from None


def _some_names(names: Iterable[str], shown: int = 3) -> str:
    """A few of ``names`` for a message (a request may carry thousands), and how many more."""
    listed = sorted(names)
    text = ", ".join(repr(bounded_text(n)) for n in listed[:shown]) or "nothing yet"
    return f"{text} and {len(listed) - shown} more" if len(listed) > shown else text


class _Stream:
    """Shared machinery of a stream: inbox, wake-up event, writes, ACK bookkeeping."""

    kind = ""

    def __init__(
        self,
        engine: XdsEngine,
        caller: Caller,
        context: grpc.aio.ServicerContext[Any, Any],
        default_type_url: str | None,
    ) -> None:
        self.engine = engine
        self.id = next(_stream_ids)
        self.caller = caller
        self.context = context
        self.default_type_url = default_type_url
        self.node: Any = None
        self.types: dict[str, _TypeState] = {}
        self.writing = False
        self._event = asyncio.Event()
        self._inbox: asyncio.Queue[Any] = asyncio.Queue(INBOX_SIZE)
        self._dirty: set[str] = set()
        self._nonces = itertools.count(1)
        self._reader_done = False
        self._queued = False  # waiting in the engine's wake-up queue
        # (caller, node) -> (description, identities, node id): worked out once, not on
        # every status read (rotation reads every stream's status while it waits).
        self._names: tuple[Caller, Any, str, str, str] | None = None

    def names(self) -> tuple[str, str, str]:
        """(the caller as logs name it, its identities, the node id), cached."""
        cached = self._names
        if cached is None or cached[0] is not self.caller or cached[1] is not self.node:
            node_id = str(self.node.id) if self.node is not None else ""
            caller = self.caller
            cached = (caller, self.node, str(caller), caller.describe_identities(), node_id)
            self._names = cached
        return cached[2], cached[3], cached[4]

    # --- what sources and the engine call ---------------------------------------
    def wake(self, type_url: str | None = None) -> None:
        """Recompute ``type_url`` (all types when None) in the stream's own task."""
        self._dirty.update([type_url] if type_url else self.types)
        self.engine._mark(self, settled=False)
        self.engine._mark_woken(self)
        self.engine._let_run(self)

    def status(self) -> StreamStatus:
        caller, identity, node_id = self.names()
        return StreamStatus(
            self.id,
            self.kind,
            caller,
            node_id,
            self.writing,
            {url: state.status() for url, state in self.types.items()},
            self.pending,
            identity,
        )

    @property
    def pending(self) -> bool:
        """A change or a request waits to be handled: the stream is not at rest."""
        return bool(self._dirty) or not self._inbox.empty()

    # --- the task -------------------------------------------------------------
    async def run(self, requests: AsyncIterator[Any]) -> None:
        reader = asyncio.get_running_loop().create_task(self._read(requests))
        try:
            while True:
                await self._event.wait()
                self._event.clear()
                while not self._inbox.empty():
                    self._handle(self._inbox.get_nowait())
                if self._reader_done and self._inbox.empty():
                    return  # the proxy closed its side (or the transport failed)
                dirty = [url for url in self.engine._type_order if url in self._dirty]
                self._dirty.clear()
                for type_url in dirty:
                    if type_url in self.types:
                        await self._push(type_url, self.types[type_url])
                if not self._dirty:
                    self.engine._mark_pushed(self)
                self.engine._mark(self, settled=self._settled())
        except StreamRefused as refusal:
            await self._refuse(refusal)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            for state in self.types.values():
                state.source.unwatch(self)
            self.engine._forget(self)

    async def _read(self, requests: AsyncIterator[Any]) -> None:
        try:
            async for request in requests:
                await self._inbox.put(request)
                # Unsettled from now until handled and answered: a first request (or a
                # new subscription) being resolved is not yet ACKed content.
                self.engine._mark(self, settled=False)
                self._event.set()
        finally:
            self._reader_done = True
            self._event.set()

    def _settled(self) -> bool:
        return (
            not self._dirty
            and self._inbox.empty()
            and all(
                s.nonce is None or (not s.awaiting_ack and not s.nacked)
                for s in self.types.values()
            )
        )

    async def _refuse(self, refusal: StreamRefused) -> None:
        self.engine.stats.refusals[refusal.code.name] += 1
        message = shorten(refusal.message, MAX_MESSAGE)
        held_back = self.engine.warnings.allow((self.caller.account, refusal.code))
        if held_back is not None:
            log.warning(
                "%s stream %d refused (%s): caller %s: %s%s",
                self.kind,
                self.id,
                refusal.code.name,
                self.caller,
                message,
                suppressed_note(held_back),
            )
        await self.context.abort(refusal.code, message)

    # --- request handling shared by both variants ---------------------------------
    def _accept_node(self, request: Any, names: Iterable[str]) -> None:
        if self.node is None and request.HasField("node"):
            node = request.node
            self.caller = _check_node(self.caller, node, names)
            self.node = node
            self.engine._membership += 1

    def _state_for(self, request: Any) -> tuple[str, _TypeState]:
        type_url = request.type_url or self.default_type_url or ""
        state = self.types.get(type_url)
        if state is None:
            source = self.engine.sources.get(type_url)
            if source is None:
                served = ", ".join(self.engine.sources) or "none"
                raise StreamRefused(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"resource type {type_url or '(empty)'!r} is not served (served: {served})",
                )
            state = _TypeState(source)
            self.types[type_url] = state
            self.engine._membership += 1
        return type_url, state

    def _answer(self, type_url: str, state: _TypeState, request: Any) -> None:
        """Record an ACK or NACK of our latest response (the nonce was checked)."""
        stats = self.engine.stats
        state.awaiting_ack = False
        if request.HasField("error_detail"):
            state.nacked = True
            stats.nacks[type_url] += 1
            held_back = self.engine.warnings.allow((self.caller.account, "nack", type_url))
            if held_back is not None:
                log.warning(
                    "%s stream %d: caller %s rejected version %s of %s (nonce %s): %s%s",
                    self.kind,
                    self.id,
                    self.caller,
                    state.sent_version,
                    type_url,
                    state.nonce,
                    shorten(request.error_detail.message or f"code {request.error_detail.code}"),
                    suppressed_note(held_back),
                )
        else:
            state.nacked = False
            state.acked_version = state.sent_version
            stats.acks[type_url] += 1
            stats.ack_latency.record(time.monotonic() - state.sent_at)

    def _subscribe(self, type_url: str, state: _TypeState, names: frozenset[str] | None) -> None:
        if names == state.names:
            return
        count = len(names) if names is not None else 0  # a wildcard's size is the mesh's
        problem = self.engine.limits.watch(self.caller, self.id, type_url, count)
        if problem is not None:
            raise StreamRefused(grpc.StatusCode.RESOURCE_EXHAUSTED, problem)
        added = names - state.names if names is not None and state.names is not None else set()
        state.unserved = (state.unserved | added) & names if names is not None else set()
        state.names = names
        state.source.watch(self, names)
        self._dirty.add(type_url)

    def _resolved(
        self, type_url: str, state: _TypeState, resolution: Resolution
    ) -> tuple[dict[str, Resource], list[str]]:
        """(resources to hold now, names that are gone); refuses names never served
        (except NOT_FOUND for a type whose missing names are absent)."""
        names: Iterable[str] = state.names if state.names is not None else resolution
        missing = [n for n in names if n not in resolution]
        if missing:
            raise StreamRefused(grpc.StatusCode.INTERNAL, f"no answer for resource {missing[0]!r}")
        self.engine._refuse_first(type_url, [resolution[n] for n in names if n in state.unserved])
        current: dict[str, Resource] = {}
        gone: list[str] = []
        for name in names:
            result = resolution[name]
            if isinstance(result, Resource):
                current[name] = result
                state.unserved.discard(name)
            elif result.code == grpc.StatusCode.NOT_FOUND:
                if name in state.unserved:
                    log.debug(
                        "%s stream %d: caller %s: %s (absent until it exists)",
                        self.kind,
                        self.id,
                        self.caller,
                        result.message,
                    )
                gone.append(name)
            elif name in state.sent:
                current[name] = state.sent[name]  # transient: keep what the proxy has
        return current, gone

    async def _resolve(self, state: _TypeState) -> Resolution:
        return await state.source.resolve(self.caller, self.node, state.names)

    async def _write(
        self, type_url: str, state: _TypeState, response: Message | bytes, nonce: str
    ) -> None:
        state.nonce = nonce
        state.awaiting_ack = True
        state.nacked = False
        state.sent_at = time.monotonic()
        self.writing = True
        try:
            await self.context.write(response)
        finally:
            self.writing = False
        self.engine.stats.responses[type_url] += 1

    def _next_nonce(self) -> str:
        return format(next(self._nonces), "x")

    # --- variant specific -------------------------------------------------------
    def _handle(self, request: Any) -> None:
        raise NotImplementedError

    async def _push(self, type_url: str, state: _TypeState) -> None:
        raise NotImplementedError


class _SotwStream(_Stream):
    kind = "sotw"

    def _handle(self, request: Any) -> None:
        self.engine.stats.requests += 1
        self._accept_node(request, request.resource_names)
        type_url, state = self._state_for(request)
        nonce = request.response_nonce
        if nonce and nonce != state.nonce:
            self.engine.stats.stale_nonces[type_url] += 1
            log.debug("sotw stream %d: stale nonce %s ignored", self.id, nonce)
            return
        if nonce:
            self._answer(type_url, state, request)
        elif state.nonce is None and request.version_info:
            state.client_version = request.version_info
        names: frozenset[str] | None = frozenset(request.resource_names)
        if state.source.wildcard and (not names or WILDCARD in (names or ())):
            names = None
        if not state.requested:
            state.requested = True
            self._dirty.add(type_url)  # the first request of a type is always considered
        self._subscribe(type_url, state, names)
        if state.names is not None:  # names dropped from the subscription are not resent
            state.sent = {n: r for n, r in state.sent.items() if n in state.names}

    async def _push(self, type_url: str, state: _TypeState) -> None:
        current, gone = self._resolved(type_url, state, await self._resolve(state))
        for name in gone:  # SotW cannot remove an SDS/EDS/RDS resource: keep the last one
            if name in state.sent:
                current[name] = state.sent[name]
        versions = {name: resource.version for name, resource in current.items()}
        version = set_version(versions)
        if state.nonce is None:
            if not current and state.names is not None:
                return  # nothing subscribed yet: nothing to say
            if state.client_version == version:  # a reconnecting proxy already has this
                state.sent, state.sent_version, state.acked_version = current, version, version
                return
        elif versions == {name: r.version for name, r in state.sent.items()}:
            return
        encoded, nonce, number = self.engine._sotw_response(
            type_url, version, versions, current, state.nonce_number
        )
        state.sent, state.sent_version, state.nonce_number = current, version, number
        await self._write(type_url, state, encoded, nonce)


class _DeltaStream(_Stream):
    kind = "delta"

    def _handle(self, request: Any) -> None:
        self.engine.stats.requests += 1
        self._accept_node(request, request.resource_names_subscribe)
        type_url, state = self._state_for(request)
        first = not state.requested
        state.requested = True
        nonce = request.response_nonce
        if nonce and nonce != state.nonce:
            self.engine.stats.stale_nonces[type_url] += 1
            log.debug(
                "delta stream %d: stale nonce %s (subscriptions still applied)", self.id, nonce
            )
        elif nonce:
            self._answer(type_url, state, request)
        if first:
            state.client.update(dict(request.initial_resource_versions))
        subscribe = set(request.resource_names_subscribe)
        unsubscribe = set(request.resource_names_unsubscribe)
        wildcard = state.names is None
        if state.source.wildcard:
            if WILDCARD in subscribe or (first and not subscribe):
                wildcard = True
            if WILDCARD in unsubscribe:
                wildcard = False
        subscribe.discard(WILDCARD)
        unsubscribe.discard(WILDCARD)
        for name in unsubscribe - subscribe:
            state.client.pop(name, None)  # the proxy forgot it: a re-subscribe resends it
        names = None if wildcard else ((state.names or frozenset()) | subscribe) - unsubscribe
        if first:
            if names is not None:  # versions of names not subscribed mean nothing
                state.client = {n: v for n, v in state.client.items() if n in names}
            self._dirty.add(type_url)
        self._subscribe(type_url, state, names)

    async def _push(self, type_url: str, state: _TypeState) -> None:
        resolution = await self._resolve(state)
        current, gone = self._resolved(type_url, state, resolution)
        updates = [r for name, r in sorted(current.items()) if state.client.get(name) != r.version]
        removed = sorted(name for name in gone if name in state.client)
        if state.names is None:  # wildcard: whatever the proxy holds that no longer exists
            removed += sorted(n for n in state.client if n not in resolution and n not in removed)
        if not updates and not removed:
            return
        for resource in updates:
            state.client[resource.name] = resource.version
            state.sent[resource.name] = resource
        for name in removed:
            state.client.pop(name, None)
            state.sent.pop(name, None)
        version = set_version(state.client)
        response = discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=version,
            resources=[
                discovery_pb2.Resource(name=r.name, version=r.version, resource=r.body)
                for r in updates
            ],
            removed_resources=removed,
            type_url=type_url,
            nonce=self._next_nonce(),
        )
        state.sent_version = version
        await self._write(type_url, state, response, response.nonce)


class XdsEngine:
    """Serves the resource types of ``sources`` over SotW, Delta and unary fetch.

    ``absent_types``: type URLs whose NOT_FOUND names are absent rather than refused
    (see the module's notes on errors); ADS passes its generated types.
    """

    def __init__(
        self,
        sources: Sequence[ResourceSource],
        stats: XdsStats | None = None,
        *,
        limits: CallerLimits | None = None,
        absent_types: Iterable[str] = (),
    ) -> None:
        self.sources: dict[str, ResourceSource] = {s.type_url: s for s in sources}
        self.absent_types = frozenset(absent_types)
        unknown = sorted(self.absent_types - set(self.sources))
        if unknown:
            raise ValueError(f"absent_types names types that are not served: {unknown}")
        self._type_order = [s.type_url for s in sources]  # ADS: make before break
        self.stats = stats or XdsStats()
        self.limits = limits or CallerLimits()  # shared by the engines of one server
        # one warning per caller and kind per interval; the rest are counted in the next
        self.warnings = Throttle(WARNING_INTERVAL)
        self._streams: dict[int, _Stream] = {}
        self._unsettled: set[int] = set()
        self._all_settled = asyncio.Event()
        self._all_settled.set()
        self._woken: set[int] = set()  # streams a change woke that have not pushed yet
        self._all_pushed = asyncio.Event()
        self._all_pushed.set()
        self._gc_paused = False  # this engine holds a fan-out pause of the cyclic GC
        # Bumped whenever who is connected may read differently (a stream asks for a new
        # type, names its node, or ends): :meth:`proxies` is worked out again only then.
        self._membership = 0
        self._proxies: tuple[int, list[tuple[str, str]]] = (-1, [])
        self._to_wake: collections.deque[_Stream] = collections.deque()
        self._waking = False
        # SotW nonces are numbered engine-wide, so streams sent the same content can share
        # one serialized response: type URL -> (resource versions, nonce number, nonce,
        # bytes).
        self._nonce_numbers = itertools.count(1)
        self._encoded: dict[str, tuple[dict[str, str], int, str, bytes]] = {}

    # --- the three RPC shapes ------------------------------------------------------
    async def run_sotw(
        self,
        caller: Caller,
        requests: AsyncIterator[Any],
        context: grpc.aio.ServicerContext[Any, Any],
        *,
        default_type_url: str | None = None,
    ) -> None:
        await self._run(_SotwStream(self, caller, context, default_type_url), requests)

    async def run_delta(
        self,
        caller: Caller,
        requests: AsyncIterator[Any],
        context: grpc.aio.ServicerContext[Any, Any],
        *,
        default_type_url: str | None = None,
    ) -> None:
        await self._run(_DeltaStream(self, caller, context, default_type_url), requests)

    async def fetch(
        self,
        caller: Caller,
        request: Any,
        context: grpc.aio.ServicerContext[Any, Any],
        *,
        default_type_url: str | None = None,
    ) -> Any:
        """Unary fetch: every named resource, or the status code of the first refusal."""
        self.stats.fetches += 1
        type_url = request.type_url or default_type_url or ""
        try:
            source = self.sources.get(type_url)
            if source is None:
                raise StreamRefused(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"resource type {type_url!r} is not served here",
                )
            node = request.node if request.HasField("node") else None
            caller = _check_node(caller, node, request.resource_names)
            names = frozenset(request.resource_names)
            if not names and not source.wildcard:
                raise StreamRefused(
                    grpc.StatusCode.INVALID_ARGUMENT, "name the resources to fetch (resource_names)"
                )
            problem = self.limits.request(len(names))
            if problem is not None:
                raise StreamRefused(grpc.StatusCode.RESOURCE_EXHAUSTED, problem)
            resolution = await source.resolve(
                caller, node, None if source.wildcard and not names else names
            )
            self._refuse_first(type_url, resolution.values())
        except StreamRefused as refusal:
            self.stats.refusals[refusal.code.name] += 1
            message = shorten(refusal.message, MAX_MESSAGE)
            held_back = self.warnings.allow((caller.account, refusal.code))
            if held_back is not None:
                log.warning(
                    "fetch refused (%s): caller %s: %s%s",
                    refusal.code.name,
                    caller,
                    message,
                    suppressed_note(held_back),
                )
            await context.abort(refusal.code, message)
        current = {n: r for n, r in resolution.items() if isinstance(r, Resource)}
        return discovery_pb2.DiscoveryResponse(
            version_info=set_version({n: r.version for n, r in current.items()}),
            resources=[current[n].body for n in sorted(current)],
            type_url=type_url,
        )

    def _refuse_first(self, type_url: str, results: Iterable[Resource | ResourceError]) -> None:
        """Refuse with the most telling error among ``results``, if any (NOT_FOUND of a
        type whose missing names are absent is no refusal)."""
        absent_ok = type_url in self.absent_types
        errors = [
            r
            for r in results
            if isinstance(r, ResourceError)
            and not (absent_ok and r.code == grpc.StatusCode.NOT_FOUND)
        ]
        if errors:
            error = min(errors, key=lambda e: _CODE_PRIORITY.get(e.code, 9))
            raise StreamRefused(error.code, error.message)

    @property
    def max_names(self) -> int:
        return self.limits.max_names

    @max_names.setter
    def max_names(self, value: int) -> None:
        self.limits.max_names = value

    async def _run(self, stream: _Stream, requests: AsyncIterator[Any]) -> None:
        problem = self.limits.open_stream(stream.caller)
        if problem is not None:
            await stream._refuse(StreamRefused(grpc.StatusCode.RESOURCE_EXHAUSTED, problem))
        self._streams[stream.id] = stream
        self.stats.streams_opened += 1
        log.debug("%s stream %d opened by %s", stream.kind, stream.id, stream.caller)
        try:
            await stream.run(requests)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:
            log.exception("%s stream %d from %s failed", stream.kind, stream.id, stream.caller)
            await stream.context.abort(grpc.StatusCode.INTERNAL, "internal error; see server log")
        finally:
            self.limits.close_stream(stream.caller, stream.id)

    def _forget(self, stream: _Stream) -> None:
        if self._streams.pop(stream.id, None) is not None:
            self._membership += 1
            self.stats.streams_closed += 1
            self._mark(stream, settled=True)
            self._mark_pushed(stream)
            log.debug("%s stream %d closed", stream.kind, stream.id)

    def _mark(self, stream: _Stream, *, settled: bool) -> None:
        if settled or stream.id not in self._streams:
            self._unsettled.discard(stream.id)
            if not self._unsettled:
                self._all_settled.set()
        else:
            self._unsettled.add(stream.id)
            self._all_settled.clear()

    def _sotw_response(
        self,
        type_url: str,
        version: str,
        versions: dict[str, str],
        current: Mapping[str, Resource],
        after: int,
    ) -> tuple[bytes, str, int]:
        """(serialized response, nonce, nonce number) for ``current`` at ``version``.
        The last one built for ``type_url`` is reused when it holds exactly the same
        resource names and versions (``versions``: not only the same set hash, so no
        collision of that hash could hand one identity's secret to another's stream) and
        its nonce is newer than the stream's latest (``after``): many streams sent the
        same change share one serialization, and each stream still sees only fresh
        nonces."""
        cached = self._encoded.get(type_url)
        if cached is not None and cached[0] == versions and cached[1] > after:
            return cached[3], cached[2], cached[1]
        number = next(self._nonce_numbers)
        nonce = format(number, "x")
        encoded = discovery_pb2.DiscoveryResponse(
            version_info=version,
            resources=[current[name].body for name in sorted(current)],
            type_url=type_url,
            nonce=nonce,
        ).SerializeToString()
        self._encoded[type_url] = (versions, number, nonce, encoded)
        return encoded, nonce, number

    def _let_run(self, stream: _Stream) -> None:
        """Wake ``stream``'s task, :data:`WAKE_BATCH` streams per turn of the event loop."""
        if stream._queued:
            return
        stream._queued = True
        self._to_wake.append(stream)
        if not self._waking:
            self._waking = True
            asyncio.get_running_loop().call_soon(self._wake_batch)

    def _wake_batch(self) -> None:
        queue = self._to_wake
        for _ in range(min(WAKE_BATCH, len(queue))):
            stream = queue.popleft()
            stream._queued = False
            stream._event.set()
        if queue:
            asyncio.get_running_loop().call_soon(self._wake_batch)
        else:
            self._waking = False

    def _mark_woken(self, stream: _Stream) -> None:
        if stream.id in self._streams:
            self._woken.add(stream.id)
            self._all_pushed.clear()
            if len(self._woken) == GC_PAUSE_AT and not self._gc_paused:
                # a change fans out to many streams: no cyclic GC till it is out
                self._gc_paused = True
                gc_pause.fan_out.begin()

    def _mark_pushed(self, stream: _Stream) -> None:
        if stream.id not in self._woken:
            return
        self._woken.discard(stream.id)
        if not self._woken:
            self._all_pushed.set()
            if self._gc_paused:
                self._gc_paused = False
                gc_pause.fan_out.end()

    # --- operators, rotation and benchmarks --------------------------------------------
    def wake_all(self) -> None:
        """An input of every resource may have changed (e.g. the mesh file): recompute all."""
        for stream in list(self._streams.values()):
            stream.wake()

    def wake_each(self, types: Callable[[Caller, Any], str | None]) -> None:
        """Recompute, on each stream, the type ``types(caller, node)`` names (every type
        when None): a change whose reach differs by proxy."""
        for stream in list(self._streams.values()):
            stream.wake(types(stream.caller, stream.node))

    def streams(self) -> list[StreamStatus]:
        return [s.status() for s in self._streams.values()]

    def proxies(self) -> list[tuple[str, str]]:
        """(node id, identities) of every stream that has asked for something: who is
        connected, without a full :meth:`streams` view of each. The same list object
        while nobody connected, asked or left (rotation reads it every second)."""
        at, proxies = self._proxies
        if at != self._membership:
            named = (s.names() for s in self._streams.values() if s.types)
            proxies = [(node_id, identities) for _, identities, node_id in named]
            self._proxies = (self._membership, proxies)
        return proxies

    def unsettled(self) -> list[StreamStatus]:
        """Streams with a push to make or a response not yet ACKed (NACKed ones included)."""
        return [self._streams[i].status() for i in sorted(self._unsettled) if i in self._streams]

    def unsettled_proxies(self) -> set[tuple[str, str]]:
        """(node id, caller) of every unsettled stream: what :meth:`unsettled` names,
        without a status of each. Rotation asks it on every poll while tens of thousands
        of streams push; a status per stream there was hundreds of thousands of objects
        per poll for the cyclic GC to walk (a proxy's streams share one entry)."""
        proxies = set()
        for i in self._unsettled:
            stream = self._streams.get(i)
            if stream is not None:
                caller, _, node_id = stream.names()
                proxies.add((node_id, caller))
        return proxies

    def refusing_proxies(self) -> set[tuple[str, str]]:
        """(node id, caller) of every unsettled stream at rest (nothing to push or being
        written) whose last response of some type was NACKed: it will not ACK that."""
        refusing = set()
        for i in self._unsettled:
            stream = self._streams.get(i)
            if stream is None or stream.writing or stream.pending:
                continue
            if any(state.nacked for state in stream.types.values()):
                caller, _, node_id = stream.names()
                refusing.add((node_id, caller))
        return refusing

    async def wait_pushed(self, timeout: float) -> None:
        """Wait until every stream a change woke has written its push (or found nothing
        to send), at most ``timeout`` seconds: what a reply composed from every stream's
        state waits for, so that composing it never delays a push."""
        await wait_event(self._all_pushed, timeout)

    async def wait_settled(self, timeout: float) -> list[StreamStatus]:
        """Wait until every stream has ACKed what it was sent; returns who had not by then."""
        await wait_event(self._all_settled, timeout)
        return self.unsettled()
