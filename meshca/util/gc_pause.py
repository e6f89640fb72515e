"""No cyclic GC while a change fans out to every stream.

While one change is being pushed to tens of thousands of streams, every stream holds
its push in flight (coroutines, futures, gRPC batch operations): objects that are alive
and will die by reference counting, not cycles, once the write is done. A collection
then walks them all and frees nothing. Worse, the streams' idle state from before the
change (an event wait, a pending read) dies in that window, and each death lowers the
young generation's count: measured at 50,000 streams, the young generation grew to
1.1 million objects before its first collection (0.76 s, 207 objects freed), and the
next middle-generation collection walked 1.3 million (1.1 s, none freed). So a server
that opts in (``meshca serve`` does, see :mod:`meshca.serve.gc_tuning`) pauses
automatic collection once a change has woken many streams (the engine's
``GC_PAUSE_AT``) until every woken stream has written its push, :data:`LONGEST` seconds
at most, then collects the young generation once. Engines of one process share the
pause (SDS and ADS push the same change).
"""

from __future__ import annotations

import gc
import threading

# A pause never lasts longer than this, however long a push waits on a slow reader.
LONGEST = 30.0


class FanOutPause:
    """Counts the engines fanning a change out; collection is off while any is, if on."""

    def __init__(self) -> None:
        self.enabled = False  # opted in by the serving process only
        self.pauses = 0  # how many pauses began (for tests and benches)
        self._fanning = 0
        self._paused = False
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    def begin(self) -> None:
        """An engine started waking streams for a change."""
        if not self.enabled:
            return
        with self._lock:
            self._fanning += 1
            if self._fanning == 1 and gc.isenabled():
                gc.disable()
                self._paused = True
                self.pauses += 1
                self._timer = threading.Timer(LONGEST, self._release)
                self._timer.daemon = True
                self._timer.start()

    def end(self) -> None:
        """Every stream that engine woke has written its push (or closed)."""
        with self._lock:
            if self._fanning == 0:
                return
            self._fanning -= 1
            if self._fanning == 0 and self._resume():
                # What the pause held back, collected now that the change is out rather
                # than in the middle of the next one: the streams' new idle state, made
                # during the fan-out, is walked once here.
                gc.collect(0)

    def _release(self) -> None:
        with self._lock:
            self._resume()

    def _resume(self) -> bool:
        """Collection back on; True when this pause had turned it off."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._paused:
            return False
        self._paused = False
        gc.enable()
        return True

    @property
    def paused(self) -> bool:
        return self._paused


fan_out = FanOutPause()
