from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SignJwtRequest(_message.Message):
    __slots__ = ("spiffe_id", "audience", "ttl_seconds")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    audience: _containers.RepeatedScalarFieldContainer[str]
    ttl_seconds: int
    def __init__(self, spiffe_id: _Optional[str] = ..., audience: _Optional[_Iterable[str]] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class JwtResponse(_message.Message):
    __slots__ = ("token", "expires_at")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    token: str
    expires_at: int
    def __init__(self, token: _Optional[str] = ..., expires_at: _Optional[int] = ...) -> None: ...

class AttestAgentRequest(_message.Message):
    __slots__ = ("attestor", "evidence", "csr")
    ATTESTOR_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    CSR_FIELD_NUMBER: _ClassVar[int]
    attestor: str
    evidence: bytes
    csr: bytes
    def __init__(self, attestor: _Optional[str] = ..., evidence: _Optional[bytes] = ..., csr: _Optional[bytes] = ...) -> None: ...

class RenewAgentRequest(_message.Message):
    __slots__ = ("csr",)
    CSR_FIELD_NUMBER: _ClassVar[int]
    csr: bytes
    def __init__(self, csr: _Optional[bytes] = ...) -> None: ...

class SignWorkloadRequest(_message.Message):
    __slots__ = ("spiffe_id", "csr", "ttl_seconds")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    CSR_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    csr: bytes
    ttl_seconds: int
    def __init__(self, spiffe_id: _Optional[str] = ..., csr: _Optional[bytes] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class BatchSignWorkloadRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[SignWorkloadRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[SignWorkloadRequest, _Mapping]]] = ...) -> None: ...

class BatchSignWorkloadResponse(_message.Message):
    __slots__ = ("results", "bundle", "entitled", "reattest_by")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    ENTITLED_FIELD_NUMBER: _ClassVar[int]
    REATTEST_BY_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SignResult]
    bundle: _containers.RepeatedScalarFieldContainer[bytes]
    entitled: _containers.RepeatedScalarFieldContainer[str]
    reattest_by: int
    def __init__(self, results: _Optional[_Iterable[_Union[SignResult, _Mapping]]] = ..., bundle: _Optional[_Iterable[bytes]] = ..., entitled: _Optional[_Iterable[str]] = ..., reattest_by: _Optional[int] = ...) -> None: ...

class SignResult(_message.Message):
    __slots__ = ("spiffe_id", "cert_chain", "code", "error")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    CERT_CHAIN_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    cert_chain: _containers.RepeatedScalarFieldContainer[bytes]
    code: int
    error: str
    def __init__(self, spiffe_id: _Optional[str] = ..., cert_chain: _Optional[_Iterable[bytes]] = ..., code: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class GetBundleRequest(_message.Message):
    __slots__ = ("jwt_kids", "trust_bundle_sha256")
    JWT_KIDS_FIELD_NUMBER: _ClassVar[int]
    TRUST_BUNDLE_SHA256_FIELD_NUMBER: _ClassVar[int]
    jwt_kids: _containers.RepeatedScalarFieldContainer[str]
    trust_bundle_sha256: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, jwt_kids: _Optional[_Iterable[str]] = ..., trust_bundle_sha256: _Optional[_Iterable[bytes]] = ...) -> None: ...

class SvidResponse(_message.Message):
    __slots__ = ("spiffe_id", "cert_chain", "bundle", "entitled", "reattest_by")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    CERT_CHAIN_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    ENTITLED_FIELD_NUMBER: _ClassVar[int]
    REATTEST_BY_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    cert_chain: _containers.RepeatedScalarFieldContainer[bytes]
    bundle: _containers.RepeatedScalarFieldContainer[bytes]
    entitled: _containers.RepeatedScalarFieldContainer[str]
    reattest_by: int
    def __init__(self, spiffe_id: _Optional[str] = ..., cert_chain: _Optional[_Iterable[bytes]] = ..., bundle: _Optional[_Iterable[bytes]] = ..., entitled: _Optional[_Iterable[str]] = ..., reattest_by: _Optional[int] = ...) -> None: ...

class BundleResponse(_message.Message):
    __slots__ = ("bundle", "entitled", "reattest_by", "signing_chain", "jwt_bundle", "node", "entries")
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    ENTITLED_FIELD_NUMBER: _ClassVar[int]
    REATTEST_BY_FIELD_NUMBER: _ClassVar[int]
    SIGNING_CHAIN_FIELD_NUMBER: _ClassVar[int]
    JWT_BUNDLE_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    bundle: _containers.RepeatedScalarFieldContainer[bytes]
    entitled: _containers.RepeatedScalarFieldContainer[str]
    reattest_by: int
    signing_chain: _containers.RepeatedScalarFieldContainer[bytes]
    jwt_bundle: bytes
    node: bool
    entries: _containers.RepeatedCompositeFieldContainer[RegistrationEntry]
    def __init__(self, bundle: _Optional[_Iterable[bytes]] = ..., entitled: _Optional[_Iterable[str]] = ..., reattest_by: _Optional[int] = ..., signing_chain: _Optional[_Iterable[bytes]] = ..., jwt_bundle: _Optional[bytes] = ..., node: _Optional[bool] = ..., entries: _Optional[_Iterable[_Union[RegistrationEntry, _Mapping]]] = ...) -> None: ...

class RegistrationEntry(_message.Message):
    __slots__ = ("id", "spiffe_id", "selectors")
    ID_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    SELECTORS_FIELD_NUMBER: _ClassVar[int]
    id: str
    spiffe_id: str
    selectors: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., spiffe_id: _Optional[str] = ..., selectors: _Optional[_Iterable[str]] = ...) -> None: ...
