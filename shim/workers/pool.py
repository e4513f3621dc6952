"""The request worker processes of a device process: started, restarted when one dies, stopped."""
from __future__ import annotations

import logging
import pickle
import signal
import subprocess
import sys
import threading
import time
from typing import Callable

from ..config import DRAIN_SECONDS, TASKS_SHUTDOWN_S
from .balance import ConnectionBoard
from .front import WorkerConfig

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)  # a worker that keeps dying is restarted less often
EXIT_GRACE_S = 3.0  # after a worker's whole drain and its threads' shutdown: its last bundle, its exit


class WorkerPool:
    """``count`` worker processes (``python -m shim.workers SLOT``) serving ``config.fds``.

    Args:
        board: the workers' ConnectionBoard (its fd is passed on to each; a dead worker's slot is
            cleared).
        on_exit: told the pid of each worker that exited (the device process is not ready again
            until its replacement is).
    """

    def __init__(self, count: int, config: WorkerConfig, on_exit: Callable[[int], None],
                 board: ConnectionBoard | None = None) -> None:
        self._count = count
        self._payload = pickle.dumps(config)
        self._fds = tuple(config.fds) + ((board.fd,) if board is not None else ())
        self._board = board
        self._on_exit = on_exit
        self._procs: list[subprocess.Popen[bytes]] = []
        self._failures = [0] * count
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._watcher = threading.Thread(target=self._watch, name="worker-pool", daemon=True)

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [p.pid for p in self._procs]

    def start(self) -> None:
        with self._lock:
            self._procs = [self._spawn(slot) for slot in range(self._count)]
        log.info("started %d request workers (pids %s)", self._count, " ".join(map(str, self.pids)))
        self._watcher.start()

    def _spawn(self, slot: int) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-m", "shim.workers", str(slot)], stdin=subprocess.PIPE,
                                pass_fds=self._fds)
        assert proc.stdin is not None
        proc.stdin.write(self._payload)
        proc.stdin.close()
        return proc

    def _watch(self) -> None:
        while not self._stopping.wait(0.2):
            for slot in range(self._count):
                with self._lock:
                    proc = self._procs[slot]
                code = proc.poll()
                if code is None or self._stopping.is_set():
                    continue
                self._on_exit(proc.pid)
                if self._board is not None:
                    self._board.gone(slot)  # its connections died with it: others take new ones now
                delay = RESTART_BACKOFF_S[min(self._failures[slot], len(RESTART_BACKOFF_S) - 1)]
                self._failures[slot] += 1
                log.warning("request worker %d exited with %d; starting another in %.1f s", proc.pid, code, delay)
                if self._stopping.wait(delay):
                    return
                with self._lock:
                    self._procs[slot] = self._spawn(slot)

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM every worker (each drains its requests in flight, for up to ``DRAIN_SECONDS``, waits
        up to ``TASKS_SHUTDOWN_S`` for its request threads, then sends its last bundle of records),
        SIGKILL what is left after ``timeout`` (default: those two and ``EXIT_GRACE_S``: a worker that
        drains the whole time still sends its last bundle)."""
        if timeout is None:
            timeout = DRAIN_SECONDS + TASKS_SHUTDOWN_S + EXIT_GRACE_S
        self._stopping.set()
        with self._lock:
            procs = list(self._procs)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("request worker %d did not stop in %.0f s; killing it", proc.pid, timeout)
                proc.kill()
                proc.wait()
