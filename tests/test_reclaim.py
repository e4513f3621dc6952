"""Out of GPU memory, the pool's cached blocks go back only while no CUDA graph is being captured
(``CaptureSafePool``, what ``device_errors`` frees on the CUDA backend)."""
from __future__ import annotations

import threading
import time

from shim.backends.reclaim import CaptureSafePool


class _Pool:
    """Counts the frees (cupy's MemoryPool.free_all_blocks, on the GPU machine)."""

    def __init__(self) -> None:
        self.freed = 0

    def free_all_blocks(self) -> None:
        self.freed += 1


def test_the_blocks_go_back_while_the_capture_lock_is_free_and_it_stays_free():
    lock, pool = threading.Lock(), _Pool()
    reclaim = CaptureSafePool(pool, lock)
    assert reclaim.free_all_blocks() and reclaim.free_all_blocks()
    assert pool.freed == 2 and reclaim.skipped == 0 and not lock.locked()


def test_a_capture_on_another_thread_is_not_waited_for_and_not_broken():
    lock, pool = threading.Lock(), _Pool()
    reclaim = CaptureSafePool(pool, lock)
    capturing, done = threading.Event(), threading.Event()

    def capture() -> None:
        with lock:
            capturing.set()
            done.wait(5)

    thread = threading.Thread(target=capture)
    thread.start()
    try:
        assert capturing.wait(5)
        began = time.perf_counter()
        assert not reclaim.free_all_blocks()
        assert time.perf_counter() - began < 0.5  # not waited for
        assert pool.freed == 0 and reclaim.skipped == 1
    finally:
        done.set()
        thread.join(5)
    assert reclaim.free_all_blocks() and pool.freed == 1  # the capture over: the next failure frees


def test_a_thread_holding_the_lock_itself_does_not_deadlock():
    """A bound thread maps its errors while it holds the capture lock (``bind_thread``)."""
    lock, pool = threading.Lock(), _Pool()
    reclaim = CaptureSafePool(pool, lock)
    result: list[bool] = []

    def holding() -> None:
        with lock:
            result.append(reclaim.free_all_blocks())

    thread = threading.Thread(target=holding, daemon=True)
    thread.start()
    thread.join(5)
    assert not thread.is_alive() and result == [False] and pool.freed == 0


def test_once_sealed_the_blocks_go_back_whoever_holds_the_lock():
    """After the warm-up no graph is captured: the lock then guards pinning only, which may be slow,
    and a failure while a region is pinned still frees the pool."""
    lock, pool = threading.Lock(), _Pool()
    sealed = [False]
    reclaim = CaptureSafePool(pool, lock, lambda: sealed[0])
    with lock:
        assert not reclaim.free_all_blocks() and pool.freed == 0
        sealed[0] = True
        assert reclaim.free_all_blocks() and pool.freed == 1
