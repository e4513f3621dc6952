"""A turnstile for the interpreter lock: a call that lets go of the lock many times takes it back at
once, while the process's other busy threads wait at the turnstile.

nvImageCodec's Python binding (``--gpu-jpeg``) lets go of the lock about 6 times per image in a
batch's decode: making each code stream, around each image's info and inside each output image's
constructor in the decode call, and in each read of an image's ``__cuda_array_interface__``; and
once around the engines' work. In a busy device process another thread (a link's reader, a landing)
may take the lock at each release and keep it for a stretch of its work, which the batcher's thread
then waits out (the likely part of the decode's 2 ms of wall time for 0.9 ms of CPU on the H200 at
32 clients; not measured). With ``--gpu-jpeg-first`` a decode runs ``first`` and those threads
``wait`` at the turnstile before a stretch of work, so each release costs a thread switch instead;
they also wait while the engines work inside the call, when the lock is free: the price.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator

MAX_WAIT_S = 0.01  # a waiter goes on after this long (a stuck call slows the others, never stops them)


class Turnstile:
    """Closed while calls run ``first`` (such calls do not exclude each other); a thread that
    ``wait``s there goes on once the calls running when it came have ended, or after ``max_wait_s``
    (calls that start after it came do not hold it: two batcher threads' overlapping decodes cannot
    keep it waiting for ever)."""

    def __init__(self, max_wait_s: float = MAX_WAIT_S) -> None:
        self._running: set[threading.Event] = set()  # one per call running first, set as it ends
        self._lock = threading.Lock()
        self._max_wait_s = max_wait_s

    @contextmanager
    def first(self) -> Iterator[None]:
        """Keep the turnstile closed for the ``with`` block."""
        ended = threading.Event()
        with self._lock:
            self._running.add(ended)
        try:
            yield
        finally:
            with self._lock:
                self._running.discard(ended)
            ended.set()

    def wait(self) -> None:
        """Return at once while no call runs first, else once those running now have ended (at
        most ``max_wait_s``)."""
        if not self._running:
            return
        with self._lock:
            calls = list(self._running)
        deadline = time.monotonic() + self._max_wait_s
        for ended in calls:
            if not ended.wait(max(0.0, deadline - time.monotonic())):
                return
