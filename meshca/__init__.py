"""meshca: a certificate authority for service meshes (SPIFFE X.509-SVIDs over Envoy SDS)."""

__version__ = "0.1.0"
