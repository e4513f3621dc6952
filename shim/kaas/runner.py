"""What the executor asks of a kernel runner: device memory, launches, timing, device limits.

The runners are in ``shim/backends/``: ``kaas_cpu`` (the numpy references) and ``kaas_cuda``
(``cupy.RawModule`` kernels compiled with NVRTC).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np

from .library import Library
from .signature import Kernel


@dataclass(frozen=True)
class DeviceLimits:
    """Launch limits that requests are checked against before anything runs."""

    max_threads_per_block: int = 1024
    max_block: tuple[int, int, int] = (1024, 1024, 64)
    max_grid: tuple[int, int, int] = (2**31 - 1, 65535, 65535)
    max_shared_bytes: int = 48 * 1024


class KernelRunner(Protocol):
    """Runs kernels of loaded libraries on one device; device arrays are flat uint8 arrays."""

    name: str
    limits: DeviceLimits

    def load(self, libraries: Sequence[Library]) -> None:
        """Compile or otherwise prepare every kernel of ``libraries`` (once, at start)."""
        ...

    def upload(self, data: bytes) -> Any: ...

    def download(self, buf: Any) -> bytes: ...

    def alloc(self, size: int) -> Any:
        """``size`` zeroed bytes on the device."""
        ...

    def view(self, buf: Any, offset: int, size: int) -> Any:
        """The bytes ``[offset, offset + size)`` of ``buf``, without a copy."""
        ...

    def launch(self, library: str, kernel: Kernel, literals: Sequence[np.generic], buffers: Sequence[Any],
               counts: Sequence[int], grid: tuple[int, int, int], block: tuple[int, int, int], shared: int) -> None:
        """Queue one launch: literals first, then buffers (``counts`` elements each)."""
        ...

    def mark(self) -> Any:
        """A point in the device's queue, for :meth:`elapsed_ms`."""
        ...

    def elapsed_ms(self, start: Any, end: Any) -> float:
        """Milliseconds between two marks (after :meth:`synchronize`)."""
        ...

    def synchronize(self) -> None:
        """Wait for queued work; raises when a kernel faulted."""
        ...

    def describe(self) -> dict[str, object]: ...
