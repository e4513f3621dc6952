"""The few CUDA calls of a batch's hot path (queued copies, a memset, a kernel
launch, an event's record and query) made through the driver API while holding the interpreter lock.

cupy's own calls let go of the lock around each CUDA call, and a thread that lets go has to wait to
take it back: in the device process, where the link's readers and the reply thread want it too, a
batcher waited about 0.1-0.2 ms after each call (the H200's stage probe: the pixels' upload 0.81 ms
of wall time for 0.26 of CPU). These calls only queue work (microseconds), so they keep the lock;
the price: should one block (a full launch queue, another thread's allocation holding the driver),
every thread of the process waits with it. Errors raise cupy's ``CUDADriverError``, which
``device_errors`` maps like the runtime's.
"""
from __future__ import annotations

import ctypes
import functools
from typing import Any, Sequence

import cupy as cp
import numpy as np

_C_SCALARS = {np.dtype(np.int32): ctypes.c_int32, np.dtype(np.int64): ctypes.c_int64,
              np.dtype(np.uint64): ctypes.c_uint64, np.dtype(np.float32): ctypes.c_float}


@functools.cache
def _driver() -> ctypes.PyDLL:
    """libcuda, its functions called without releasing the interpreter lock (``PyDLL``)."""
    lib = ctypes.PyDLL("libcuda.so.1")
    u64, size, ptr, uint = ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_uint
    lib.cuMemcpyHtoDAsync_v2.argtypes = [u64, ptr, size, ptr]
    lib.cuMemsetD8Async.argtypes = [u64, ctypes.c_ubyte, size, ptr]
    lib.cuMemcpyDtoHAsync_v2.argtypes = [ptr, u64, size, ptr]
    lib.cuMemcpyDtoDAsync_v2.argtypes = [u64, u64, size, ptr]
    lib.cuLaunchKernel.argtypes = [ptr, uint, uint, uint, uint, uint, uint, uint, ptr, ptr, ptr]
    lib.cuEventRecord.argtypes = [ptr, ptr]
    lib.cuEventQuery.argtypes = [ptr]
    for name in ("cuMemcpyHtoDAsync_v2", "cuMemcpyDtoHAsync_v2", "cuMemcpyDtoDAsync_v2", "cuMemsetD8Async",
                 "cuLaunchKernel", "cuEventRecord", "cuEventQuery"):
        getattr(lib, name).restype = ctypes.c_int
    return lib


_NOT_READY = 600  # CUDA_ERROR_NOT_READY: cuEventQuery's "not yet"


def _check(status: int) -> None:
    if status:
        raise cp.cuda.driver.CUDADriverError(status)


def copy_to_device(dst: int, src: int, nbytes: int, stream: int) -> None:
    """Queue a copy of ``nbytes`` from host address ``src`` to device address ``dst`` on ``stream``
    (asynchronous where ``src`` is pinned)."""
    _check(_driver().cuMemcpyHtoDAsync_v2(dst, src, nbytes, stream))


def copy_to_host(dst: int, src: int, nbytes: int, stream: int) -> None:
    """Queue a copy of ``nbytes`` from device address ``src`` to host address ``dst`` on ``stream``
    (asynchronous where ``dst`` is pinned: done once the stream gets past it)."""
    _check(_driver().cuMemcpyDtoHAsync_v2(dst, src, nbytes, stream))


def copy_on_device(dst: int, src: int, nbytes: int, stream: int) -> None:
    """Queue a copy of ``nbytes`` from device address ``src`` to device address ``dst`` on ``stream``."""
    _check(_driver().cuMemcpyDtoDAsync_v2(dst, src, nbytes, stream))


def record(event: int, stream: int) -> None:
    """Record ``event`` (a cupy ``Event``'s ``ptr``) on ``stream``: it completes when the work queued
    there before it has."""
    _check(_driver().cuEventRecord(event, stream))


def done(event: int) -> bool:
    """Whether the work before ``event``'s last record has completed (without waiting)."""
    status = _driver().cuEventQuery(event)
    if status == _NOT_READY:
        return False
    _check(status)
    return True


def fill_zeros(dst: int, nbytes: int, stream: int) -> None:
    """Queue zeroing ``nbytes`` at device address ``dst`` on ``stream``."""
    _check(_driver().cuMemsetD8Async(dst, 0, nbytes, stream))


def kernel_handle(kernel: Any) -> int:
    """The driver's handle (CUfunction) of a cupy ``RawKernel``, compiled and loaded now."""
    return int(kernel.kernel.ptr)


def launch(function: int, grid: tuple[int, int], block: int, args: Sequence[Any], stream: int) -> None:
    """Queue the kernel ``function`` (``kernel_handle``) on ``stream``; ``args`` are device arrays
    (passed as their pointers) and numpy scalars of 32- or 64-bit types, as the kernel declares
    its parameters."""
    values = [ctypes.c_void_p(a.data.ptr) if isinstance(a, cp.ndarray) else _scalar(a) for a in args]
    params = (ctypes.c_void_p * len(values))(*map(ctypes.addressof, values))
    _check(_driver().cuLaunchKernel(function, grid[0], grid[1], 1, block, 1, 1, 0, stream, params, None))


def _scalar(value: Any) -> ctypes._SimpleCData:
    kind = _C_SCALARS.get(getattr(value, "dtype", None))
    if kind is None:
        raise TypeError(f"a kernel argument must be a device array or a numpy int32, int64, uint64 or float32 "
                        f"scalar, not {type(value).__name__}")
    return kind(value)
