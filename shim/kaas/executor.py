"""Run a checked plan: buffers in from the cache, kernels ``nIter`` times, outputs committed.

Outputs reach the store only when every launch succeeded; a request that fails (a kernel fault,
no room on the device) leaves the store as it was.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from accel.errors import AccelError, InternalError

from .buffers import Buffers
from .cache import CacheEntry
from .library import LibraryRegistry
from .metrics import KaasMetrics
from .model import KaasRequest
from .plan import Plan, make_plan
from .runner import KernelRunner


@dataclass
class KernelTiming:
    library: str
    kernel: str
    ms: float


@dataclass
class KaasResult:
    """What ``POST /v1/kaas`` answers: the outputs written and where the time went."""

    outputs: list[dict[str, object]]
    kernels: list[KernelTiming]
    n_iter: int
    launches: int
    device: str
    timings_ms: dict[str, float] = field(default_factory=dict)
    cache: dict[str, int] = field(default_factory=dict)

    def as_json(self) -> dict[str, object]:
        return {"outputs": self.outputs, "nIter": self.n_iter, "launches": self.launches, "device": self.device,
                "timings_ms": {**{k: round(v, 4) for k, v in self.timings_ms.items()},
                               "kernels": [{"library": k.library, "kernel": k.kernel, "ms": round(k.ms, 4)}
                                           for k in self.kernels]},
                "cache": self.cache}


class Executor:
    """Runs KaaS requests on one runner, one at a time (the device's queue)."""

    def __init__(self, libraries: LibraryRegistry, runner: KernelRunner, buffers: Buffers, metrics: KaasMetrics,
                 durable: bool = False) -> None:
        self.libraries = libraries
        self.runner = runner
        self.buffers = buffers
        self.metrics = metrics
        self.durable = durable  # write outputs through to the store before answering

    def run(self, request: KaasRequest, tenant: str) -> KaasResult:
        """Check ``request``, run it, commit its outputs.

        Raises:
            OpNotFound, InvalidInput: see :func:`make_plan`; nothing has run.
            InsufficientStorage: no room in the store (or the tenant's quota) or the GPU cache.
            InternalError: a kernel failed; no output was committed.
        """
        store, cache = self.buffers.store, self.buffers.cache
        with self.buffers.lock:
            t0 = time.perf_counter()
            plan = make_plan(request, self.libraries, self.runner.limits, lambda key: store.size_of(key, tenant))
            store.check_room({b.spec.key: b.size for b in plan.buffers.values() if b.store and not b.load}, tenant)
            hits0, misses0 = cache.hits, cache.misses
            entries: dict[str, CacheEntry] = {}
            fresh: dict[str, Any] = {}
            reserved = 0
            try:
                views: dict[str, Any] = {}
                for name, pb in plan.buffers.items():
                    if pb.load:
                        key = pb.spec.key
                        entry = cache.acquire(tenant, key, lambda key=key: self.buffers.load(key, tenant),
                                              pb.spec.const)
                        entries[name] = entry
                        if pb.written:
                            cache.flush(entry)  # its store copy is current, so a failed run can drop it
                        views[name] = self.runner.view(entry.buf, pb.spec.offset, pb.size)
                    else:
                        cache.reserve(pb.size)
                        reserved += pb.size
                        fresh[name] = views[name] = self.runner.alloc(pb.size)
                t1 = time.perf_counter()
                kernel_ms = self._launch(plan, views)
                t2 = time.perf_counter()
            except BaseException:
                for name, entry in entries.items():
                    cache.release(entry)
                    if plan.buffers[name].written:
                        cache.invalidate(tenant, entry.key)
                cache.unreserve(reserved)
                raise
            outputs = []
            try:  # whatever happens while committing, pins and reservations are given back
                for name, pb in plan.buffers.items():
                    if not pb.store:
                        continue
                    if pb.load:
                        entry = entries[name]
                        entry.dirty = True
                    else:
                        store.put_pending(pb.spec.key, pb.size, tenant)
                        reserved -= pb.size
                        entry = entries[name] = cache.install(tenant, pb.spec.key, fresh[name], pb.size)
                    if self.durable:
                        cache.flush(entry)
                    outputs.append({"name": name, "key": pb.spec.key, "size": pb.size})
            finally:
                for entry in entries.values():
                    cache.release(entry)
                cache.unreserve(reserved)
            self.metrics.store_bytes.set(store.used_bytes())
            t3 = time.perf_counter()
            hits1, misses1 = cache.hits, cache.misses
        for launch in plan.launches:
            self.metrics.launches.labels(launch.spec.library, launch.spec.kernel).inc(plan.n_iter)
        return KaasResult(
            outputs, [KernelTiming(la.spec.library, la.spec.kernel, ms) for la, ms in zip(plan.launches, kernel_ms)],
            plan.n_iter, plan.n_iter * len(plan.launches), self.runner.name,
            {"load": (t1 - t0) * 1e3, "run": (t2 - t1) * 1e3, "commit": (t3 - t2) * 1e3, "total": (t3 - t0) * 1e3},
            {"hits": hits1 - hits0, "misses": misses1 - misses0})

    def _launch(self, plan: Plan, views: dict[str, Any]) -> list[float]:
        """Every launch ``n_iter`` times; the per-kernel times are those of the first iteration."""
        runner = self.runner
        marks = []
        current = plan.launches[0]
        try:
            for iteration in range(plan.n_iter):
                for launch in plan.launches:
                    current = launch
                    if iteration == 0:
                        marks.append(runner.mark())
                    runner.launch(launch.spec.library, launch.kernel, launch.literals,
                                  [views[n] for n in launch.buffers], launch.counts,
                                  launch.spec.grid, launch.spec.block, launch.spec.shared_size)
                if iteration == 0:
                    marks.append(runner.mark())
            runner.synchronize()
        except AccelError:
            raise
        except Exception as exc:  # a fault in a kernel, or a reference that raised
            raise InternalError(f"kernel graph failed at or after kernels[{current.index}] "
                                f"({current.spec.library}.{current.spec.kernel}): {type(exc).__name__}: {exc}; "
                                "no output was written") from exc
        return [runner.elapsed_ms(a, b) for a, b in zip(marks, marks[1:])]

