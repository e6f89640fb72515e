"""Signing-CA and root rotation: SPIRE-style slots kept in a crash-safe journal, and
root rotation in acknowledged steps (see docs/rotation.md).

``journal`` persists slots and stages; ``manager`` performs the slot operations
(prepare, activate, retire, follow a backend's roots); ``rotator`` is the clock that
decides when the next CA is prepared and activated (SPIRE's rotator); ``status`` is what
``meshca ca status`` reports; ``root`` runs an operator's root rotation; ``acks`` is what
rotation asks the xDS layer; ``local_ca`` and ``vault_ca`` create CAs (the data
directory's keys, Vault); ``checks`` are the start-up checks; ``admin`` is the local
endpoint ``meshca ca`` talks to; ``operator`` holds the two facts the command line needs
without loading the rest. The serve wiring (``meshca.serve.rotation``) opens them for a
running server.
"""
