"""The KaaS runner of the CPU backend: each kernel runs as its numpy reference.

Device memory is host memory (flat uint8 numpy arrays); the same checks, cache and store apply,
so graphs behave as on the GPU, and CI tests them without one.
"""
from __future__ import annotations

import os
import platform
import time
from typing import Any, Sequence

import numpy as np

from ..kaas.library import Library
from ..kaas.runner import DeviceLimits
from ..kaas.signature import Kernel


class CpuKernelRunner:
    """Runs kernels as their numpy references; reports the limits of a CUDA device."""

    name = "cpu"

    def __init__(self) -> None:
        self.limits = DeviceLimits()

    def load(self, libraries: Sequence[Library]) -> None:
        pass  # the references were imported with their libraries

    def upload(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, np.uint8).copy()

    def download(self, buf: np.ndarray) -> bytes:
        return buf.tobytes()

    def alloc(self, size: int) -> np.ndarray:
        return np.zeros(size, np.uint8)

    def view(self, buf: np.ndarray, offset: int, size: int) -> np.ndarray:
        return buf[offset:offset + size]

    def launch(self, library: str, kernel: Kernel, literals: Sequence[np.generic], buffers: Sequence[Any],
               counts: Sequence[int], grid: tuple[int, int, int], block: tuple[int, int, int], shared: int) -> None:
        # each argument as exactly its declared elements: a reference cannot touch bytes beyond them
        arrays = [buf[:count * arg.itemsize].view(arg.dtype) for buf, count, arg in zip(buffers, counts, kernel.args)]
        with np.errstate(all="ignore"):  # as on the GPU: inf and nan are values, not faults
            kernel.reference(*literals, *arrays)

    def mark(self) -> float:
        return time.perf_counter()

    def elapsed_ms(self, start: float, end: float) -> float:
        return (end - start) * 1e3

    def synchronize(self) -> None:
        pass

    def describe(self) -> dict[str, object]:
        return {"runner": self.name, "device": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                "numpy": np.__version__}
