"""Prometheus metrics of one shim (a registry of its own, so that tests can build many shims)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from accel.errors import AccelError

from .batching import BATCH_BUCKETS, QUEUE_BUCKETS

_LATENCY_BUCKETS = (.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)


class Metrics:
    """Counters and histograms the dispatcher and server update."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("accelshim_requests", "Requests by op and HTTP status", ["op", "status"], registry=r)
        self.latency = Histogram("accelshim_request_seconds", "Time in the op (decode to encode)", ["op"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.items = Counter("accelshim_items", "Items processed (images, matrices, tensors)", ["op"], registry=r)
        self.inflight = Gauge("accelshim_inflight_requests", "Requests being served", registry=r)
        self.ready = Gauge("accelshim_ready", "1 once every op is warmed up", registry=r)
        self.warmup = Gauge("accelshim_warmup_seconds", "Load + warm-up time per op", ["op"], registry=r)
        self.request_bytes = Counter("accelshim_request_bytes", "Request body bytes by op", ["op"], registry=r)
        self.info = Info("accelshim", "Shim version and backend", registry=r)
        self.batch_size = Histogram("accelshim_batch_size", "Rows (images, tensor rows) per device run, by op",
                                    ["op"], buckets=BATCH_BUCKETS, registry=r)
        self.queue_seconds = Histogram("accelshim_queue_seconds", "Time a request waited for its batch, by op",
                                       ["op"], buckets=QUEUE_BUCKETS, registry=r)
        self.batch_seconds = Histogram("accelshim_batch_seconds",
                                       "Time of one device run of a batch (queued on the GPU: until it lands), by op",
                                       ["op"], buckets=_LATENCY_BUCKETS, registry=r)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class Outcome:
    """``with Outcome() as outcome:`` notes the HTTP status that the block ends with: 200, the
    status of the AccelError it raised, or 500 for anything else (which goes on propagating)."""

    status = 200

    def __enter__(self) -> "Outcome":
        return self

    def __exit__(self, _type: object, exc: BaseException | None, _tb: object) -> bool:
        if exc is not None:
            self.status = exc.status if isinstance(exc, AccelError) else 500
        return False
