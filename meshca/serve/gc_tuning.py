"""The cyclic garbage collector in a long-running server.

Profiles of a server holding thousands of streams spent about a tenth of their samples
in the cyclic GC: Python's default thresholds (700, 10, 10) start a young collection
every 700 container allocations, and every full collection walks every object the
process has, the start-up ones (modules, protobuf descriptors, gRPC) included, though
they live as long as the process. So once serving, ``meshca serve`` moves what start-up
made out of the collector's sight (:func:`gc.freeze`) and collects the young generation
less often, and pauses collection while a change fans out to every stream
(:mod:`meshca.util.gc_pause`). Memory stays bounded: cycles are still collected, in
larger batches.
"""

from __future__ import annotations

import gc

from meshca.util import gc_pause

# A young collection every 100,000 allocations rather than 700; older generations as
# Python does it. Chosen with bench/sds_fanout.py (--gc serve against --gc default, and
# its per-generation GC seconds): during a push to 10,000 streams most of what a push
# allocates is gone again before a young collection at this threshold, so little is
# promoted and the middle generation is rarely collected (20,000 promoted enough for
# one collection of it per operator rotation, as long as the young ones together).
SERVING_THRESHOLDS = (100_000, 10, 10)


def settle_after_start_up() -> None:
    """Collect once, freeze what survives (it lives as long as the process), and raise
    the young generation's threshold. For the process that serves: tests that start
    servers in-process do not call it."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*SERVING_THRESHOLDS)
    gc_pause.fan_out.enabled = True
