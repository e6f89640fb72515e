"""``meshca agent``: keys made beside the workload, certified by CSR at ``meshca serve``,
served on a local Unix socket over SDS and the SPIFFE Workload API (docs/agent.md)."""
