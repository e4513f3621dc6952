"""What ``--gpu-jpeg-first``'s turnstile (``shim/turnstile.py``) does to a call that lets go of the
interpreter lock many times, on the CPU, with a stand-in for nvImageCodec's decode call:

    python bench/turnstile_probe.py [SECONDS]

The stand-in lets go of the lock and takes it back 21 times (a SHA-256 of 4 KiB, which hashlib runs
without the lock: as the engines' call does twice per image for 10 images, and once around their
work), then waits 0.4 ms without it (the engines' work); the calling thread then holds the lock for 1 ms
of Python (the batcher's other work in its cycle) before the next call. Beside it, three threads stand for the
device process's links' readers: each waits 120 us (a blocking read), then holds the lock for 60 us
of Python. Alternating without and with the turnstile closed around each call (the readers waiting
at it after each read): the call's median and p90 wall time, cycles/s (a call and the 1 ms), and
the share of the time the readers ran. Not the device process: the engines, the batcher's other work and the real readers'
stretches differ; ``ci/gpu-run.sh jpegfirst`` measures the shim itself.
"""
from __future__ import annotations

import hashlib
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shim.turnstile import Turnstile  # noqa: E402

BLOCK = bytes(4096)


def stand_in() -> None:
    for _ in range(21):
        hashlib.sha256(BLOCK)  # hashlib lets go of the lock above 2 KiB
    time.sleep(0.0004)


def run(seconds: float, turnstile: Turnstile | None) -> tuple[float, float, float, float]:
    stop, walls, ran = threading.Event(), [], []

    def reader() -> None:
        cpu = time.thread_time()
        while not stop.is_set():
            time.sleep(120e-6)
            if turnstile is not None:
                turnstile.wait()
            until = time.perf_counter() + 60e-6
            while time.perf_counter() < until:
                pass
        ran.append(time.thread_time() - cpu)

    def caller() -> None:
        while not stop.is_set():
            began = time.perf_counter()
            if turnstile is None:
                stand_in()
            else:
                with turnstile.first():
                    stand_in()
            walls.append(time.perf_counter() - began)
            until = time.perf_counter() + 1e-3
            while time.perf_counter() < until:
                pass

    threads = [threading.Thread(target=reader) for _ in range(3)] + [threading.Thread(target=caller)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    walls.sort()
    return (1e3 * walls[len(walls) // 2], 1e3 * walls[int(len(walls) * 0.9)], len(walls) / elapsed,
            sum(ran) / elapsed)


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    began = time.perf_counter()
    for _ in range(200):
        stand_in()
    print(f"the stand-in alone: {5 * (time.perf_counter() - began):.3f} ms a call")  # 200 calls: s * 5 = ms each
    for _ in range(2):
        for name, turnstile in (("without the turnstile", None), ("with it", Turnstile())):
            p50, p90, rate, share = run(seconds, turnstile)
            print(f"{name:22s} the call p50 {p50:.3f} ms, p90 {p90:.3f} ms, {rate:.0f} cycles/s; "
                  f"the readers ran {share:.0%} of the time", flush=True)


if __name__ == "__main__":
    main()
