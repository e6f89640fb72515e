"""The ``meshca serve`` runtime: the composition root (``server``) and what it alone
wires: ADS snapshots, serve config, serving TLS, bundle poll, mesh reload, health,
metrics, and rotation's adapters for a running server."""
