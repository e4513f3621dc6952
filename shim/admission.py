"""Admission control: how many requests run at once, how many may wait, and for how long.

Every request that does work (an infer, a buffer or KaaS call) takes a slot first. Slots are
limited globally (``threads``) and per tenant; a request that finds none waits in a FIFO queue,
bounded globally and per tenant. A full queue answers 429 (QuotaExceeded, with Retry-After) at
once; a request whose deadline passes before it gets a slot, or that arrives already late, is
dropped with 504 (DeadlineExceeded) before any work is done. A tripped FaultMonitor fails every
waiter with 503 (DeviceLost).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

from accel.errors import DeadlineExceeded, QuotaExceeded

from .faults import FaultMonitor
from .tenant_metrics import RelayedTenantMetrics, TenantMetrics


@dataclass(frozen=True)
class Limits:
    """Global limits, and the defaults of each tenant's (0 for a tenant: the global one)."""

    max_inflight: int = 8
    max_queue: int = 64
    tenant_max_inflight: int = 0
    tenant_max_queue: int = 0
    #: longest wait in the queue of a request that sent no deadline (then 429: retry later)
    max_wait_s: float = 30.0
    retry_after_s: float = 1.0


class _Waiter:
    __slots__ = ("tenant", "inflight_limit", "granted")

    def __init__(self, tenant: str, inflight_limit: int) -> None:
        self.tenant, self.inflight_limit, self.granted = tenant, inflight_limit, False


class Slot:
    """A granted slot; ``release`` (or leaving the ``with`` block) gives it back, once."""

    def __init__(self, admission: "Admission", tenant: str, waited_s: float) -> None:
        self._admission, self.tenant, self.waited_s = admission, tenant, waited_s
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._admission._release(self.tenant)

    def __enter__(self) -> "Slot":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Admission:
    """The slots and the queue of one shim (thread-safe)."""

    def __init__(self, limits: Limits, monitor: FaultMonitor | None = None,
                 metrics: TenantMetrics | RelayedTenantMetrics | None = None) -> None:
        self.limits = limits
        self._monitor = monitor or FaultMonitor()
        self._metrics = metrics
        self._cond = threading.Condition()
        self._running = 0
        self._running_by: dict[str, int] = {}
        self._queue: deque[_Waiter] = deque()
        self._queued_by: dict[str, int] = {}
        self._monitor.on_trip(lambda _fault: self._wake_all())

    def inflight(self, tenant: str | None = None) -> int:
        with self._cond:
            return self._running if tenant is None else self._running_by.get(tenant, 0)

    def queued(self, tenant: str | None = None) -> int:
        with self._cond:
            return len(self._queue) if tenant is None else self._queued_by.get(tenant, 0)

    def admit(self, tenant: str, deadline: float | None = None, *, max_inflight: int | None = None,
              max_queue: int | None = None) -> Slot:
        """Wait for a slot for ``tenant`` until ``deadline`` (``time.monotonic()`` seconds).

        Args:
            max_inflight, max_queue: this tenant's own limits (None: the defaults of ``limits``).
        Raises:
            DeadlineExceeded: the deadline passed before a slot was free (or before the call).
            QuotaExceeded: the queue (global or the tenant's) is full, or the wait ran past ``max_wait_s``.
            DeviceLost: the device was lost while waiting.
        """
        start = time.monotonic()
        self._monitor.check()
        if deadline is not None and start >= deadline:
            self._reject(tenant, "deadline")
            raise DeadlineExceeded(f"the request arrived {1000 * (start - deadline):.0f} ms past its deadline; "
                                   "nothing was done")
        lim = self.limits
        inflight_limit = min(max_inflight or lim.tenant_max_inflight or lim.max_inflight, lim.max_inflight)
        queue_limit = min(max_queue or lim.tenant_max_queue or lim.max_queue, lim.max_queue)
        with self._cond:
            if not self._queue and self._can_run(tenant, inflight_limit):
                self._take(tenant)
                return Slot(self, tenant, 0.0)
            if len(self._queue) >= lim.max_queue:
                self._reject(tenant, "queue_full")
                raise QuotaExceeded(f"the shim's queue is full ({lim.max_queue} requests wait); retry later",
                                    retry_after=lim.retry_after_s)
            if self._queued_by.get(tenant, 0) >= queue_limit:
                self._reject(tenant, "tenant_queue_full")
                raise QuotaExceeded(f"tenant {tenant!r} has {queue_limit} requests waiting already, its limit; "
                                    "retry later", retry_after=lim.retry_after_s)
            waiter = _Waiter(tenant, inflight_limit)
            self._queue.append(waiter)
            self._queued_by[tenant] = self._queued_by.get(tenant, 0) + 1
            self._gauge_queue(tenant)
            self._grant()  # waiters ahead may be held by their tenant's limit while slots are free
            until = min(deadline if deadline is not None else float("inf"), start + lim.max_wait_s)
            try:
                while not waiter.granted and self._monitor.fault is None:
                    left = until - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            finally:
                if not waiter.granted:
                    self._queue.remove(waiter)
                    self._queued_by[tenant] -= 1
                    self._gauge_queue(tenant)
                    self._grant()  # a blocked head may have kept later waiters back
            waited = time.monotonic() - start
            if waiter.granted and self._monitor.fault is not None:
                self._release_locked(tenant)
            elif waiter.granted:
                if self._metrics is not None:
                    self._metrics.queue_wait.labels(tenant).observe(waited)
                return Slot(self, tenant, waited)
        self._monitor.check()
        if deadline is not None and time.monotonic() >= deadline:
            self._reject(tenant, "deadline")
            raise DeadlineExceeded(f"the deadline passed after {1000 * waited:.0f} ms in the queue, before "
                                   "any work was done")
        self._reject(tenant, "queue_timeout")
        raise QuotaExceeded(f"no slot came free in {lim.max_wait_s:.0f} s; retry later", retry_after=lim.retry_after_s)

    # --- under the lock -----------------------------------------------------------------------
    def _can_run(self, tenant: str, inflight_limit: int) -> bool:
        return self._running < self.limits.max_inflight and self._running_by.get(tenant, 0) < inflight_limit

    def _take(self, tenant: str) -> None:
        self._running += 1
        self._running_by[tenant] = self._running_by.get(tenant, 0) + 1
        if self._metrics is not None:
            self._metrics.inflight.labels(tenant).set(self._running_by[tenant])

    def _grant(self) -> None:
        """Give free slots to the first waiters that may run (FIFO, skipping tenants at their limit)."""
        granted = False
        for waiter in list(self._queue):
            if self._running >= self.limits.max_inflight:
                break
            if self._can_run(waiter.tenant, waiter.inflight_limit):
                waiter.granted = granted = True
                self._queue.remove(waiter)
                self._queued_by[waiter.tenant] -= 1
                self._gauge_queue(waiter.tenant)
                self._take(waiter.tenant)
        if granted:
            self._cond.notify_all()

    def _release_locked(self, tenant: str) -> None:
        self._running -= 1
        self._running_by[tenant] -= 1
        if self._metrics is not None:
            self._metrics.inflight.labels(tenant).set(self._running_by[tenant])
        self._grant()

    def _gauge_queue(self, tenant: str) -> None:
        if self._metrics is not None:
            self._metrics.queued.labels(tenant).set(self._queued_by.get(tenant, 0))

    # --- without ------------------------------------------------------------------------------
    def _release(self, tenant: str) -> None:
        with self._cond:
            self._release_locked(tenant)

    def _wake_all(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _reject(self, tenant: str, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.rejected.labels(tenant, reason).inc()
