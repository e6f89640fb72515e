"""meshca as a Kubernetes control plane: the mesh and its traffic policy from the API server.

``policy.py`` turns Gateway API HTTPRoutes and meshca AccessPolicies into the mesh
model's traffic splits and access policies, with a verdict per object; ``status.py``
writes those verdicts to the objects' status. ``identity.py`` answers what the
service-account token attestor asks (TokenReview, the token's Pod). Kubernetes is one
more source of the same mesh model (``meshca.envoy.model``) and an attestor, never a
second code path for generation or issuance.
"""
