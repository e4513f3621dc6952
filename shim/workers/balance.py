"""Least-connections accepting across request workers.

A function keeps its connection to the worker that accepted it, and the kernel hands each new
connection to whichever worker wakes first: with a few busy clients one worker can be saturated
(its interpreter lock) while another idles. So the workers share a board of how many connections
each holds (memory of the device process's, inherited as a file descriptor), and a worker takes a
waiting connection only while it holds no more than the fewest (ties take it together: the first
wins). All of them are woken for each connection, so the one that may take it does, at once; one
that may not leaves it, pausing between looks, at most ``serving.ACCEPT_DEFER_S``, then takes it.
A stopping worker leaves the board before it closes its listeners.
A worker writes its count at each turn of its event loop; one that is not warm yet (its ops would
answer 503) counts as absent and takes no connection that another could.
"""
from __future__ import annotations

import mmap
import os
from typing import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily

GONE = 1 << 62  # a slot whose worker is not running: never the fewest


class ConnectionBoard:
    """Open connections per worker slot, in shared memory.

    Args:
        slots: how many workers.
        fd: the board's memory, inherited from the device process (None: make it, in that process).
    """

    def __init__(self, slots: int, fd: int | None = None) -> None:
        made = fd is None
        if fd is None:
            fd = os.memfd_create("accelshim-connections")  # the workers get it through pass_fds
            os.ftruncate(fd, 8 * slots)
        self.fd = fd
        self._map = mmap.mmap(fd, 8 * slots)
        self._counts = memoryview(self._map).cast("q")
        if made:
            for slot in range(slots):
                self._counts[slot] = GONE

    def note(self, slot: int, connections: int) -> None:
        """Worker ``slot`` holds ``connections``."""
        self._counts[slot] = connections

    def may_accept(self, slot: int, connections: int) -> bool:
        """Record that worker ``slot`` holds ``connections``; whether it should take a new one."""
        self.note(slot, connections)
        return connections <= min(self._counts)

    def gone(self, slot: int) -> None:
        """Worker ``slot`` exited: its connections went with it."""
        self._counts[slot] = GONE

    def counts(self) -> list[int | None]:
        """Connections per slot (None: no worker there)."""
        return [None if c >= GONE else c for c in self._counts]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Prometheus: ``accelshim_worker_connections{worker}``, for the device process's registry."""
        gauge = GaugeMetricFamily("accelshim_worker_connections", "Open client connections per request worker",
                                  labels=["worker"])
        for slot, count in enumerate(self.counts()):
            if count is not None:
                gauge.add_metric([str(slot)], count)
        yield gauge


class WorkerGate:
    """One worker's view of the board, for ``serving.Server(accept_gate=...)``: absent until ``ready``."""

    def __init__(self, board: ConnectionBoard, slot: int, ready: Callable[[], bool]) -> None:
        self._board, self._slot, self._ready = board, slot, ready
        self._closed = False

    def note(self, connections: int) -> None:
        self.may_accept(connections)

    def may_accept(self, connections: int) -> bool:
        if self._ready() and not self._closed:
            return self._board.may_accept(self._slot, connections)
        self._board.gone(self._slot)
        return False

    def closed(self) -> None:
        self._closed = True
        self._board.gone(self._slot)
