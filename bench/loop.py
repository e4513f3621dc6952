"""Closed-loop load: C clients calling back to back for a fixed window, as threads of this process
(``closed_loop``) or spread over separate client processes (``process_closed_loop``), which is what
serverless functions are: each its own interpreter, so no client's GIL caps another.

Both time on ``time.monotonic`` (CLOCK_MONOTONIC, one clock for every process of the host), so
worker processes can share one window: the parent waits until every worker has its threads set
up, then sends them all the same start; each counts only the calls that end by start + duration.
"""
from __future__ import annotations

import multiprocessing
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Callable

from bench.common import percentiles
from bench.procs import CHILD_TIMEOUT_S

MAX_ERRORS = 1000  # a thread stops once the run has seen this many


@dataclass
class LoopRun:
    """What the clients of a closed loop did in its window."""

    latencies: list[float] = field(default_factory=list)  # seconds, of the calls that ended in the window
    errors: list[str] = field(default_factory=list)
    still_running: int = 0  # threads that had not returned some time after the window

    @classmethod
    def merge(cls, runs: list["LoopRun"]) -> "LoopRun":
        return cls([x for r in runs for x in r.latencies], [e for r in runs for e in r.errors],
                   sum(r.still_running for r in runs))

    def summary(self, clients: int, duration: float) -> dict[str, Any]:
        """Completions per second of the window, the first errors, p50/p99/mean/min latency."""
        out: dict[str, Any] = {"clients": clients, "duration_s": duration, "completed": len(self.latencies),
                               "images_per_s": len(self.latencies) / duration, "errors": len(self.errors),
                               "first_errors": sorted(set(self.errors))[:3],
                               "threads_still_running": self.still_running}
        if self.latencies:
            out.update(percentiles(self.latencies))
        return out


def drive(call_for: Callable[[int], Callable[[], Any]], clients: int, duration: float,
          start: Callable[[], float] = time.monotonic) -> LoopRun:
    """``clients`` threads, thread i calling ``call_for(i)()`` back to back for ``duration`` s.

    Once every thread has made its caller, ``start()`` gives the window's start (``time.monotonic``;
    it may block, e.g. until other processes are ready too) and the threads go.

    Raises:
        RuntimeError: a thread could not make its caller.
    """
    barrier = threading.Barrier(clients + 1)
    go = threading.Event()
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    stop_at = [0.0]  # stays 0 when the run is called off: the threads return at once

    def worker(i: int) -> None:
        try:
            call = call_for(i)
        except Exception as exc:  # noqa: BLE001 - nobody waits for a worker that cannot start
            errors.append(f"setup: {type(exc).__name__}: {exc}")
            barrier.abort()
            return
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            return
        go.wait()
        mine = latencies[i]
        while True:
            t = time.monotonic()
            if t >= stop_at[0]:
                return
            try:
                call()
            except Exception as exc:  # noqa: BLE001 - counted, the loop goes on
                errors.append(f"{type(exc).__name__}: {exc}")
                if len(errors) > MAX_ERRORS:
                    return
                continue
            end = time.monotonic()
            if end <= stop_at[0]:
                mine.append(end - t)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    try:
        barrier.wait(timeout=CHILD_TIMEOUT_S)
        stop_at[0] = start() + duration
    except threading.BrokenBarrierError:
        raise RuntimeError(f"the client threads did not start: {sorted(set(errors))[:3]}") from None
    finally:
        go.set()
    for t in threads:
        t.join(max(0.0, stop_at[0] - time.monotonic()) + 120)
    return LoopRun([x for lat in latencies for x in lat], errors, sum(t.is_alive() for t in threads))


def closed_loop(call_for: Callable[[int], Callable[[], Any]], clients: int, duration: float) -> dict[str, Any]:
    """``clients`` threads of this process calling back to back for ``duration`` s (``LoopRun.summary``)."""
    return drive(call_for, clients, duration).summary(clients, duration)


# --- client processes ---------------------------------------------------------------------------
def shares(clients: int, processes: int) -> list[int]:
    """``clients`` spread evenly over ``processes`` (the first ones take the remainder)."""
    return [clients // processes + (i < clients % processes) for i in range(processes)]


def process_closed_loop(caller: tuple[Any, ...] | list[tuple[Any, ...]], image: bytes, clients: int,
                        duration: float, processes: int) -> dict[str, Any]:
    """``clients`` threads classifying ``image`` back to back, spread over ``processes`` fresh processes.

    ``caller`` says what each thread classifies with (``make_caller``): ``("accel", url)``, its own
    ``accel.Client(url)``, or ``("naive", device, model_dir)``, its own batch-1 ORT session (a naive
    function instance: the process holds its own GPU context); a list of them: process p's threads
    take the list's item p modulo its length (e.g. clients spread over several shims). The processes are spawned (nothing of
    this process's GPU context or sessions comes along), make their callers, start one common window
    of ``duration`` s, and send back what their threads did; images/s = all images / ``duration``.

    Returns:
        ``LoopRun.summary`` of all the threads, plus ``client_processes`` and ``threads_per_process``.
    Raises:
        RuntimeError: a process failed to set up or run, or did not answer in time.
    """
    ctx = multiprocessing.get_context("spawn")
    counts = shares(clients, processes)
    conns: list[Connection] = []
    procs: list[Any] = []
    callers = caller if isinstance(caller, list) else [caller]
    try:
        for p, n in enumerate(counts):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_client_process, args=(theirs, callers[p % len(callers)], image, n, duration),
                               daemon=True)
            proc.start()
            theirs.close()
            conns.append(mine)
            procs.append(proc)
        deadline = time.monotonic() + CHILD_TIMEOUT_S
        for conn in conns:
            _receive(conn, "ready", deadline)
        start = time.monotonic()
        for conn in conns:
            conn.send(start)
        runs = [_receive(conn, "done", start + duration + CHILD_TIMEOUT_S) for conn in conns]
    finally:
        for conn in conns:  # a process still waiting for its start reads EOF and stops
            conn.close()
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
    out = LoopRun.merge(runs).summary(clients, duration)
    out.update(client_processes=processes, threads_per_process=counts)
    return out


def make_caller(caller: tuple[Any, ...], image: bytes) -> Callable[[], Any]:
    """One client thread's call (see ``process_closed_loop``), ready and warmed up."""
    if caller[0] == "accel":
        import accel

        client = accel.Client(caller[1], timeout=120)  # one per function instance (thread)
        return lambda: client.classify(image)
    if caller[0] == "naive":
        from pathlib import Path

        from bench.naive import Classifier

        clf = Classifier(caller[1], Path(caller[2]))
        clf.classify(image)  # the session's first run (convolution plans) is not part of the window
        return lambda: clf.classify(image)
    raise ValueError(f"unknown caller {caller!r}")


def _receive(conn: Connection, kind: str, deadline: float) -> Any:
    """The payload of the next message from a client process, which must be of ``kind`` and come by
    ``deadline`` (``time.monotonic``)."""
    if not conn.poll(max(0.0, deadline - time.monotonic())):
        raise RuntimeError(f"a client process sent no {kind!r} in time")
    try:
        got, payload = conn.recv()
    except EOFError:
        raise RuntimeError(f"a client process exited before {kind!r}") from None
    if got != kind:
        raise RuntimeError(f"a client process failed: {payload}")
    return payload


def _client_process(conn: Connection, caller: tuple[Any, ...], image: bytes, clients: int, duration: float) -> None:
    """A client process: ``clients`` threads, each with its own caller, in the parent's window."""
    def start() -> float:
        conn.send(("ready", None))
        return float(conn.recv())  # EOFError: the parent called the run off

    try:
        conn.send(("done", drive(lambda _i: make_caller(caller, image), clients, duration, start)))
    except Exception as exc:  # noqa: BLE001 - the parent says why
        try:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass
    finally:
        conn.close()
