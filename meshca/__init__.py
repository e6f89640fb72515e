"""meshca: a certificate authority for service meshes (SPIFFE X.509-SVIDs over Envoy SDS)."""

import logging

__version__ = "0.1.0"

# A long-running command (serve, agent) installs its log handler; until one does, meshca's
# events go nowhere. Without this, Python's last-resort handler would print a backend's
# retry narration ("serving what is cached, retrying ...") beside a one-shot command's own
# one-line verdict.
logging.getLogger(__name__).addHandler(logging.NullHandler())
