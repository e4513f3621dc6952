"""The CPU backend: numpy (BLAS) for GEMM, onnxruntime's CPU provider for models.

It is also the reference twin that every GPU path is tested against.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np

from . import onnx


class CpuBackend:
    """Runs every op on the host CPU."""

    name = "cpu"

    def __init__(self, threads: int = 0) -> None:
        self.threads = threads

    def gemm(self, a: np.ndarray, b: np.ndarray, c: np.ndarray | None, alpha: float, beta: float) -> np.ndarray:
        return gemm_reference(a, b, c, alpha, beta)

    def load_model(self, path: Path) -> onnx.OnnxRunner:
        return onnx.OnnxRunner(path, ["CPUExecutionProvider"], self.threads)

    def describe(self) -> dict[str, object]:
        return {"backend": self.name, "device": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(), "numpy": np.__version__, "onnxruntime": onnx.version()}


def gemm_reference(a: np.ndarray, b: np.ndarray, c: np.ndarray | None, alpha: float, beta: float) -> np.ndarray:
    """``alpha * a @ b + beta * c`` in ``a``'s dtype; FP16 accumulates in FP32 as cuBLAS does."""
    work = np.float32 if a.dtype == np.float16 else a.dtype
    out = np.matmul(a.astype(work, copy=False), b.astype(work, copy=False))
    if alpha != 1.0:
        out *= np.asarray(alpha, dtype=out.dtype)
    if c is not None and beta != 0.0:
        out += np.asarray(beta, dtype=out.dtype) * c.astype(out.dtype, copy=False)
    return out.astype(a.dtype, copy=False)
