"""meshca's gRPC services on the wire, built from their descriptors: the server's method
handlers and the client's callables, one per method of a ``.proto`` service
(``meshca.ca.v1.AgentCA`` in ``ca_pb2``, Istio's ``istio.v1.auth.IstioCertificateService``
in ``istio_ca_pb2``). Every method is unary and (de)serialises its own request and
response messages, so one loop over the descriptor does what a generated ``_pb2_grpc``
module spells out method by method."""

from __future__ import annotations

import grpc
import grpc.aio
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from meshca.ca_api import ca_pb2

SERVICE = ca_pb2.DESCRIPTOR.services_by_name["AgentCA"]


def add_unary_service(
    servicer: object, server: grpc.aio.Server, service: ServiceDescriptor = SERVICE
) -> None:
    """Serve ``servicer``'s methods, named as in the service's ``.proto``, on ``server``."""
    handlers = {
        method.name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name),
            request_deserializer=GetMessageClass(method.input_type).FromString,
            response_serializer=GetMessageClass(method.output_type).SerializeToString,
        )
        for method in service.methods
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )


def add_agent_ca(servicer: object, server: grpc.aio.Server) -> None:
    """Serve ``meshca.ca.v1.AgentCA``."""
    add_unary_service(servicer, server, SERVICE)


class AgentCaStub:
    """The client side on ``channel``: :meth:`call` sends one request to a method."""

    def __init__(self, channel: grpc.Channel, service: ServiceDescriptor = SERVICE) -> None:
        self._methods = {
            method.name: channel.unary_unary(
                f"/{service.full_name}/{method.name}",
                request_serializer=GetMessageClass(method.input_type).SerializeToString,
                response_deserializer=GetMessageClass(method.output_type).FromString,
            )
            for method in service.methods
        }

    def call(self, method: str, request: Message, *, timeout: float | None = None) -> Message:
        """``method``'s response to ``request``; a failed call raises grpc.RpcError."""
        response: Message = self._methods[method](request, timeout=timeout)
        return response
