"""The cyclic garbage collector in a long-running server.

Profiles of a server holding thousands of streams spent about a tenth of their samples
in the cyclic GC: Python's default thresholds (700, 10, 10) start a young collection
every 700 container allocations, and every full collection walks every object the
process has, the start-up ones (modules, protobuf descriptors, gRPC) included, though
they live as long as the process. So once serving, ``meshca serve`` moves what start-up
made out of the collector's sight (:func:`gc.freeze`) and collects the young generation
less often. Memory stays bounded: cycles are still collected, in larger batches.
"""

from __future__ import annotations

import gc

# A young collection every 20,000 allocations rather than 700; older generations as
# Python does it. Chosen with bench/sds_fanout.py (--gc serve against --gc default).
SERVING_THRESHOLDS = (20_000, 10, 10)


def settle_after_start_up() -> None:
    """Collect once, freeze what survives (it lives as long as the process), and raise
    the young generation's threshold. For the process that serves: tests that start
    servers in-process do not call it."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*SERVING_THRESHOLDS)
