"""Prometheus metrics of KaaS, registered in the shim's own CollectorRegistry (so /metrics shows them)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_BUCKETS = (.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)


class KaasMetrics:
    """Requests, launches, the GPU cache (hits, misses, evictions by const/regular) and the store."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = r = registry
        self.requests = Counter("accelshim_kaas_requests", "KaaS requests by HTTP status", ["status"], registry=r)
        self.latency = Histogram("accelshim_kaas_request_seconds", "KaaS request time (plan to commit)",
                                 buckets=_BUCKETS, registry=r)
        self.launches = Counter("accelshim_kaas_kernel_launches", "Kernel launches by library and kernel",
                                ["library", "kernel"], registry=r)
        self.cache_hits = Counter("accelshim_kaas_cache_hits", "GPU cache hits by buffer kind", ["kind"], registry=r)
        self.cache_misses = Counter("accelshim_kaas_cache_misses", "GPU cache misses (uploads) by buffer kind",
                                    ["kind"], registry=r)
        self.cache_evictions = Counter("accelshim_kaas_cache_evictions", "GPU cache evictions by buffer kind",
                                       ["kind"], registry=r)
        self.writebacks = Counter("accelshim_kaas_cache_writebacks", "Dirty buffers written back to the store",
                                  registry=r)
        self.cache_bytes = Gauge("accelshim_kaas_cache_bytes", "Bytes resident or reserved in the GPU cache",
                                 registry=r)
        self.store_bytes = Gauge("accelshim_kaas_store_bytes", "Bytes in the buffer store", registry=r)
        for kind in ("const", "regular"):  # exported at 0 from the start, so rates work
            self.cache_hits.labels(kind)
            self.cache_misses.labels(kind)
            self.cache_evictions.labels(kind)
