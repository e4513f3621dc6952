"""Batches queued on a batcher thread's stream, answered as the GPU finishes them.

A batcher thread queues a batch's upload, resize, model run and logits' download on its stream and
goes on to gather the next while the GPU runs it; the next batch's work queues behind it, so the GPU
goes from one batch to the next without waiting for the host in between. ``Landing`` holds a ring
of slots (a pinned buffer that a batch's logits come down into, an event recorded after them) and a
thread of its own that waits for each batch's event in turn (sleeping: a blocking-sync event, the
interpreter lock let go) and sets the batch's Future with its rows. It also keeps an estimate of
until when the GPU is busy with what is queued (``busy_until``): a batch's time there, measured per
kind of batch (its JPEGs decoded there or not: the decode takes the GPU's time too) and batch size
as the time between one landing and the next, and the thread's time to queue one.
"""
from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from concurrent.futures import Future
from contextlib import AbstractContextManager
from typing import Any, Callable

import cupy as cp
import numpy as np

from . import cuda_driver

log = logging.getLogger(__name__)

_IDLE_CHECK_S = 1.0  # how often an idle landing thread looks whether its batcher thread is still there
_WEIGHT = 0.2  # of the newest measurement in the running estimates (exponential moving averages)


def _average(old: float | None, new: float) -> float:
    return new if old is None else old + _WEIGHT * (new - old)


class Slot:
    """Where one batch in flight lands: a pinned buffer for its logits and the event after them."""

    __slots__ = ("memory", "nbytes", "done", "free", "keep")

    def __init__(self, nbytes: int) -> None:
        self.memory = cp.cuda.alloc_pinned_memory(nbytes)
        self.nbytes = nbytes
        self.keep: Any = None  # what its batch's queued work read: let go when the slot is next taken
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
        freeing: the context to let go of device and pinned memory in (what a batch read, the slots
            once the batcher's thread has ended): the capture lock while CUDA graphs may still be
            captured on other threads, where a free would break their capture.
    """

    def __init__(self, slots: int, nbytes: int, errors: Callable[[], AbstractContextManager[None]], name: str,
                 freeing: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext) -> None:
        self._freeing = freeing
        self._slots = [Slot(nbytes) for _ in range(max(1, slots))]
        self._next = 0
        self._errors = errors
        self._uploaded = cp.cuda.Event(disable_timing=True)  # after the last batch's pixels went up
        self._staged = False  # whether ``_uploaded`` has been recorded
        self._owner = threading.current_thread()
        # (slot, rows, shape, Future, when queued, whether it decodes JPEGs, host memory it reads)
        self._queue: queue.SimpleQueue[tuple[Slot, int, tuple[int, ...], Future[np.ndarray], float, bool, Any]] = \
            queue.SimpleQueue()
        # a batch's time on the GPU, by whether it decodes JPEGs and its (padded) rows: the landing thread's
        self._gpu_s: dict[tuple[bool, int], float] = {}
        self._last_landed = 0.0
        self._queue_s: float | None = None  # the batcher's time to queue a batch: its thread's
        self._busy = 0.0  # until when the GPU is busy with what was queued, as far as known: its thread's
        self._thread = threading.Thread(target=self._loop, name=f"landing-{name}", daemon=True)
        self._thread.start()

    def slot(self) -> Slot:
        """The next slot, once the batch that used it last has landed (on the batcher's thread, which
        lets go of what that batch read: device memory goes back to the pool on the thread that
        allocates it, never on the landing's)."""
        slot = self._slots[self._next]
        self._next = (self._next + 1) % len(self._slots)
        slot.free.wait()
        slot.free.clear()
        if slot.keep is not None:
            with self._freeing():
                slot.keep = None
        return slot

    def release(self, slot: Slot) -> None:
        """``slot``, the last one ``slot`` gave, back unused (its batch failed before it was queued to
        land): the next batch takes it again, not one that may still be in flight."""
        self._next = (self._next - 1) % len(self._slots)
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

    def land(self, slot: Slot, stream: int, rows: int, shape: tuple[int, ...], keep: Any,
             began: float, *, jpegs: bool, host: Any = None) -> Future[np.ndarray]:
        """After a batch's work was queued on ``stream`` (from ``began``, a ``perf_counter`` time; its
        logits coming down into ``slot``, of ``shape``; ``jpegs``: its queued work decodes JPEGs): a
        Future of its first ``rows`` rows, set on this landing's thread once the GPU is done. ``keep``
        (what the queued work reads on the device: the batch's decoded pixels, resize plans) is held
        until then, and let go when ``slot`` is next taken, on the batcher's thread. ``host`` (what
        it reads in host memory: the requests' pixels and JPEGs, views of a request worker's arena)
        is let go on this landing's thread once the batch has landed: an idle shim keeps no worker's
        arena mapped and pinned after that worker has gone."""
        cuda_driver.record(slot.done.ptr, stream)
        slot.keep = keep
        future: Future[np.ndarray] = Future()
        now = time.perf_counter()
        self._queue_s = _average(self._queue_s, now - began)
        self._busy = max(now, self._busy) + self._gpu_s.get((jpegs, shape[0]), 0.0)
        self._queue.put((slot, rows, shape, future, now, jpegs, host))
        return future

    def busy_until(self) -> float:
        """The ``perf_counter`` time until which a batch queued now would wait behind those queued
        before, less the time queueing it takes (on the batcher's thread; one average over both kinds
        of batch, since the next one's kind is not known yet)."""
        return self._busy - (self._queue_s or 0.0)

    def _loop(self) -> None:
        while True:
            try:
                entry = self._queue.get(timeout=_IDLE_CHECK_S)
            except queue.Empty:
                if not self._owner.is_alive():  # the batcher's thread ended (closed): nothing more comes
                    with self._freeing():  # what the last batches read, and the slots, go here and now
                        self._slots.clear()
                    return
                continue
            self._land_one(*entry[:-1])
            del entry  # its host memory with it: the GPU has read it (or will not: the batch failed)

    def _land_one(self, slot: Slot, rows: int, shape: tuple[int, ...], future: Future[np.ndarray],
                  queued: float, jpegs: bool) -> None:
        """Wait for ``slot``'s batch, then set ``future`` (its callbacks, the batch's answers, run here)."""
        try:
            # one found done already ended while this thread answered the batch before: when, is
            # not known (only that it was before now), so its time is no sample
            with self._errors():
                seen_running = not cuda_driver.done(slot.done.ptr)
                slot.done.synchronize()
            landed = time.perf_counter()  # its time on the GPU: since it was queued, or the one before landed
            if seen_running:
                key = (jpegs, shape[0])
                self._gpu_s[key] = _average(self._gpu_s.get(key), landed - max(queued, self._last_landed))
            self._last_landed = landed
            logits = slot.view(shape)[:rows].copy()
        except BaseException as exc:  # noqa: BLE001 - the batch's requests get it
            slot.free.set()
            future.set_exception(exc)
            return
        slot.free.set()
        future.set_result(logits)
