"""Kernel-as-a-Service: graphs of preloaded kernels over named buffers in a store (docs/kaas.md).

Modules: model (the request format), signature (kernel declarations), library (registered kernel
libraries), store (the bounded, persistent buffer store), cache (the GPU-resident LRU cache),
buffers (the two kept consistent), plan (checks before launch), executor (runs a plan), runner
(what a device runner offers; the runners are in ``shim.backends``), service (the routes' API).
"""
from __future__ import annotations

import logging
from pathlib import Path

from prometheus_client import CollectorRegistry

from .buffers import Buffers
from .cache import DeviceCache
from .executor import Executor
from .library import LibraryRegistry
from .metrics import KaasMetrics
from .runner import KernelRunner
from .service import KaasService
from .store import DEFAULT_TENANT, BufferStore, QuotaHook

__all__ = ["KaasService", "build_kaas", "DEFAULT_TENANT", "BufferStore", "LibraryRegistry"]

log = logging.getLogger(__name__)


def make_runner(device: str) -> KernelRunner:
    """The kernel runner of ``device`` (``cuda`` or ``cpu``); cupy is imported only for ``cuda``."""
    if device == "cuda":
        from ..backends.kaas_cuda import CudaKernelRunner  # noqa: PLC0415 - imports cupy

        return CudaKernelRunner()
    from ..backends.kaas_cpu import CpuKernelRunner  # noqa: PLC0415

    return CpuKernelRunner()


def build_kaas(device: str, registry: CollectorRegistry, *, kernels_dir: Path | str | None = None,
               store_bytes: int = 1 << 30, cache_bytes: int = 1 << 30, state_dir: Path | str | None = None,
               quota: QuotaHook | None = None, runner: KernelRunner | None = None) -> KaasService:
    """Assemble KaaS (not yet loaded: call ``load()``).

    Args:
        device: ``cuda`` or ``cpu`` (the runner, unless ``runner`` is given).
        registry: the Prometheus registry that ``/metrics`` renders.
        kernels_dir: a folder of operator libraries, added to the built-ins.
        store_bytes, cache_bytes: bounds of the buffer store and the GPU cache.
        state_dir: persist the store there (outputs are then written through before answering).
        quota: per-tenant byte quota hook.
    """
    libraries = LibraryRegistry.discover([Path(kernels_dir)] if kernels_dir else [])
    runner = runner or make_runner(device)
    metrics = KaasMetrics(registry)
    store = BufferStore(store_bytes, Path(state_dir) if state_dir else None, quota)
    cache = DeviceCache(runner, cache_bytes, lambda tenant, key, data: store.put(key, data, tenant), metrics)
    return KaasService(Executor(libraries, runner, Buffers(store, cache, metrics), metrics,
                               durable=state_dir is not None))
