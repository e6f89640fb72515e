"""Call CreateCertificate with the stub generated from Istio's proto, as istio-agent does
(a bearer token in ``authorization`` metadata, TLS to the CA). Reads one JSON object on
stdin: ``address``, ``roots`` (PEM), ``calls`` (each ``token``, ``csr``, ``validity``,
``metadata``); prints one JSON line per call: the status code name, its details and
``cert_chain``. Imports nothing of meshca."""

import json
import sys

import grpc
from google.protobuf import struct_pb2
from security.v1alpha1 import ca_pb2, ca_pb2_grpc


def main() -> None:
    job = json.load(sys.stdin)
    credentials = grpc.ssl_channel_credentials(job["roots"].encode())
    with grpc.secure_channel(job["address"], credentials) as channel:
        stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)
        for call in job["calls"]:
            metadata = struct_pb2.Struct()
            metadata.update(call.get("metadata") or {})
            request = ca_pb2.IstioCertificateRequest(
                csr=call["csr"], validity_duration=call.get("validity", 0), metadata=metadata
            )
            auth = [("authorization", "Bearer " + call["token"])] if call.get("token") else []
            try:
                response = stub.CreateCertificate(request, metadata=auth, timeout=30)
                result = {"code": "OK", "details": "", "cert_chain": list(response.cert_chain)}
            except grpc.RpcError as exc:
                result = {"code": exc.code().name, "details": exc.details(), "cert_chain": []}
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
