"""The composition root: settings -> backend -> ops -> registry -> dispatcher -> app."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

from flask import Flask

from . import __version__
from .admission import Admission, Limits
from .auth import TokenStore
from .backends import Backend, select_backend
from .batching import BatchingFactory
from .config import Settings
from .dispatch import Dispatcher
from .faults import FaultMonitor
from .kaas import KaasService, build_kaas
from .metrics import Metrics
from .modelrepo import ModelRepository
from .ops import ClassifyOp, GemmOp, ModelOp, NoopOp, Op
from .registry import Registry
from .prefault import Prefaulter
from .shm import SharedMemoryRegistry
from .server import create_app
from .server.guard import Guard, install_guard
from .server.openapi import register_openapi
from .tenant_metrics import RelayedTenantMetrics, TenantMetrics

log = logging.getLogger(__name__)


@dataclass
class Service:
    """One shim, assembled but not yet loaded (call ``registry.load_all()``)."""

    settings: Settings
    backend: Backend
    registry: Registry
    dispatcher: Dispatcher
    metrics: Metrics
    app: Flask
    guard: Guard | None = None
    kaas: KaasService | None = None
    shm: SharedMemoryRegistry | None = None

    def load(self) -> None:
        """Load and warm up every op; the shim answers ready afterwards."""
        # the ops first: on the GPU their models capture CUDA graphs, which needs the device to
        # themselves; the shim is ready once KaaS has compiled its kernels too (a registry gate)
        self.registry.load_all(self.backend.warmed)
        if self.kaas is not None:
            self.kaas.load()
        for name, seconds in self.registry.warmup_seconds.items():
            self.metrics.warmup.labels(name).set(seconds)
        self.metrics.ready.set(1)


def build_ops(settings: Settings, backend: Backend, batching: BatchingFactory | None = None) -> list[Op]:
    """noop, gemm, classify (on ``settings.classify_model``) and every model of the repository;
    classify and the models batch dynamically when ``batching`` is given."""
    repo = ModelRepository(settings.models_dir)
    names = repo.names()
    if settings.classify_model and settings.classify_model not in names:
        raise FileNotFoundError(
            f"model {settings.classify_model!r} is not in {settings.models_dir}: run `accelshim models build "
            f"--dir {settings.models_dir}` (or `make models`)")
    ops: list[Op] = [NoopOp(), GemmOp(backend, settings.max_gemm_elements)]
    if settings.classify_model:
        ops.append(ClassifyOp(backend, repo.load(settings.classify_model), settings.max_image_pixels,
                              settings.max_batch, batching))
    reserved = {op.name for op in ops}
    ops += [ModelOp(backend, repo.load(n), settings.max_batch, batching) for n in names if n not in reserved]
    return ops


def build_guard(settings: Settings, metrics: Metrics,
                tenant_metrics: TenantMetrics | RelayedTenantMetrics | None = None) -> Guard:
    """Tokens (``settings.tokens_file``), admission limits and the fault monitor of one shim; its
    tenant metrics on ``metrics``' registry unless given (a request worker relays its own)."""
    tokens = TokenStore.load(settings.tokens_file) if settings.tokens_file else None
    if tokens is not None and settings.tokens_file is not None:
        tokens.reload_when_changed(settings.tokens_file)
    monitor = FaultMonitor()
    tenant_metrics = tenant_metrics or TenantMetrics(metrics.registry)
    limits = Limits(max_inflight=settings.threads, max_queue=settings.max_queue,
                    tenant_max_inflight=settings.tenant_max_inflight, tenant_max_queue=settings.tenant_max_queue)
    return Guard(tokens, Admission(limits, monitor, tenant_metrics), monitor, tenant_metrics,
                 settings.max_body_bytes, settings.tenant_max_body_bytes)


def build_service(settings: Settings, backend: Backend | None = None, extra_ops: Sequence[Op] = ()) -> Service:
    """Assemble a shim from ``settings`` (the backend chosen by ``settings.device`` unless given).

    Args:
        extra_ops: ops served besides those of ``build_ops`` (tests add failing or slow ones).
    Raises:
        TokenFileError (a ValueError), OSError: an unusable ``settings.tokens_file``.
    """
    metrics = Metrics()
    guard = build_guard(settings, metrics)  # first: a bad tokens file fails before the device starts
    backend = backend or select_backend(settings.device, 0, settings.gpu_memory_limit, settings.cuda_graphs,
                                        settings.gpu_jpeg)
    metrics.info.info({"version": __version__, "backend": backend.name})
    batching = (BatchingFactory(metrics.batch_size, metrics.queue_seconds, metrics.batch_seconds)
                if settings.batching else None)
    registry = Registry([*build_ops(settings, backend, batching), *extra_ops])
    dispatcher = Dispatcher(registry, metrics)
    kaas = build_kaas("cuda" if backend.name == "cuda" else "cpu", metrics.registry, kernels_dir=settings.kernels_dir,
                      store_bytes=settings.buffer_store_bytes, cache_bytes=settings.gpu_cache_bytes,
                      state_dir=settings.state_dir, quota=_buffer_quota(guard, settings.tenant_max_buffer_bytes))
    guard.buffer_usage = lambda tenant: kaas.usage(tenant)["tenant_bytes"]
    registry.add_gate(lambda: kaas.ready)
    shm = build_shm(settings, backend)
    app = create_app(settings, dispatcher, metrics, kaas, shm)
    install_guard(app, guard)
    register_openapi(app)
    return Service(settings, backend, registry, dispatcher, metrics, app, guard, kaas, shm)


def build_shm(settings: Settings, backend: Backend) -> SharedMemoryRegistry | None:
    """The shared memory regions of ``settings`` (None: the extension is off). Each new mapping is
    prefaulted in the background (``shim.prefault``), and the backend hears of it (the CUDA backend
    pins it, so that operands in it go to the GPU by DMA)."""
    if not settings.shared_memory:
        return None
    prefault = Prefaulter(settings.shm_prefault_threads) if settings.shm_prefault_threads else None

    def on_register(address: int, nbytes: int) -> None:
        try:
            if prefault is not None:  # the page tables filled while the request goes on
                prefault.start(address, nbytes)
            backend.register_host(address, nbytes)
        except BaseException:
            on_unregister(address, nbytes, pinned=False)
            raise

    def on_unregister(address: int, _nbytes: int, pinned: bool = True) -> None:
        try:
            if prefault is not None:
                prefault.wait(address)
        finally:  # unpinned whatever the prefault did: the mapping goes next
            if pinned:
                backend.unregister_host(address)

    return SharedMemoryRegistry(settings.shm_dir, max_regions=settings.shm_max_regions,
                                max_bytes=settings.shm_max_bytes, tenant_dirs=settings.shm_tenant_dirs,
                                on_register=on_register, on_unregister=on_unregister)


def _buffer_quota(guard: Guard, default: int = 0) -> Callable[[str], int | None]:
    """Tenant -> its ``max_buffer_bytes`` from the tokens file, else ``default`` (0 or None: the store's
    bound alone)."""
    tokens = guard.tokens

    def quota(name: str) -> int | None:
        tenant = tokens.tenant(name) if tokens is not None else None
        return (tenant.limits.max_buffer_bytes if tenant is not None else None) or default or None

    return quota
