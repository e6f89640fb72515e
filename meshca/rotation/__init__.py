"""Signing-CA and root rotation: SPIRE-style slots kept in a crash-safe journal, and
root rotation in acknowledged steps (see docs/rotation.md).

``journal`` persists slots and stages; ``manager`` decides when the next CA is prepared
and activated; ``root`` runs an operator's root rotation; ``acks`` is what rotation asks
the SDS layer; ``local_ca`` creates CAs from the data directory's keys; ``checks`` are
the start-up checks; ``admin`` is the local endpoint ``meshca ca`` talks to; ``operator``
holds the two facts the command line needs without loading the rest.
"""
