"""The CUDA backend: cuBLAS (through cupy) for GEMM, onnxruntime's CUDA provider for models, and
classify's resize + normalisation as preloaded CuPy kernels (``shim/kernels/resample.cu``).

Device work runs on a few device threads, each with its own worker (a CUDA stream, a cuBLAS
handle on it, pinned host buffers through which inputs go up and results come down), all made
and warmed at start: the first request pays for none of that. ``memory_limit`` caps cupy's
memory pool: a request that cannot fit at all gets InsufficientStorage (507); one that cannot
fit *now*, because other requests hold the memory, gets NotReady (503, retry). Sticky CUDA
errors (the context is lost) raise DeviceLost. classify's GPU half is in ``cuda_imaging``.
"""
from __future__ import annotations

import logging
import re
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import cupy as cp
import numpy as np

from accel.errors import AccelError, InsufficientStorage, InternalError, NotReady

from ..faults import DeviceLost
from ..modelrepo import ModelConfig
from . import onnx
from .base import ImagePipeline
from .cpu import CpuImagePipeline

log = logging.getLogger(__name__)

#: CUDA errors after which the context is unusable (illegal address, device assert, launch
#: failure, ECC, ...): the process must restart.
STICKY_CUDA_ERRORS = {214, 700, 702, 709, 710, 714, 715, 716, 717, 718, 719}
PINNED_MAX_BYTES = 64 << 20    # larger operands go up from pageable memory: pinned memory stays bounded
PINNED_DOWNLOAD_MAX_BYTES = 16 << 20  # larger results come down into pageable memory directly
PINNED_MIN_BYTES = 16 << 20    # each pinned buffer starts this big (a 2048x2048 FP32 operand)
IMAGE_SLOT = 4                 # the pinned buffer that batches of images go up through
DEVICE_THREADS = 8             # threads that do the device work, each with its own stream
# cudaDataType, cublasComputeType and the scalar type of alpha/beta, per numpy dtype char
_GEMM_TYPES = {"e": (2, 68, np.float32), "f": (0, 68, np.float32), "d": (1, 70, np.float64)}
_COMPUTE_32F_FAST_TF32 = 77
_GEMM_DEFAULT = -1
_ORT_CUDA_ERROR = re.compile(r"CUDA (?:failure|error) (\d+)")
T = TypeVar("T")


class CudaBackend:
    """Runs every op on one GPU."""

    name = "cuda"

    def __init__(self, threads: int = 0, device_id: int = 0, memory_limit: int | None = None,
                 graphs: bool = True) -> None:
        self.threads = threads
        self.device_id = device_id
        self.graphs = graphs
        self._runners: weakref.WeakSet[onnx.OnnxRunner] = weakref.WeakSet()  # to seal once warm (``warmed``)
        self._sealed = False
        cp.cuda.Device(device_id).use()
        self._pool = cp.get_default_memory_pool()
        self.memory_limit = memory_limit
        if memory_limit:
            self._pool.set_limit(size=memory_limit)
        self.pinned = PinnedRanges(device_id)
        self._local = threading.local()
        # Device work runs on these threads, each with its own warmed worker: request threads hand
        # jobs over (tens of microseconds) instead of paying CUDA's per-thread set-up on first use.
        self._executor = ThreadPoolExecutor(max_workers=DEVICE_THREADS, thread_name_prefix="cuda")
        barrier = threading.Barrier(DEVICE_THREADS)
        for started in [self._executor.submit(self._start_thread, barrier) for _ in range(DEVICE_THREADS)]:
            started.result()

    # --- device threads: a stream, a cuBLAS handle and pinned buffers each --------------------
    def _start_thread(self, barrier: threading.Barrier) -> None:
        cp.cuda.Device(self.device_id).use()
        with device_errors():
            cp.empty(1, dtype=cp.float32)  # the CUDA context, now rather than on the first request
            worker = self._local.worker = _Worker(self.pinned)
            with worker.stream:  # cuBLAS, kernels and pinned buffers, before the first request
                for dtype in (np.float16, np.float32, np.float64):
                    x = np.ones((8, 8), dtype=dtype)
                    self._gemm_on(worker, x, x, x, 1.0, 1.0, "default")
        barrier.wait(timeout=120)  # one start per thread

    def bind_thread(self) -> None:
        """Give the calling thread a worker of its own (stream, cuBLAS handle, pinned buffers):
        from now on its ``on_device`` jobs run where they are called, with no hand-over."""
        cp.cuda.Device(self.device_id).use()
        with device_errors():
            worker = _Worker(self.pinned)
            with worker.stream:  # its pinned buffer for batches of pixels, and a first copy and kernel, now
                worker.upload_concatenated([np.zeros(1 << 20, np.uint8)], IMAGE_SLOT).sum()
                worker.stream.synchronize()
            self._local.worker = worker

    def on_device(self, job: Callable[["_Worker"], T]) -> T:
        """Run ``job(worker)`` in a worker's stream: the calling thread's own (a device thread's, or
        one ``bind_thread`` bound), else on a device thread; raises what it raised."""
        def run() -> T:
            worker: _Worker = self._local.worker
            with worker.stream:
                return job(worker)

        if getattr(self._local, "worker", None) is not None:
            return run()
        return self._executor.submit(run).result()

    def _check_fits(self, nbytes: int, what: str) -> None:
        if self.memory_limit and nbytes > self.memory_limit:
            raise InsufficientStorage(f"{what} needs {nbytes / 2**20:.1f} MiB of GPU memory, over the shim's "
                                      f"limit of {self.memory_limit / 2**20:.1f} MiB (--gpu-memory-limit)")

    # --- ops ---------------------------------------------------------------------------------
    def gemm(self, a: np.ndarray, b: np.ndarray, c: np.ndarray | None, alpha: float, beta: float,
             precision: str = "default", *, out: np.ndarray | None = None) -> np.ndarray:
        m, n = a.shape[0], b.shape[1]
        self._check_fits(a.nbytes + b.nbytes + m * n * a.itemsize,
                         f"gemm of {m}x{a.shape[1]} by {b.shape[0]}x{n} {a.dtype.name}")
        try:
            with device_errors(self._pool):
                return self.on_device(lambda worker: self._gemm_on(worker, a, b, c, alpha, beta, precision, out))
        finally:
            self.pinned.pin_touched()  # regions this gemm used unpinned: their pin starts now, after it

    @staticmethod
    def _gemm_on(worker: "_Worker", a: np.ndarray, b: np.ndarray, c: np.ndarray | None, alpha: float, beta: float,
                 precision: str, out: np.ndarray | None = None) -> np.ndarray:
        da, db = worker.upload(a, 0), worker.upload(b, 1)
        use_c = c is not None and beta != 0.0
        dc = worker.upload(c, 2) if use_c else cp.empty((a.shape[0], b.shape[1]), dtype=a.dtype)
        worker.gemm(da, db, dc, alpha, beta if use_c else 0.0, tf32=precision == "tf32")
        # the stream orders this download after the uploads: out may overlap the operands
        return worker.download(dc, 3, out)

    def load_model(self, path: Path) -> onnx.OnnxRunner:
        """A session on the CUDA provider, or the CPU provider (logged) when onnxruntime-gpu is absent."""
        if not onnx.has_cuda_provider():
            log.warning("onnxruntime has no CUDA provider (install onnxruntime-gpu): %s runs on the CPU", path.parent.name)
            return onnx.OnnxRunner(path, ["CPUExecutionProvider"], self.threads)
        # use_tf32 0: FP32 convolutions and products in FP32, so that the model agrees with its CPU twin
        providers = [("CUDAExecutionProvider", {"device_id": self.device_id, "cudnn_conv_algo_search": "EXHAUSTIVE",
                                                "do_copy_in_default_stream": True, "use_tf32": 0}),
                     "CPUExecutionProvider"]
        with device_errors():
            # each batch size on a session of fixed shapes, replaying a CUDA graph (one launch for
            # the whole model: a batch of 1 runs in about a third of the time node by node takes)
            runner = onnx.OnnxRunner(path, providers, self.threads, self.device_id, fixed=True,
                                     graphs=self.graphs and not self._sealed, device_copy=copy_on_device)
        if runner.device != "cuda":
            log.warning("onnxruntime could not load its CUDA provider: %s runs on the CPU", path.parent.name)
            return onnx.OnnxRunner(path, ["CPUExecutionProvider"], self.threads)  # unpadded, one session
        self._runners.add(runner)
        return runner

    def warmed(self) -> None:
        self._sealed = True
        for runner in self._runners:
            runner.graphs = False  # the sizes captured at warm-up keep replaying theirs

    def register_host(self, address: int, nbytes: int) -> None:
        self.pinned.register(address, nbytes)

    def unregister_host(self, address: int) -> None:
        self.pinned.unregister(address)

    def image_pipeline(self, config: ModelConfig) -> "ImagePipeline":
        runner = self.load_model(config.onnx)
        if runner.device != "cuda":
            return CpuImagePipeline(runner, config)
        from .cuda_imaging import CudaImagePipeline  # noqa: PLC0415 - it imports this module

        return CudaImagePipeline(self, runner, config)

    def describe(self) -> dict[str, object]:
        props = cp.cuda.runtime.getDeviceProperties(self.device_id)
        return {"backend": self.name, "device": props["name"].decode(), "device_id": self.device_id,
                "memory_total_mib": props["totalGlobalMem"] // 2**20,
                "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(),
                "cuda_driver": cp.cuda.runtime.driverGetVersion(), "cupy": cp.__version__,
                "onnxruntime": onnx.version(), "memory_limit": self.memory_limit, "cuda_graphs": self.graphs}


_copy_streams = threading.local()


def copy_on_device(dst: int, src: int, nbytes: int) -> None:
    """Copy ``nbytes`` between two device addresses on a stream of the calling thread; done on return."""
    stream = getattr(_copy_streams, "stream", None)
    if stream is None:
        stream = _copy_streams.stream = cp.cuda.Stream(non_blocking=True)
    cp.cuda.runtime.memcpyAsync(dst, src, nbytes, cp.cuda.runtime.memcpyDeviceToDevice, stream.ptr)
    stream.synchronize()


class PinnedRanges:
    """Host memory registered with CUDA (cudaHostRegister), e.g. shared-memory regions of clients:
    operands that lie inside go to the GPU by DMA straight from there, with no staging copy.

    Pinning takes milliseconds (about 4 ms for 12 MiB on an H200), and the process's other CUDA calls
    wait while it runs: pinned at registration, a region's first request (which follows at once)
    would wait for the pin. So ``register`` only notes the range; the first device job through it
    copies staged (``contains`` says no, and notes the use), and ``pin_touched``, called after that
    job, starts the pin on a thread of its own; from its end on copies go by DMA. ``wait`` pins at
    once; ``unregister`` waits for a pin in flight (one not begun is dropped), so nothing stays pinned
    once its mapping goes.
    """

    def __init__(self, device_id: int = 0) -> None:
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
        try:
            with device_errors():
                cp.cuda.runtime.hostRegister(address, nbytes, 0)
        except AccelError as exc:  # a lost device fails the next request that touches it
            log.warning("could not pin %d bytes at %#x for DMA (%s): copies from there are staged",
                        nbytes, address, exc.message)
            with self._lock:
                self._pending.pop(address, None)
            return
        with self._lock:
            self._pending.pop(address, None)
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
            with device_errors():
                cp.cuda.runtime.hostUnregister(address)

    def __len__(self) -> int:
        """Ranges registered: pinned, being pinned, or not yet."""
        with self._lock:
            return len(self._ranges) + len(self._pending) + len(self._known)

    def contains(self, array: np.ndarray) -> bool:
        """Whether ``array`` lies in a pinned range (if it lies in one not pinned yet, that use is noted)."""
        if not array.flags.c_contiguous:
            return False
        start = array.__array_interface__["data"][0]
        end = start + array.nbytes
        with self._lock:
            if any(base <= start and end <= base + size for base, size in self._ranges.items()):
                return True
            self._touched.update(base for base, size in self._known.items() if base <= start and end <= base + size)
            return False


class _Worker:
    """A CUDA stream, a cuBLAS handle bound to it, and pinned host buffers (reused, grown on demand).

    One request uses a worker at a time, so its pinned buffers are never shared.
    """

    def __init__(self, pinned: PinnedRanges) -> None:
        from cupy_backends.cuda.libs import cublas  # noqa: PLC0415

        self.pinned = pinned
        self.stream = cp.cuda.Stream(non_blocking=True)
        self._cublas = cublas
        self.handle = cublas.create()
        cublas.setStream(self.handle, self.stream.ptr)
        cublas.setPointerMode(self.handle, getattr(cublas, "CUBLAS_POINTER_MODE_HOST", 0))
        self._pinned: dict[int, tuple[Any, int]] = {}  # slot -> (pinned memory, its size)

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
        self._cublas.gemmEx(self.handle, 0, 0, n, m, k, one.ctypes.data, b.data.ptr, data_type, n, a.data.ptr,
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
        """``host`` on the device: by DMA when it is registered memory, else copied through this
        worker's pinned buffer ``slot`` (or from pageable memory when very large)."""
        if self.pinned.contains(host):
            device = cp.empty(host.shape, host.dtype)
            device.set(host, stream=self.stream)  # the caller synchronizes before host may change
            return device
        if host.nbytes > PINNED_MAX_BYTES:
            return cp.asarray(host)
        staged = self._pinned_view(slot, host.shape, host.dtype)
        np.copyto(staged, host)
        device = cp.empty(host.shape, host.dtype)
        device.set(staged, stream=self.stream)
        return device

    def upload_concatenated(self, parts: Sequence[np.ndarray], slot: int) -> cp.ndarray:
        """The 1-D ``parts`` (one dtype) end to end on the device: one copy into pinned buffer
        ``slot``, one transfer. The caller synchronizes the stream before reusing the slot."""
        total = sum(p.size for p in parts)
        if total * parts[0].itemsize > PINNED_MAX_BYTES:
            return cp.asarray(np.concatenate(parts))
        staged = self._pinned_view(slot, (total,), parts[0].dtype)
        offset = 0
        for part in parts:
            staged[offset:offset + part.size] = part
            offset += part.size
        device = cp.empty(total, parts[0].dtype)
        device.set(staged, stream=self.stream)
        return device

    def download(self, device: cp.ndarray, slot: int, out: np.ndarray | None = None) -> np.ndarray:
        """``device`` on the host, in ``out`` (C-contiguous, its shape and dtype) or else a fresh
        array; synchronizes. Into registered memory (a client's region) by DMA, straight there;
        small results through pinned buffer ``slot``.

        Large results go straight to pageable memory: there, DMA into pinned memory plus a copy
        out of it costs more than the slower pageable transfer alone."""
        if device.nbytes > PINNED_DOWNLOAD_MAX_BYTES or (out is not None and self.pinned.contains(out)):
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


@contextmanager
def device_errors(pool: Any = None) -> Iterator[None]:
    """Map CUDA, cuBLAS and onnxruntime failures to the shim's errors (sticky ones: DeviceLost)."""
    try:
        yield
    except AccelError:
        raise
    except cp.cuda.memory.OutOfMemoryError as exc:
        if pool is not None:
            pool.free_all_blocks()
        raise NotReady(f"GPU memory is held by other requests right now ({exc}); retry", retry_after=0.1) from exc
    except cp.cuda.runtime.CUDARuntimeError as exc:
        if exc.status in STICKY_CUDA_ERRORS:
            raise DeviceLost(f"CUDA error {exc.status}: {exc}") from exc
        raise InternalError(f"CUDA error {exc.status}: {exc}") from exc
    except Exception as exc:  # cuBLAS, NVRTC, onnxruntime: classified by their message
        match = _ORT_CUDA_ERROR.search(str(exc))
        if match and int(match.group(1)) in STICKY_CUDA_ERRORS:
            raise DeviceLost(f"CUDA error {match.group(1)} in {type(exc).__name__}: {exc}") from exc
        if type(exc).__module__.startswith(("cupy", "onnxruntime")):
            raise InternalError(f"{type(exc).__name__}: {exc}") from exc
        raise
