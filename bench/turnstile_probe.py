"""What a turnstile for the interpreter lock (``Turnstile``, below) does to a call that lets go of the
lock many times, on the CPU, with a stand-in for a batch's JPEG decode:

    python bench/turnstile_probe.py [SECONDS]

The stand-in lets go of the lock and takes it back 60 times (a SHA-256 of 4 KiB, which hashlib runs
without the lock: as nvImageCodec does about 6 times per image for 10 images), then waits 0.4 ms
without it (the engines' work); the calling thread then holds the lock for 1 ms of Python (the
batcher's other work in its cycle) before the next call. Beside it (``beside_holders``), three
threads stand for the device process's links' readers: each waits 120 us (a blocking read), then
holds the lock for 60 us of Python. Alternating without and with the turnstile (closed around each
call, the readers waiting at it after each read): the call's median and p90 wall time, cycles/s (a
call and the 1 ms) and the share of the time the readers ran. These readers are greedy (they always
want the lock), the shim's read only what comes. The shim had it as ``--gpu-jpeg-first`` (its decode
calls first, the links' readers and the landing waiting): on the H200 it was 9% slower at 32
clients, and it went (bench/results/NOTES.md, twentieth session). ``bench/jpeg_gil_probe.py`` ran
nvImageCodec's decode call in this harness on the GPU machine; it went with nvImageCodec (twenty-second
session: the shim now calls nvJPEG, which lets go of the lock once per batch).
"""
from __future__ import annotations

import contextlib
import hashlib
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.procs import run_threads  # noqa: E402

BLOCK = bytes(4096)
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


def beside_holders(call: Callable[[], object], seconds: float, turnstile: Turnstile | None = None, holders: int = 3,
                   burst_s: float = 60e-6, gap_s: float = 120e-6,
                   after: Callable[[], None] = lambda: None) -> tuple[list[float], float, float]:
    """``call`` back to back on a thread for ``seconds`` (run ``first`` at ``turnstile`` if given,
    then ``after``, untimed), while ``holders`` threads each sleep ``gap_s`` (a blocking read), wait
    at the turnstile if given, and hold the lock in Python for ``burst_s``, again and again. Returns
    each call's wall seconds, the calling thread's CPU seconds in its calls (``after`` left out), and
    the share of the time the holders ran (their CPU over the window, summed).

    Raises:
        RuntimeError: no call ended in the window (``call`` raised: its error is the cause)."""
    stop, walls, cpu, ran, failed = threading.Event(), [], [0.0], [], []
    first = turnstile.first if turnstile is not None else contextlib.nullcontext

    def holding() -> None:
        began = time.thread_time()
        while not stop.is_set():
            time.sleep(gap_s)
            if turnstile is not None:
                turnstile.wait()
            until = time.perf_counter() + burst_s
            while time.perf_counter() < until:
                pass
        ran.append(time.thread_time() - began)

    def calling() -> None:
        try:
            while not stop.is_set():
                wall, began = time.perf_counter(), time.thread_time()
                with first():
                    call()
                walls.append(time.perf_counter() - wall)
                cpu[0] += time.thread_time() - began
                after()
        except Exception as exc:  # noqa: BLE001 - the caller says why
            failed.append(exc)

    threads = [threading.Thread(target=holding) for _ in range(holders)] + [threading.Thread(target=calling)]
    began = time.perf_counter()
    run_threads(threads, seconds, stop)
    if not walls:
        raise RuntimeError("no call ended in the window") from (failed[0] if failed else None)
    return walls, cpu[0], sum(ran) / (time.perf_counter() - began)


def stand_in() -> None:
    for _ in range(60):
        hashlib.sha256(BLOCK)  # hashlib lets go of the lock above 2 KiB
    time.sleep(0.0004)


def python_for(seconds: float) -> None:
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    began = time.perf_counter()
    for _ in range(200):
        stand_in()
    print(f"the stand-in alone: {5 * (time.perf_counter() - began):.3f} ms a call")  # 200 calls: s * 5 = ms each
    for _ in range(2):
        for name, turnstile in (("without the turnstile", None), ("with it", Turnstile())):
            walls, _, share = beside_holders(stand_in, seconds, turnstile, after=lambda: python_for(1e-3))
            walls.sort()
            print(f"{name:22s} the call p50 {1e3 * walls[len(walls) // 2]:.3f} ms, p90 "
                  f"{1e3 * walls[int(len(walls) * 0.9)]:.3f} ms, {len(walls) / seconds:.0f} cycles/s; "
                  f"the readers ran {share:.0%} of the time", flush=True)


if __name__ == "__main__":
    main()
