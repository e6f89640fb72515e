"""Agent attestation on the CA side: join tokens, the record of attested agents, and the
attestors that turn evidence into an attested agent (docs/agent.md)."""
