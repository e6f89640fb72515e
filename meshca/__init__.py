"""meshca: a certificate authority for service meshes (SPIFFE X.509-SVIDs over Envoy SDS).

Its modules log through ``meshca.util.logger``, which keeps meshca's events quiet until a
command installs a handler.
"""

__version__ = "0.1.0"
