"""meshca's CSR API (``meshca.ca.v1.AgentCA``): attested agents send CSRs, never keys.

``ca.proto`` is the contract; ``ca_pb2*`` are generated from it (``make protos``).
"""
