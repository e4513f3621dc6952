"""Prometheus metrics per tenant, on the shim's own registry (next to those of ``metrics.py``)."""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

log = logging.getLogger(__name__)

_WAIT_BUCKETS = (.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)


class TenantMetrics:
    """Requests, bytes, slots, queue and rejections of each tenant (label ``tenant``).

    Requests that fail authentication count under the tenant ``_unauthenticated``.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.requests = Counter("accelshim_tenant_requests", "Requests by tenant and HTTP status",
                                ["tenant", "status"], registry=r)
        self.request_bytes = Counter("accelshim_tenant_request_bytes", "Request body bytes by tenant", ["tenant"],
                                     registry=r)
        self.inflight = Gauge("accelshim_tenant_inflight_requests", "Requests of the tenant holding a slot",
                              ["tenant"], registry=r)
        self.queued = Gauge("accelshim_tenant_queued_requests", "Requests of the tenant waiting for a slot",
                            ["tenant"], registry=r)
        self.queue_wait = Histogram("accelshim_tenant_queue_wait_seconds", "Time waited for a slot", ["tenant"],
                                    buckets=_WAIT_BUCKETS, registry=r)
        self.rejected = Counter("accelshim_tenant_rejected", "Requests refused before any work, by reason "
                                "(unauthorized, forbidden, body_too_large, queue_full, tenant_queue_full, "
                                "queue_timeout, deadline, buffer_quota)", ["tenant", "reason"], registry=r)
        self.buffer_bytes = Gauge("accelshim_tenant_buffer_bytes", "Bytes the tenant holds in the buffer store",
                                  ["tenant"], registry=r)


#: what a request worker relays to the device process, and how it is added there: the counters and
#: the queue-wait histogram (its gauges, slots held and queued, are the worker's own state)
RELAYED = {"requests": "inc", "request_bytes": "inc", "rejected": "inc", "queue_wait": "observe"}
TenantEvent = tuple[str, tuple[str, ...], float]  # metric, label values, amount


class RelayedTenantMetrics:
    """A request worker's tenant metrics: what goes to the ``RELAYED`` metrics is handed to ``sink``
    as events, for the device process to add to its own (``apply``: its ``/metrics`` is the shim's);
    the gauges stay ``local``'s."""

    def __init__(self, local: TenantMetrics, sink: Callable[[TenantEvent], None]) -> None:
        self.inflight, self.queued, self.buffer_bytes = local.inflight, local.queued, local.buffer_bytes
        self.requests = _Relayed("requests", sink)
        self.request_bytes = _Relayed("request_bytes", sink)
        self.rejected = _Relayed("rejected", sink)
        self.queue_wait = _Relayed("queue_wait", sink)


class _Relayed:
    def __init__(self, name: str, sink: Callable[[TenantEvent], None]) -> None:
        self._name, self._sink = name, sink

    def labels(self, *values: str) -> "_RelayedChild":
        return _RelayedChild(self._name, tuple(values), self._sink)


class _RelayedChild:
    __slots__ = ("_name", "_values", "_sink")

    def __init__(self, name: str, values: tuple[str, ...], sink: Callable[[TenantEvent], None]) -> None:
        self._name, self._values, self._sink = name, values, sink

    def inc(self, amount: float = 1.0) -> None:
        self._sink((self._name, self._values, float(amount)))

    observe = inc


def apply(metrics: TenantMetrics | Any, events: Iterable[TenantEvent]) -> None:
    """Add a request worker's relayed events to ``metrics`` (the device process's); an event of no
    relayed metric is ignored, one that does not fit its metric is logged and skipped."""
    for event in events:
        try:
            name, values, amount = event
            how = RELAYED.get(name)
            if how is not None:
                getattr(getattr(metrics, name).labels(*values), how)(amount)
        except (TypeError, ValueError) as exc:
            log.warning("a request worker's tenant metric event %r does not fit: %s", event, exc)
