"""Backend selection: ``cuda`` when asked for or, with ``auto``, when cupy sees a GPU; else ``cpu``."""
from __future__ import annotations

import logging

from .base import Backend, ImagePipeline, ModelRunner, TensorSpec

log = logging.getLogger(__name__)

__all__ = ["Backend", "ImagePipeline", "ModelRunner", "TensorSpec", "select_backend"]


def select_backend(device: str, threads: int = 0, gpu_memory_limit: int = 0, cuda_graphs: bool = True,
                   gpu_jpeg: bool = False) -> Backend:
    """The backend for ``device`` (auto|cpu|cuda); the reason for the choice is logged. ``cuda_graphs``:
    the CUDA backend's models replay captured CUDA graphs (``OnnxRunner``); ``gpu_jpeg``: its classify
    decodes plain JPEGs on the GPU's JPEG engines where it has them (``cuda_jpeg``), else logs why not.

    Raises:
        RuntimeError: ``cuda`` was asked for and no usable GPU is there.
    """
    from .cpu import CpuBackend

    if device == "cpu":
        log.info("backend: cpu (asked for with --device cpu)")
        if gpu_jpeg:
            log.warning("--gpu-jpeg: no GPU with --device cpu; JPEGs are decoded on the CPU")
        return CpuBackend(threads)
    reason = _cuda_unavailable()
    if reason is None:
        from .cuda import CudaBackend  # noqa: PLC0415 - imports cupy

        log.info("backend: cuda (%s)", "asked for" if device == "cuda" else "auto: cupy sees a GPU")
        return CudaBackend(threads, memory_limit=gpu_memory_limit or None, graphs=cuda_graphs, jpeg=gpu_jpeg)
    if device == "cuda":
        raise RuntimeError(f"--device cuda, but no usable GPU: {reason}")
    log.info("backend: cpu (auto: %s)", reason)
    if gpu_jpeg:
        log.warning("--gpu-jpeg: no GPU (%s); JPEGs are decoded on the CPU", reason)
    return CpuBackend(threads)


def _cuda_unavailable() -> str | None:
    """None when cupy imports and sees at least one GPU; else why not."""
    try:
        import cupy  # noqa: F401,PLC0415
    except Exception as exc:  # ImportError, or a CUDA library missing underneath
        return f"cupy not importable ({type(exc).__name__}: {exc})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return f"no CUDA device ({exc})"
    return None if count > 0 else "no CUDA device"
