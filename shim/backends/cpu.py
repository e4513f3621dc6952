"""The CPU backend: numpy (BLAS) for GEMM, onnxruntime's CPU provider for models, Pillow for images.

It is also the reference twin that every GPU path is tested against.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Sequence

import numpy as np

from ..kernels.resample import Picture, pillow_preprocess
from ..modelrepo import ModelConfig
from . import onnx


class CpuBackend:
    """Runs every op on the host CPU."""

    name = "cpu"

    def __init__(self, threads: int = 0) -> None:
        self.threads = threads

    def gemm(self, a: np.ndarray, b: np.ndarray, c: np.ndarray | None, alpha: float, beta: float,
             precision: str = "default", *, out: np.ndarray | None = None) -> np.ndarray:
        return gemm_reference(a, b, c, alpha, beta, precision, out=out)

    def load_model(self, path: Path, instances: int = 1) -> onnx.OnnxRunner:
        """One session, whatever ``instances`` says: onnxruntime runs concurrent calls on it."""
        return onnx.OnnxRunner(path, ["CPUExecutionProvider"], self.threads)

    def register_host(self, address: int, nbytes: int, now: bool = False) -> None:
        """Nothing to pin: the CPU reads host memory where it is."""

    def unregister_host(self, address: int) -> None:
        """Nothing was pinned."""

    def warmed(self) -> None:
        """Nothing to seal."""

    def image_pipeline(self, config: ModelConfig) -> "CpuImagePipeline":
        return CpuImagePipeline(self.load_model(config.onnx), config)

    def describe(self) -> dict[str, object]:
        return {"backend": self.name, "device": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(), "numpy": np.__version__, "onnxruntime": onnx.version()}


class CpuImagePipeline:
    """Pillow preprocessing in the request's thread, then the model on the stacked batch."""

    def __init__(self, runner: onnx.OnnxRunner, config: ModelConfig) -> None:
        assert config.preprocessing is not None
        self.runner = runner
        self.device = runner.device
        self.decodes_jpeg = False
        self._pre = config.preprocessing
        self._step = max(1, config.max_batch_size)
        self._input, self._output = runner.inputs[0].name, runner.outputs[0].name

    def prepare(self, image: Picture) -> np.ndarray:
        return pillow_preprocess(image, self._pre)

    def logits(self, items: Sequence[np.ndarray]) -> np.ndarray:
        parts = [self.runner.run({self._input: np.stack(items[i:i + self._step])})[self._output]
                 for i in range(0, len(items), self._step)]
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def bind_thread(self) -> None:
        """Nothing to bind: the model runs in the calling thread."""


def round_to_tf32(x: np.ndarray) -> np.ndarray:
    """FP32 values rounded to TF32 (10 explicit mantissa bits, nearest, ties away from zero), as
    the tensor cores see them."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)
    finite = np.isfinite(x)
    return np.where(finite, rounded.view(np.float32), x).astype(np.float32, copy=False)


def gemm_reference(a: np.ndarray, b: np.ndarray, c: np.ndarray | None, alpha: float, beta: float,
                   precision: str = "default", *, out: np.ndarray | None = None) -> np.ndarray:
    """``alpha * a @ b + beta * c`` in ``a``'s dtype; FP16 accumulates in FP32 as cuBLAS does, and
    ``precision="tf32"`` rounds FP32 inputs to TF32 first, as the tensor cores do. Into ``out``
    (returned) when given: the same values, computed in place where ``out`` can hold the product."""
    dtype = a.dtype
    if precision == "tf32" and dtype == np.float32:
        a, b = round_to_tf32(a), round_to_tf32(b)
    work = np.float32 if dtype == np.float16 else dtype
    a, b = a.astype(work, copy=False), b.astype(work, copy=False)
    result = np.matmul(a, b, out=out if _can_compute_in(out, work, a, b, c) else None)
    if alpha != 1.0:
        result *= np.asarray(alpha, dtype=result.dtype)
    if c is not None and beta != 0.0:
        result += np.asarray(beta, dtype=result.dtype) * c.astype(result.dtype, copy=False)
    if out is None:
        return result.astype(dtype, copy=False)
    if result is not out:
        np.copyto(out, result, casting="same_kind")
    return out


def _can_compute_in(out: np.ndarray | None, work: np.dtype, *operands: np.ndarray | None) -> bool:
    """Whether the product can be accumulated in ``out`` itself: the working dtype, aligned, and
    sharing no memory with an operand (writing there would change what is still to be read)."""
    return (out is not None and out.dtype == work and out.flags.c_contiguous and out.flags.aligned
            and not any(x is not None and np.may_share_memory(out, x) for x in operands))
