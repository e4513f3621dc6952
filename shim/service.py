"""The composition root: settings -> backend -> ops -> registry -> dispatcher -> app."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from flask import Flask

from . import __version__
from .backends import Backend, select_backend
from .config import Settings
from .dispatch import Dispatcher
from .metrics import Metrics
from .modelrepo import ModelRepository
from .ops import ClassifyOp, GemmOp, ModelOp, NoopOp, Op
from .registry import Registry
from .server import create_app

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

    def load(self) -> None:
        """Load and warm up every op; the shim answers ready afterwards."""
        self.registry.load_all()
        for name, seconds in self.registry.warmup_seconds.items():
            self.metrics.warmup.labels(name).set(seconds)
        self.metrics.ready.set(1)


def build_ops(settings: Settings, backend: Backend) -> list[Op]:
    """noop, gemm, classify (on ``settings.classify_model``) and every model of the repository."""
    repo = ModelRepository(settings.models_dir)
    names = repo.names()
    if settings.classify_model and settings.classify_model not in names:
        raise FileNotFoundError(
            f"model {settings.classify_model!r} is not in {settings.models_dir}: run `accelshim models build "
            f"--dir {settings.models_dir}` (or `make models`)")
    ops: list[Op] = [NoopOp(), GemmOp(backend, settings.max_gemm_elements)]
    if settings.classify_model:
        ops.append(ClassifyOp(backend, repo.load(settings.classify_model), settings.max_image_pixels,
                              settings.max_batch))
    reserved = {op.name for op in ops}
    ops += [ModelOp(backend, repo.load(n), settings.max_batch) for n in names if n not in reserved]
    return ops


def build_service(settings: Settings, backend: Backend | None = None) -> Service:
    """Assemble a shim from ``settings`` (the backend chosen by ``settings.device`` unless given)."""
    backend = backend or select_backend(settings.device, 0)
    metrics = Metrics()
    metrics.info.info({"version": __version__, "backend": backend.name})
    registry = Registry(build_ops(settings, backend))
    dispatcher = Dispatcher(registry, metrics)
    return Service(settings, backend, registry, dispatcher, metrics, create_app(settings, dispatcher, metrics))
