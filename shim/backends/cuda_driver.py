"""The few CUDA calls of a batch's hot path (queued copies, plain and pitched, a memset, a kernel
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
import logging
from typing import Any, NamedTuple, Sequence

import cupy as cp
import numpy as np

log = logging.getLogger(__name__)

_MEMORY_DEVICE = 2  # CU_MEMORYTYPE_DEVICE


class _Memcpy2D(ctypes.Structure):
    """The driver's ``CUDA_MEMCPY2D`` (the host and array fields unused here)."""

    _fields_ = [("srcXInBytes", ctypes.c_size_t), ("srcY", ctypes.c_size_t), ("srcMemoryType", ctypes.c_int),
                ("srcHost", ctypes.c_void_p), ("srcDevice", ctypes.c_uint64), ("srcArray", ctypes.c_void_p),
                ("srcPitch", ctypes.c_size_t),
                ("dstXInBytes", ctypes.c_size_t), ("dstY", ctypes.c_size_t), ("dstMemoryType", ctypes.c_int),
                ("dstHost", ctypes.c_void_p), ("dstDevice", ctypes.c_uint64), ("dstArray", ctypes.c_void_p),
                ("dstPitch", ctypes.c_size_t),
                ("WidthInBytes", ctypes.c_size_t), ("Height", ctypes.c_size_t)]


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
    lib.cuMemcpy2DAsync_v2.argtypes = [ctypes.POINTER(_Memcpy2D), ptr]
    lib.cuLaunchKernel.argtypes = [ptr, uint, uint, uint, uint, uint, uint, uint, ptr, ptr, ptr]
    lib.cuEventRecord.argtypes = [ptr, ptr]
    lib.cuEventQuery.argtypes = [ptr]
    for name in ("cuMemcpyHtoDAsync_v2", "cuMemcpyDtoHAsync_v2", "cuMemcpyDtoDAsync_v2", "cuMemcpy2DAsync_v2",
                 "cuMemsetD8Async",
                 "cuLaunchKernel", "cuEventRecord", "cuEventQuery"):
        getattr(lib, name).restype = ctypes.c_int
    return lib


_NOT_READY = 600  # CUDA_ERROR_NOT_READY: cuEventQuery's "not yet"
_INVALID_VALUE = 1  # CUDA_ERROR_INVALID_VALUE


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


def copy_rows_on_device(dst: int, src: int, src_pitch: int, row_bytes: int, rows: int, stream: int) -> None:
    """Queue a copy of ``rows`` rows of ``row_bytes`` each, which start ``src_pitch`` bytes apart from
    device address ``src``, to device address ``dst``, end to end, on ``stream``."""
    copy = _Memcpy2D(srcMemoryType=_MEMORY_DEVICE, srcDevice=src, srcPitch=src_pitch, dstMemoryType=_MEMORY_DEVICE,
                     dstDevice=dst, dstPitch=row_bytes, WidthInBytes=row_bytes, Height=rows)
    _check(_driver().cuMemcpy2DAsync_v2(ctypes.byref(copy), stream))


class DeviceImage(NamedTuple):
    """A uint8 HWC image (``shape``: 3 sizes) in device memory, read by address: where it starts, its
    shape, the bytes from one row's start to the next (``pitch``: width x channels, or more where rows are padded),
    and what keeps the memory there (held as long as the record is). Cheaper than a cupy array,
    which a batch's images are only copied from (``copy_image``)."""

    ptr: int
    shape: tuple[int, ...]
    pitch: int
    keep: Any = None

    @classmethod
    def packed(cls, ptr: int, shape: tuple[int, ...], keep: Any = None) -> DeviceImage:
        """An image whose rows lie end to end (no padding) from ``ptr``."""
        return cls(ptr, shape, shape[1] * shape[2], keep)

    @property
    def row_bytes(self) -> int:
        return self.shape[1] * self.shape[2]

    @property
    def size(self) -> int:
        return self.shape[0] * self.row_bytes


def as_array(image: DeviceImage, device_id: int | None = None) -> cp.ndarray:
    """``image`` as a cupy array (strided where its rows are padded), which keeps what it keeps; on
    GPU ``device_id`` (None: the current one)."""
    device = cp.cuda.Device().id if device_id is None else device_id
    memory = cp.cuda.UnownedMemory(image.ptr, image.pitch * image.shape[0], image.keep, device)
    return cp.ndarray(image.shape, cp.uint8, cp.cuda.MemoryPointer(memory, 0),
                      strides=(image.pitch, image.shape[2], 1))


_pitches_refused = False  # the driver refused a pitched copy (status 1): cupy copies them from then on


class _StreamHandle:
    """A driver stream handle offered to cupy through the CUDA stream protocol (``__cuda_stream__``:
    version 0 and the address); cupy wraps it without taking ownership."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr

    def __cuda_stream__(self) -> tuple[int, int]:
        return 0, self.ptr


@functools.cache
def _cupy_stream(stream: int) -> cp.cuda.Stream:
    """``stream`` for cupy's kernels, made once per stream: through ``Stream.from_external`` (cupy
    14 deprecates ``ExternalStream``, which older releases need)."""
    from_external = getattr(cp.cuda.Stream, "from_external", None)
    return from_external(_StreamHandle(stream)) if from_external else cp.cuda.ExternalStream(stream)


def copy_image(dst: int, image: DeviceImage, stream: int) -> None:
    """Queue a copy of ``image`` to device address ``dst``, its rows end to end (without padding), on
    ``stream``: one plain copy where its rows are, else a pitched one; where the driver refuses
    the pitches (its documentation allows that, for pitches it did not allocate: logged once), a
    cupy copy kernel from then on."""
    global _pitches_refused
    if image.pitch == image.row_bytes:
        copy_on_device(dst, image.ptr, image.size, stream)
        return
    if not _pitches_refused:
        try:
            copy_rows_on_device(dst, image.ptr, image.pitch, image.row_bytes, image.shape[0], stream)
            return
        except cp.cuda.driver.CUDADriverError as exc:
            if exc.status != _INVALID_VALUE:
                raise
            _pitches_refused = True
            log.warning("the driver refused a pitched copy of %s rows of %d bytes %d apart (%s); images with "
                        "padded rows are copied by a cupy kernel from now on", image.shape[0], image.row_bytes,
                        image.pitch, exc)
    target = as_array(DeviceImage.packed(dst, image.shape))
    with _cupy_stream(stream):
        target[...] = as_array(image)


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
