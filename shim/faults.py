"""Faults that outlive their request: a lost device, and the monitor that stops the shim on one.

An error of one request (bad input, out of memory, a kernel that fails) fails that request alone.
A *sticky* device error (the CUDA context is lost) poisons every later call, so the shim must not
go on: ``FaultMonitor.trip`` makes it refuse new work, fail what is in flight with 503, and exit
with ``EXIT_DEVICE_LOST`` so that its supervisor (``accelshim up``, the kubelet) starts a fresh one.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

from accel.errors import NotReady

log = logging.getLogger(__name__)

#: the shim's exit status after a sticky device error (1: failed start, 2: bad configuration)
EXIT_DEVICE_LOST = 3


class DeviceLost(NotReady):
    """The device is unusable until the process restarts (503: the client retries on a new shim)."""


class FaultMonitor:
    """Remembers the first sticky fault and tells the listeners (the server) once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fault: DeviceLost | None = None
        self._listeners: list[Callable[[DeviceLost], None]] = []

    @property
    def fault(self) -> DeviceLost | None:
        """The fault that tripped the monitor, or None while the device is fine."""
        return self._fault

    def on_trip(self, listener: Callable[[DeviceLost], None]) -> None:
        """Call ``listener(fault)`` when the monitor trips (at once if it already has)."""
        with self._lock:
            self._listeners.append(listener)
            fault = self._fault
        if fault is not None:
            listener(fault)

    def trip(self, fault: DeviceLost) -> None:
        """Record ``fault``; the first call tells every listener, later calls do nothing."""
        with self._lock:
            if self._fault is not None:
                return
            self._fault = fault
            listeners = list(self._listeners)
        log.critical("device lost: %s; refusing new work and exiting with %d for a restart",
                     fault.message, EXIT_DEVICE_LOST)
        for listener in listeners:
            listener(fault)

    def check(self) -> None:
        """Raise the recorded fault (as a fresh DeviceLost, 503) if the monitor has tripped."""
        if self._fault is not None:
            raise DeviceLost(f"the device was lost ({self._fault.message}); the shim is restarting",
                             retry_after=1.0)
