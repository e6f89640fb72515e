"""The mesh model and Envoy resource generation keyed on proxy identity."""
