"""The Vault (or OpenBao) backend: settings, login, the HTTP client, the PKI engine's
requests, the pre-flight check, and the authority built from them (``backend``)."""
