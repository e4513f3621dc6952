"""Prometheus metrics per tenant, on the shim's own registry (next to those of ``metrics.py``)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
