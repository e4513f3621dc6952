"""The KaaS runner of the CUDA backend: every library's ``kernels.cu`` compiled once with NVRTC
(``cupy.RawModule``) at start; buffers are cupy uint8 arrays; launches are timed with CUDA events.
"""
from __future__ import annotations

from typing import Any, Sequence

import cupy as cp
import numpy as np

from ..kaas.library import Library
from ..kaas.runner import DeviceLimits
from ..kaas.signature import Kernel
from .cuda_errors import device_errors

NVRTC_OPTIONS = ("-std=c++14",)


class CudaKernelRunner:
    """Runs compiled kernels on one GPU (the current cupy device unless ``device_id`` is given)."""

    name = "cuda"

    def __init__(self, device_id: int | None = None) -> None:
        self.device = cp.cuda.Device(device_id) if device_id is not None else cp.cuda.Device()
        self.device.use()
        a = self.device.attributes
        self.limits = DeviceLimits(a["MaxThreadsPerBlock"], (a["MaxBlockDimX"], a["MaxBlockDimY"], a["MaxBlockDimZ"]),
                                   (a["MaxGridDimX"], a["MaxGridDimY"], a["MaxGridDimZ"]),
                                   a["MaxSharedMemoryPerBlock"])
        self._modules: dict[str, cp.RawModule] = {}
        self._functions: dict[tuple[str, str], Any] = {}

    def load(self, libraries: Sequence[Library]) -> None:
        """Compile every library and look up each declared kernel (so a bad .cu fails the start)."""
        with self.device:
            for lib in libraries:
                module = cp.RawModule(code=lib.source, options=NVRTC_OPTIONS, backend="nvrtc")
                for name in lib.kernels:
                    self._functions[(lib.name, name)] = module.get_function(name)
                self._modules[lib.name] = module

    # out of GPU memory on the way (a buffer too many for now) is a 503 to retry, as for every op
    def upload(self, data: bytes) -> cp.ndarray:
        with self.device, device_errors(cp.get_default_memory_pool()):
            return cp.asarray(np.frombuffer(data, np.uint8))

    def download(self, buf: cp.ndarray) -> bytes:
        with self.device, device_errors():
            return cp.asnumpy(buf).tobytes()

    def alloc(self, size: int) -> cp.ndarray:
        with self.device, device_errors(cp.get_default_memory_pool()):
            return cp.zeros(size, cp.uint8)

    def view(self, buf: cp.ndarray, offset: int, size: int) -> cp.ndarray:
        return buf[offset:offset + size]

    def launch(self, library: str, kernel: Kernel, literals: Sequence[np.generic], buffers: Sequence[Any],
               counts: Sequence[int], grid: tuple[int, int, int], block: tuple[int, int, int], shared: int) -> None:
        # a cupy array is passed as the pointer to its first byte (the view's offset included)
        with device_errors():
            self._functions[(library, kernel.name)](grid, block, (*literals, *buffers), shared_mem=shared)

    def mark(self) -> cp.cuda.Event:
        event = cp.cuda.Event()
        event.record()
        return event

    def elapsed_ms(self, start: cp.cuda.Event, end: cp.cuda.Event) -> float:
        return float(cp.cuda.get_elapsed_time(start, end))

    def synchronize(self) -> None:
        # a fault in a kernel is sticky (illegal address, ...): DeviceLost, and the shim restarts
        with device_errors():
            cp.cuda.get_current_stream().synchronize()

    def describe(self) -> dict[str, object]:
        props = cp.cuda.runtime.getDeviceProperties(self.device.id)
        return {"runner": self.name, "device": props["name"].decode(), "cupy": cp.__version__,
                "cuda_runtime": cp.cuda.runtime.runtimeGetVersion()}
