"""Closed-loop load from many client threads, and the shim's batching metrics."""
from __future__ import annotations

import threading
import time
import urllib.request
from typing import Any, Callable

from bench.common import percentiles
from bench.procs import CHILD_TIMEOUT_S


def metrics_text(url: str) -> str:
    """The shim's Prometheus text (``url`` is its http://host:port)."""
    with urllib.request.urlopen(url + "/metrics", timeout=20) as resp:
        return resp.read().decode("utf-8", "replace")


def batch_histogram(text: str) -> dict[str, float]:
    """The samples of any metric with "batch" in its name (e.g. accelshim_batch_size's buckets/sum/count)."""
    out = {}
    for line in text.splitlines():
        if not line.startswith("#") and "batch" in line.split("{")[0].split(" ")[0]:
            key, _, value = line.rpartition(" ")
            try:
                out[key] = float(value)
            except ValueError:
                pass
    return out


def mean_batch(before: dict[str, float], after: dict[str, float]) -> tuple[float | None, float]:
    """Mean ``accelshim_batch_size`` between two scrapes (summed over labels), and the batch count."""
    def total(suffix: str) -> float:
        return sum(v - before.get(k, 0.0) for k, v in after.items()
                   if k.split("{")[0] == f"accelshim_batch_size{suffix}")

    count = total("_count")
    return (total("_sum") / count if count > 0 else None), count


def closed_loop(call_for: Callable[[int], Callable[[], Any]], clients: int, duration: float) -> dict[str, Any]:
    """``clients`` threads calling back to back for ``duration`` s: completions/s and latencies."""
    barrier = threading.Barrier(clients + 1)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    stop_at = [0.0]

    def worker(i: int) -> None:
        try:
            call = call_for(i)
        except Exception as exc:  # noqa: BLE001 - nobody waits for a worker that cannot start
            errors.append(f"setup: {type(exc).__name__}: {exc}")
            barrier.abort()
            return
        barrier.wait()
        mine = latencies[i]
        while True:
            t = time.perf_counter()
            if t >= stop_at[0]:
                return
            try:
                call()
            except Exception as exc:  # noqa: BLE001 - counted, the loop goes on
                errors.append(f"{type(exc).__name__}: {exc}")
                if len(errors) > 1000:
                    return
                continue
            end = time.perf_counter()
            if end <= stop_at[0]:
                mine.append(end - t)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + 3600  # set for real once all threads are ready
    try:
        barrier.wait(timeout=CHILD_TIMEOUT_S)
    except threading.BrokenBarrierError:
        stop_at[0] = 0.0
        raise RuntimeError(f"the client threads did not start: {sorted(set(errors))[:3]}") from None
    start = time.perf_counter()
    stop_at[0] = start + duration
    for t in threads:
        t.join(duration + 120)
    alive = sum(t.is_alive() for t in threads)
    samples = [x for lat in latencies for x in lat]
    out: dict[str, Any] = {"clients": clients, "duration_s": duration, "completed": len(samples),
                           "images_per_s": len(samples) / duration, "errors": len(errors),
                           "first_errors": sorted(set(errors))[:3], "threads_still_running": alive}
    if samples:
        out.update(percentiles(samples))
    return out
