"""Batches queued on a batcher thread's stream, answered as the GPU finishes them.

A batcher thread queues a batch's upload, resize, model run and logits' download on its stream and
goes on to gather the next while the GPU runs it; the next batch's work queues behind it, so the GPU
goes from one batch to the next without waiting for the host in between. ``Landing`` holds a ring
of slots (a pinned buffer that a batch's logits come down into, an event recorded after them) and a
thread of its own that waits for each batch's event in turn (sleeping: a blocking-sync event, the
interpreter lock let go) and sets the batch's Future with its rows.
"""
from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from contextlib import AbstractContextManager
from typing import Any, Callable

import cupy as cp
import numpy as np

from . import cuda_driver

log = logging.getLogger(__name__)

_IDLE_CHECK_S = 1.0  # how often an idle landing thread looks whether its batcher thread is still there


class Slot:
    """Where one batch in flight lands: a pinned buffer for its logits and the event after them."""

    __slots__ = ("memory", "nbytes", "done", "free")

    def __init__(self, nbytes: int) -> None:
        self.memory = cp.cuda.alloc_pinned_memory(nbytes)
        self.nbytes = nbytes
        self.done = cp.cuda.Event(block=True, disable_timing=True)  # its waiter sleeps
        self.free = threading.Event()
        self.free.set()

    def view(self, shape: tuple[int, ...]) -> np.ndarray:
        """The buffer as FP32 of ``shape`` (at most its size)."""
        return np.frombuffer(self.memory, np.float32, int(np.prod(shape))).reshape(shape)


class Landing:
    """A batcher thread's batches in flight on its stream: ``slot`` before queueing one, ``land``
    after, and the Future is set on this landing's thread once the GPU is done with it.

    Args:
        slots: batches in flight at once, at most (a batch waits in ``slot`` for one to land).
        nbytes: each slot's logits buffer (the largest batch's padded rows of FP32 logits).
        errors: the context that maps CUDA's errors to the shim's (``device_errors``).
        name: the model's (the thread's name).
    """

    def __init__(self, slots: int, nbytes: int, errors: Callable[[], AbstractContextManager[None]], name: str) -> None:
        self._slots = [Slot(nbytes) for _ in range(max(1, slots))]
        self._next = 0
        self._errors = errors
        self._uploaded = cp.cuda.Event(disable_timing=True)  # after the last batch's pixels went up
        self._staged = False  # whether ``_uploaded`` has been recorded
        self._owner = threading.current_thread()
        self._queue: queue.SimpleQueue[tuple[Slot, int, tuple[int, ...], Future[np.ndarray], Any]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=f"landing-{name}", daemon=True)
        self._thread.start()

    def slot(self) -> Slot:
        """The next slot, once the batch that used it last has landed (on the batcher's thread)."""
        slot = self._slots[self._next]
        self._next = (self._next + 1) % len(self._slots)
        slot.free.wait()
        slot.free.clear()
        return slot

    def release(self, slot: Slot) -> None:
        """``slot`` back unused (its batch failed before anything was queued for it to land)."""
        slot.free.set()

    def staging_free(self) -> None:
        """Wait until the pixels of the batch queued last have gone up (they may still be in the
        thread's pinned staging buffer, which the next batch is about to overwrite)."""
        if self._staged and not cuda_driver.done(self._uploaded.ptr):
            with self._errors():
                self._uploaded.synchronize()

    def uploaded(self, stream: int) -> None:
        """Mark the end of a batch's uploads on ``stream`` (what ``staging_free`` waits for)."""
        cuda_driver.record(self._uploaded.ptr, stream)
        self._staged = True

    def land(self, slot: Slot, stream: int, rows: int, shape: tuple[int, ...], keep: Any) -> Future[np.ndarray]:
        """After a batch's work was queued on ``stream`` (its logits coming down into ``slot``, of
        ``shape``): a Future of its first ``rows`` rows, set on this landing's thread once the GPU is
        done. ``keep`` (what the queued work reads: pixels, decoded images) is held until then."""
        cuda_driver.record(slot.done.ptr, stream)
        future: Future[np.ndarray] = Future()
        self._queue.put((slot, rows, shape, future, keep))
        return future

    def _loop(self) -> None:
        while True:
            try:
                entry = self._queue.get(timeout=_IDLE_CHECK_S)
            except queue.Empty:
                if not self._owner.is_alive():  # the batcher's thread ended (closed): nothing more comes
                    return
                continue
            self._land_one(*entry)
            del entry

    def _land_one(self, slot: Slot, rows: int, shape: tuple[int, ...], future: Future[np.ndarray], keep: Any) -> None:
        """Wait for ``slot``'s batch, then set ``future`` (its callbacks, the batch's answers, run here)."""
        try:
            with self._errors():
                slot.done.synchronize()
            logits = slot.view(shape)[:rows].copy()
        except BaseException as exc:  # noqa: BLE001 - the batch's requests get it
            slot.free.set()
            future.set_exception(exc)
            return
        slot.free.set()
        del keep
        future.set_result(logits)
