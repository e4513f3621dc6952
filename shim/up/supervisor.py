"""Child processes of ``accelshim up``: start, probe until ready, prefix their logs, restart, stop.

Each child runs in its own session, so that Ctrl-C reaches ``up`` alone and ``up`` stops the
children in order (functions first, the shim last) instead of all of them at once.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO


class StartupError(RuntimeError):
    """A child exited or did not become ready while ``up`` was starting."""


class LogMux:
    """Writes whole lines from many sources to one stream, each prefixed with its source's name."""

    def __init__(self, stream: TextIO | None = None, width: int = 10) -> None:
        self.stream = stream or sys.stdout
        self.width = width
        self._lock = threading.Lock()

    def line(self, name: str, text: str) -> None:
        with self._lock:
            self.stream.write(f"{name:<{self.width}} | {text.rstrip()}\n")
            self.stream.flush()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def tcp_probe(host: str, port: int) -> Callable[[], bool]:
    """A probe that is true once something accepts connections on ``host:port``."""
    def probe() -> bool:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            return False
    return probe


@dataclass
class ProcessSpec:
    """What to run and how to tell it is ready."""

    name: str
    argv: list[str]
    cwd: Path
    env: dict[str, str]
    probe: Callable[[], bool]
    restart: bool = True
    tier: int = 0  # stop_all stops higher tiers first: functions (1) before the shim they call (0)


@dataclass
class Child:
    """A supervised child; ``ready`` is set while it runs and has passed its probe."""

    spec: ProcessSpec
    proc: subprocess.Popen | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    restarts: int = 0
    started_at: float = 0.0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


class Supervisor:
    """Owns the children: one thread per child pumps its output, one watcher restarts the dead.

    Args:
        log: where the children's lines (and the supervisor's own) go.
        stop_timeout: seconds a child gets to exit after SIGTERM before SIGKILL.
        backoff: (first, longest) pause before restarting a child that died.
        stopping: set it to abort starting and restarting (``stop_all`` sets it too).
    """

    def __init__(self, log: LogMux, stop_timeout: float = 10.0, backoff: tuple[float, float] = (0.5, 10.0),
                 stopping: threading.Event | None = None) -> None:
        self.log = log
        self.stop_timeout = stop_timeout
        self.backoff = backoff
        self.children: list[Child] = []
        self.stopping = stopping if stopping is not None else threading.Event()
        self._watcher: threading.Thread | None = None

    # --- starting -------------------------------------------------------------------------
    def start(self, spec: ProcessSpec) -> Child:
        """Start ``spec`` (not waiting for it to be ready)."""
        child = Child(spec)
        self.children.append(child)
        self._spawn(child)
        return child

    def _spawn(self, child: Child) -> None:
        spec = child.spec
        child.ready.clear()
        child.proc = subprocess.Popen(spec.argv, cwd=spec.cwd, env=spec.env, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        child.started_at = time.monotonic()
        threading.Thread(target=self._pump, args=(spec.name, child.proc), name=f"log-{spec.name}",
                         daemon=True).start()

    def _pump(self, name: str, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            self.log.line(name, raw.decode("utf-8", "replace"))
        proc.stdout.close()

    def wait_ready(self, child: Child, timeout: float) -> None:
        """Probe ``child`` until ready; raises StartupError if it exits or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while not self.stopping.is_set():
            assert child.proc is not None
            if child.proc.poll() is not None:
                raise StartupError(f"{child.spec.name} exited with {child.proc.returncode} while starting "
                                   f"(its log is above)")
            if child.spec.probe():
                child.ready.set()
                return
            if time.monotonic() > deadline:
                raise StartupError(f"{child.spec.name} was not ready after {timeout:.0f}s")
            time.sleep(0.05)
        raise StartupError("stopped while starting")

    # --- watching -------------------------------------------------------------------------
    def watch(self, interval: float = 0.2) -> None:
        """Restart children that die (each on its own backoff), in a background thread."""
        self._watcher = threading.Thread(target=self._watch, args=(interval,), name="supervisor", daemon=True)
        self._watcher.start()

    def _watch(self, interval: float) -> None:
        pending: dict[int, float] = {}  # id(child) -> when to restart it
        while not self.stopping.wait(interval):
            for child in list(self.children):
                proc = child.proc
                if proc is None or proc.poll() is None:
                    if proc is not None and not child.ready.is_set() and child.spec.probe():
                        child.ready.set()
                        self.log.line("up", f"{child.spec.name} is ready again (restart {child.restarts})")
                    continue
                if not child.spec.restart:
                    continue
                key = id(child)
                if key not in pending:
                    child.ready.clear()
                    # a child that ran a while gets restarted at once; one that keeps dying, ever later
                    ran = time.monotonic() - child.started_at
                    delay = 0.0 if ran > 30 else min(self.backoff[0] * 2 ** min(child.restarts, 10), self.backoff[1])
                    self.log.line("up", f"{child.spec.name} exited with {proc.returncode}; "
                                        f"restarting in {delay:.1f}s")
                    pending[key] = time.monotonic() + delay
                elif time.monotonic() >= pending[key] and not self.stopping.is_set():
                    del pending[key]
                    child.restarts += 1
                    self._spawn(child)

    # --- stopping -------------------------------------------------------------------------
    def stop_all(self) -> None:
        """Stop restarting, then stop the children tier by tier, the highest ``spec.tier`` first."""
        self.stopping.set()
        if self._watcher is not None:
            self._watcher.join()
        for tier in sorted({c.spec.tier for c in self.children}, reverse=True):
            self._terminate([c for c in self.children if c.spec.tier == tier])

    def _terminate(self, children: list[Child]) -> None:
        """SIGTERM all of ``children`` at once (they drain), SIGKILL those still up after ``stop_timeout``."""
        running = [c for c in children if c.proc is not None and c.proc.poll() is None]
        for child in children:
            child.ready.clear()
        for child in running:
            _signal(child.proc, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for child in running:
            try:
                child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.log.line("up", f"{child.spec.name} did not stop in {self.stop_timeout:.0f}s; killing it")
                _signal(child.proc, signal.SIGKILL)
                child.proc.wait()


def _signal(proc: subprocess.Popen, signum: int) -> None:
    """Signal the child's whole session (the child and anything it started)."""
    try:
        os.killpg(proc.pid, signum)
    except ProcessLookupError:
        pass
