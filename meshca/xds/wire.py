"""The discovery services' registration with gRPC, with a response serializer that also
takes bytes: a response many streams share (one trust bundle pushed to every stream) is
serialized once by the engine and the same bytes written to each stream."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import Message


def encode(response: Message | bytes) -> bytes:
    """The wire form of a response: bytes already serialized pass as they are."""
    return response if isinstance(response, bytes) else response.SerializeToString()


def add_discovery_service(
    server: grpc.aio.Server,
    service: str,
    *,
    sotw: Callable[..., Any],
    delta: Callable[..., Any],
    fetch: Callable[..., Any] | None = None,
) -> None:
    """Register ``service`` (its full name) with its state-of-the-world and delta
    streams and, for SDS, the unary fetch; each handler is named by its method's name."""
    handlers = {
        sotw.__name__: grpc.stream_stream_rpc_method_handler(
            sotw,
            request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
            response_serializer=encode,
        ),
        delta.__name__: grpc.stream_stream_rpc_method_handler(
            delta,
            request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
            response_serializer=encode,
        ),
    }
    if fetch is not None:
        handlers[fetch.__name__] = grpc.unary_unary_rpc_method_handler(
            fetch,
            request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
            response_serializer=encode,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    # as generated code does (the core then matches these methods without a lookup)
    server.add_registered_method_handlers(service, handlers)  # type: ignore[attr-defined]
