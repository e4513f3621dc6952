"""Host memory on the CUDA backend's side: the ranges pinned for DMA (clients' shared-memory regions,
request workers' link arenas) and the device workers (a stream, a cuBLAS handle on it, pinned
staging buffers) that threads run their device work on."""
from __future__ import annotations

import logging
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Sequence

import cupy as cp
import numpy as np
from cupy_backends.cuda.libs import cublas

from accel.errors import AccelError

from . import cuda_driver
from .cuda_errors import device_errors

log = logging.getLogger(__name__)

PINNED_MAX_BYTES = 64 << 20    # larger operands go up from pageable memory: pinned memory stays bounded
PINNED_DOWNLOAD_MAX_BYTES = 16 << 20  # larger results come down into pageable memory directly
PINNED_MIN_BYTES = 16 << 20    # each pinned buffer starts this big (a 2048x2048 FP32 operand)
PINNED, REGISTERED = "pinned", "registered"  # where an operand lies (``PinnedRanges.where``)
# cudaDataType, cublasComputeType and the scalar type of alpha/beta, per numpy dtype char
_GEMM_TYPES = {"e": (2, 68, np.float32), "f": (0, 68, np.float32), "d": (1, 70, np.float64)}
_COMPUTE_32F_FAST_TF32 = 77
_GEMM_DEFAULT = -1


class PinnedRanges:
    """Host memory registered with CUDA (cudaHostRegister), e.g. shared-memory regions of clients:
    operands that lie inside go to the GPU by DMA straight from there, with no staging copy.

    Pinning takes milliseconds (about 4 ms for 12 MiB on an H200), and the process's other CUDA calls
    wait while it runs: pinned at registration, a region's first request (which follows at once)
    would wait for the pin. So ``register`` only notes the range; the first device job through it
    copies straight from and to its pageable pages (``where`` says REGISTERED, and notes the use),
    and ``pin_touched``, called after that job, starts the pin on a thread of its own; from its end
    on copies go by DMA. ``wait`` pins at once; ``unregister`` waits for a pin in flight (one not
    begun is dropped), so nothing stays pinned once its mapping goes.

    Pinning and unpinning hold ``capture_lock``, which a CUDA graph's capture holds too: onnxruntime
    captures in CUDA's global mode, where a pin on another thread fails and breaks the capture (the
    model would run node by node for the life of the process). Captures happen at warm-up only,
    when request workers connect and their arenas get pinned.
    """

    def __init__(self, device_id: int = 0, capture_lock: threading.Lock | None = None) -> None:
        self.capture_lock = capture_lock or threading.Lock()
        self._ranges: dict[int, int] = {}   # pinned
        self._known: dict[int, int] = {}    # registered, not pinned yet
        self._touched: set[int] = set()     # known ranges a device job used since the last pin_touched
        self._pending: dict[int, Future[None]] = {}
        self._lock = threading.Lock()
        self._pinner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cuda-pin",
                                          initializer=lambda: cp.cuda.Device(device_id).use())

    def register(self, address: int, nbytes: int) -> None:
        with self._lock:
            self._known[address] = nbytes

    def pin_touched(self) -> None:
        """Start pinning (in the background) the ranges that device jobs used unpinned."""
        with self._lock:
            touched, self._touched = self._touched, set()
            for address in touched:
                self._start(address)

    def _start(self, address: int) -> Future[None] | None:
        """The pin of ``address`` in flight, begun now if it was only known (call holding the lock)."""
        pending = self._pending.get(address)
        if pending is None and address in self._known:
            pending = self._pending[address] = self._pinner.submit(self._pin, address, self._known.pop(address))
        return pending

    def _pin(self, address: int, nbytes: int) -> None:
        pinned = False
        try:
            with self.capture_lock, device_errors():
                cp.cuda.runtime.hostRegister(address, nbytes, 0)
            pinned = True
        except AccelError as exc:  # a lost device fails the next request that touches it
            log.warning("could not pin %d bytes at %#x for DMA (%s): copies from there stay pageable",
                        nbytes, address, exc.message)
        finally:  # whatever happened, the pin is no longer in flight
            with self._lock:
                self._pending.pop(address, None)
                if pinned:
                    self._ranges[address] = nbytes

    def wait(self, address: int) -> None:
        """Until ``address``'s range is pinned (its pin begun now if need be), or given up."""
        with self._lock:
            pending = self._start(address)
        if pending is not None:
            pending.result()

    def unregister(self, address: int) -> None:
        with self._lock:
            self._known.pop(address, None)
            self._touched.discard(address)
            pending = self._pending.get(address)
        if pending is not None and pending.cancel():  # not begun: nothing to undo
            with self._lock:
                self._pending.pop(address, None)
        elif pending is not None:
            pending.result()
        with self._lock:
            known = self._ranges.pop(address, None)
        if known is not None:
            with self.capture_lock, device_errors():
                cp.cuda.runtime.hostUnregister(address)

    def __len__(self) -> int:
        """Ranges registered: pinned, being pinned, or not yet."""
        with self._lock:
            return len(self._ranges) + len(self._pending) + len(self._known)

    def where(self, array: np.ndarray, note: bool = True) -> str | None:
        """``PINNED`` when ``array`` lies in a pinned range, ``REGISTERED`` when in one not pinned yet
        (with ``note``, the use is noted, for ``pin_touched``), else None."""
        span = _span(array)
        if span is None:
            return None
        with self._lock:
            if _holding(self._ranges, span) is not None:
                return PINNED
            touched = {base for base, size in self._known.items() if _holds(base, size, span)}
            if note:
                self._touched |= touched
            return REGISTERED if touched else None

    def contains(self, array: np.ndarray) -> bool:
        """Whether ``array`` lies in a pinned range (a look only: no use is noted)."""
        return self.where(array, note=False) == PINNED

    def pinned_range_of_each(self, arrays: Sequence[np.ndarray]) -> list[int | None]:
        """For each of ``arrays``, the start of the pinned range it lies in (None: none), under one
        look at the ranges."""
        spans = [_span(a) for a in arrays]
        with self._lock:
            ranges = dict(self._ranges)
        return [_holding(ranges, span) if span is not None else None for span in spans]


def _span(array: np.ndarray) -> tuple[int, int] | None:
    """Where ``array``'s bytes lie, (start, end), or None when they are not one contiguous run."""
    if not array.flags.c_contiguous:
        return None
    start = array.__array_interface__["data"][0]
    return start, start + array.nbytes


def _holds(base: int, size: int, span: tuple[int, int]) -> bool:
    """Whether the range of ``size`` bytes at ``base`` holds all of ``span``."""
    return base <= span[0] and span[1] <= base + size


def _holding(ranges: dict[int, int], span: tuple[int, int]) -> int | None:
    """The start of the range of ``ranges`` (start -> bytes) that holds all of ``span``, or None."""
    return next((base for base, size in ranges.items() if _holds(base, size, span)), None)


class DeviceWorker:
    """A CUDA stream, a cuBLAS handle bound to it, and pinned host buffers (reused, grown on demand).

    One request uses a worker at a time, so its pinned buffers are never shared. The cuBLAS handle
    (with its device workspace) is made by the first gemm, so threads that never multiply (a
    batcher's) hold none, and destroyed by ``close()`` or when the worker is collected (its thread
    ended): a batcher closed and made again (a model reloaded) leaks no handles.
    """

    def __init__(self, pinned: PinnedRanges) -> None:
        self.pinned = pinned
        self.stream = cp.cuda.Stream(non_blocking=True)
        self._handle: list[tuple[int, int]] = []  # (device, cuBLAS handle) once made; the finalizer shares it
        self._release = weakref.finalize(self, _destroy_handle, self._handle)
        self._release.atexit = False  # at exit the process's CUDA state goes as a whole
        self._pinned: dict[int, tuple[Any, int]] = {}  # slot -> (pinned memory, its size)

    @property
    def handle(self) -> int:
        """This worker's cuBLAS handle, bound to its stream (made on first use)."""
        if not self._handle:
            handle = cublas.create()
            try:
                cublas.setStream(handle, self.stream.ptr)
                cublas.setPointerMode(handle, getattr(cublas, "CUBLAS_POINTER_MODE_HOST", 0))
            except BaseException:
                cublas.destroy(handle)
                raise
            self._handle.append((cp.cuda.Device().id, handle))
        return self._handle[0][1]

    def close(self) -> None:
        """Destroy the cuBLAS handle now (a later gemm makes another)."""
        _destroy_handle(self._handle)

    def gemm(self, a: cp.ndarray, b: cp.ndarray, out: cp.ndarray, alpha: float, beta: float, tf32: bool) -> None:
        """``out = alpha * a @ b + beta * out`` (C order) with cublasGemmEx, accumulating in FP32
        for FP16 and FP32 (TF32 tensor cores with ``tf32``) and in FP64 for FP64.

        cuBLAS is column-major: a row-major ``C = A @ B`` is the column-major ``C^T = B^T @ A^T``.
        """
        data_type, compute, scalar = _GEMM_TYPES[a.dtype.char]
        if tf32 and a.dtype == cp.float32:
            compute = _COMPUTE_32F_FAST_TF32
        m, k = a.shape
        n = b.shape[1]
        one, zero = np.array([alpha], scalar), np.array([beta], scalar)
        cublas.gemmEx(self.handle, 0, 0, n, m, k, one.ctypes.data, b.data.ptr, data_type, n, a.data.ptr,
                      data_type, k, zero.ctypes.data, out.data.ptr, data_type, n, compute, _GEMM_DEFAULT)

    def _pinned_view(self, slot: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        count = int(np.prod(shape))
        nbytes = count * dtype.itemsize
        mem, size = self._pinned.get(slot, (None, 0))
        if mem is None or size < nbytes:
            size = max(nbytes, PINNED_MIN_BYTES)
            mem = cp.cuda.alloc_pinned_memory(size)
            self._pinned[slot] = (mem, size)
        return np.frombuffer(mem, dtype, count).reshape(shape)

    def upload(self, host: np.ndarray, slot: int) -> cp.ndarray:
        """``host`` on the device: straight from where it lies when that is registered memory (by DMA
        once pinned; before, a region's first use, from its pageable pages: 0.8 ms for 4 MiB on an
        H200 host, against 1.0 through the staging buffer) or when very large; else copied through
        this worker's pinned buffer ``slot``."""
        if self.pinned.where(host) is not None or host.nbytes > PINNED_MAX_BYTES:  # where() first: it notes
            device = cp.empty(host.shape, host.dtype)
            device.set(host, stream=self.stream)  # the caller synchronizes before host may change
            return device
        staged = self._pinned_view(slot, host.shape, host.dtype)
        np.copyto(staged, host)
        device = cp.empty(host.shape, host.dtype)
        device.set(staged, stream=self.stream)
        return device

    def upload_concatenated(self, parts: Sequence[np.ndarray], slot: int,
                            before_staging: Callable[[], None] | None = None) -> cp.ndarray:
        """The 1-D ``parts`` (one dtype) end to end on the device. Parts that lie in pinned memory (a
        request worker's link arena) go up by DMA from there; the others are copied into pinned buffer
        ``slot`` first (``before_staging`` called once before: a caller with uploads still queued
        waits there for the slot). Each run of parts that lie end to end in one pinned range (a
        worker's images, lent one after another), or in the staging buffer, goes up as one transfer,
        queued by a bare driver call (``cuda_driver``). The caller synchronizes the stream before
        ``parts`` or the slot may change.

        Raises:
            ValueError: the parts are not of one dtype.
        """
        dtype = parts[0].dtype
        if any(p.dtype != dtype for p in parts):
            raise ValueError(f"parts of one dtype only, got {sorted({str(p.dtype) for p in parts})}")
        total = sum(p.size for p in parts)
        if total * dtype.itemsize > PINNED_MAX_BYTES:
            return cp.asarray(np.concatenate(parts))
        device = cp.empty(total, dtype)
        ranges = self.pinned.pinned_range_of_each(parts)
        staged = None
        runs: list[list[int]] = []  # [offset on the device, host address, bytes, the range: base or -1 staged]
        offset = 0
        for part, base in zip(parts, ranges):
            nbytes = part.nbytes
            if not nbytes:
                continue
            if base is not None:
                source = part.ctypes.data
            else:
                if staged is None:
                    if before_staging is not None:
                        before_staging()
                    staged = self._pinned_view(slot, (total,), dtype)
                start = offset // dtype.itemsize
                staged[start:start + part.size] = part.reshape(-1)
                source, base = staged.ctypes.data + offset, -1
            last = runs[-1] if runs else None
            if last is not None and last[3] == base and last[1] + last[2] == source and last[0] + last[2] == offset:
                last[2] += nbytes
            else:
                runs.append([offset, source, nbytes, base])
            offset += nbytes
        for at, source, nbytes, _ in runs:  # keeping the interpreter lock: see ``cuda_driver``
            cuda_driver.copy_to_device(device.data.ptr + at, source, nbytes, self.stream.ptr)
        return device

    def download(self, device: cp.ndarray, slot: int, out: np.ndarray | None = None) -> np.ndarray:
        """``device`` on the host, in ``out`` (C-contiguous, its shape and dtype) or else a fresh
        array; synchronizes. Into registered memory (a client's region) straight there (by DMA once
        pinned); small results elsewhere through pinned buffer ``slot``.

        Large results go straight to pageable memory: there, DMA into pinned memory plus a copy
        out of it costs more than the slower pageable transfer alone (4 MiB into a region not pinned
        yet: 0.5 ms against 0.86 on an H200 host)."""
        registered = out is not None and self.pinned.where(out) is not None  # first: it notes the use
        if registered or device.nbytes > PINNED_DOWNLOAD_MAX_BYTES:
            host = device.get(stream=self.stream, out=out)
            self.stream.synchronize()
            return host
        staged = self._pinned_view(slot, device.shape, device.dtype)
        device.get(stream=self.stream, out=staged)
        self.stream.synchronize()
        if out is None:
            return staged.copy()
        np.copyto(out, staged)
        return out


def _destroy_handle(handle: list[tuple[int, int]]) -> None:
    """Destroy the cuBLAS handle in ``handle`` (if any) on its device; a failure is logged, never
    raised (this runs from the collector, on whichever thread)."""
    while handle:
        device, made = handle.pop()
        try:
            with cp.cuda.Device(device):
                cublas.destroy(made)
        except Exception:  # noqa: BLE001 - a finalizer must not raise
            log.warning("could not destroy a cuBLAS handle", exc_info=True)
