"""meshca as a Kubernetes control plane: the mesh and its traffic policy from the API server.

``policy.py`` turns Gateway API HTTPRoutes and meshca AccessPolicies into the mesh
model's traffic splits and access policies, with a verdict per object; ``status.py``
writes those verdicts to the objects' status. Kubernetes is one more source of the same
mesh model (``meshca.envoy.model``), never a second code path for generation.
"""
