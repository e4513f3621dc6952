"""A memory pool's cached blocks given back when the GPU runs out, never by ``device_errors`` during a
CUDA graph's capture."""
from __future__ import annotations

import threading
from typing import Any, Callable


class CaptureSafePool:
    """``pool`` as ``device_errors`` takes it: until ``sealed()`` (the warm-up's captures done: none
    after), ``free_all_blocks`` frees only while ``capture_lock`` is free, without waiting for it. A
    capture on another thread (a batcher's at its start, under that lock) would break on the frees,
    and the calling thread may hold the lock itself (a bound thread maps its errors under it):
    waiting could deadlock. Skipped, the request still gets its 503 to retry, and a later failure
    frees them. Sealed, it frees at once (the lock then guards only pinning, which may be slow).
    cupy's own allocator also frees the pool before it raises out of memory, unguarded: this guards
    the free that ``device_errors`` adds."""

    def __init__(self, pool: Any, capture_lock: threading.Lock, sealed: Callable[[], bool] = lambda: False) -> None:
        self._pool = pool
        self._lock = capture_lock
        self._sealed = sealed
        self.skipped = 0  # frees left out while the lock was held

    def free_all_blocks(self) -> bool:
        """The pool's cached blocks given back now, unless (not yet sealed) a capture or anyone
        else holds the lock; whether they were."""
        guarded = not self._sealed()
        if guarded and not self._lock.acquire(blocking=False):
            self.skipped += 1
            return False
        try:
            self._pool.free_all_blocks()
            return True
        finally:
            if guarded:
                self._lock.release()
