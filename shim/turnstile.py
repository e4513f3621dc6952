"""A turnstile for the interpreter lock: one thread's call that lets go of the lock many times takes
it back at once, while the process's other busy threads wait at the turnstile.

nvImageCodec's decode call (``--gpu-jpeg``) lets go of the lock and takes it back twice per image
before the engines' work, and once around that work. In the device process at 32 clients another
thread (a link's reader, a landing) takes the lock at each release and keeps it for a stretch of its
own work, so the call waits behind each: about 1 ms of its 2 ms on the H200, where its CPU is 0.9.
With ``--gpu-jpeg-first`` the call runs with the turnstile closed (``first``) and those threads
``wait`` at it before a stretch of work, so the call's releases cost a thread switch each, not a
stretch; they work while it is open (the batcher's thread between calls).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator


class Turnstile:
    """Closed while one call runs ``first``; other threads ``wait`` there before their work."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    @contextmanager
    def first(self) -> Iterator[None]:
        """Close the turnstile for the ``with`` block (one such block at a time)."""
        with self._lock:
            yield

    def wait(self) -> None:
        """Return at once while the turnstile is open, else once it opens."""
        if self._lock.locked():
            with self._lock:
                pass
