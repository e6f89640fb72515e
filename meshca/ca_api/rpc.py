"""The ``meshca.ca.v1.AgentCA`` service on the wire, built from its descriptor in
``ca_pb2``: the server's method handlers and the client's callables, one per method of
``ca.proto``. Every method is unary and (de)serialises its own request and response
messages, so one loop over the descriptor does what a generated ``_pb2_grpc`` module
spells out method by method."""

from __future__ import annotations

import grpc
import grpc.aio
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from meshca.ca_api import ca_pb2

SERVICE = ca_pb2.DESCRIPTOR.services_by_name["AgentCA"]


def add_agent_ca(servicer: object, server: grpc.aio.Server) -> None:
    """Serve ``servicer``'s methods, named as in ``ca.proto``, on ``server``."""
    handlers = {
        method.name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name),
            request_deserializer=GetMessageClass(method.input_type).FromString,
            response_serializer=GetMessageClass(method.output_type).SerializeToString,
        )
        for method in SERVICE.methods
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),)
    )


class AgentCaStub:
    """The client side on ``channel``: :meth:`call` sends one request to a method."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._methods = {
            method.name: channel.unary_unary(
                f"/{SERVICE.full_name}/{method.name}",
                request_serializer=GetMessageClass(method.input_type).SerializeToString,
                response_deserializer=GetMessageClass(method.output_type).FromString,
            )
            for method in SERVICE.methods
        }

    def call(self, method: str, request: Message, *, timeout: float | None = None) -> Message:
        """``method``'s response to ``request``; a failed call raises grpc.RpcError."""
        response: Message = self._methods[method](request, timeout=timeout)
        return response
