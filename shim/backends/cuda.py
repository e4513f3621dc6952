"""The CUDA backend: cuBLAS (through cupy) for GEMM, onnxruntime's CUDA provider for models, and
classify's resize + normalisation as preloaded CuPy kernels (``shim/kernels/resample.cu``).

Device work runs on the thread that asks for it, on a device worker (``cuda_host.DeviceWorker``: a
CUDA stream, a cuBLAS handle on it, pinned host buffers through which inputs go up and results
come down): the thread's own (a batcher's, ``bind_thread``) or one of a few lent for the job, all
made and warmed at start: the first request pays for none of that, nor for a hand-over to
another thread.
``memory_limit`` caps cupy's memory pool: a request that cannot fit at all gets
InsufficientStorage (507); one that cannot fit *now*, because other requests hold the memory,
gets NotReady (503, retry). Sticky CUDA errors (the context is lost) raise DeviceLost
(``cuda_errors``). classify's GPU half is in ``cuda_imaging``; the host memory pinned for DMA
(clients' regions, request workers' link arenas) is ``cuda_host.PinnedRanges``.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, TypeVar

import cupy as cp
import numpy as np

from accel.errors import InsufficientStorage

from ..modelrepo import ModelConfig
from . import onnx
from .base import ImagePipeline, ModelRunner, TensorSpec
from .cpu import CpuImagePipeline
from .cuda_errors import device_errors
from .cuda_host import DeviceWorker, PinnedRanges
from .cuda_jpeg import JpegEngines, jpeg_engines
from .lending import Lender
from .reclaim import CaptureSafePool

log = logging.getLogger(__name__)

IMAGE_SLOT = 4                 # the pinned buffer that batches of images go up through
DEVICE_WORKERS = 8             # device workers lent to threads without one (at most this many jobs at once)
BORROW_TIMEOUT_S = 120.0       # a job that waits longer for a worker gets NotReady (503, retry)
T = TypeVar("T")


class MappedRunner:
    """A raw model on the CUDA provider whose runs' failures are mapped as every CUDA call's
    (``device_errors``: out of GPU memory a 503 to retry, a lost context ``DeviceLost``)."""

    def __init__(self, runner: onnx.OnnxRunner, pool: CaptureSafePool) -> None:
        self._runner, self._pool = runner, pool
        self.inputs: list[TensorSpec] = runner.inputs
        self.outputs: list[TensorSpec] = runner.outputs
        self.device: str = runner.device

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with device_errors(self._pool):
            return self._runner.run(feeds)


class CudaBackend:
    """Runs every op on one GPU."""

    name = "cuda"

    def __init__(self, threads: int = 0, device_id: int = 0, memory_limit: int | None = None,
                 graphs: bool = True, jpeg: bool = False) -> None:
        self.threads = threads
        self.device_id = device_id
        self.graphs = graphs
        self._jpeg_asked = jpeg
        self._jpeg: JpegEngines | None = None
        self._runners: weakref.WeakSet[onnx.OnnxRunner] = weakref.WeakSet()  # to seal once warm (``warmed``)
        self._sealed = False
        cp.cuda.Device(device_id).use()
        self.pool = cp.get_default_memory_pool()  # its cached blocks go back when the GPU runs out (``reclaim``)
        self.memory_limit = memory_limit
        if memory_limit:
            self.pool.set_limit(size=memory_limit)
        self.pinned = PinnedRanges(device_id)
        self.reclaim = CaptureSafePool(self.pool, self.pinned.capture_lock, lambda: self._sealed)  # ``device_errors``'
        self._local = threading.local()
        # Threads without a worker of their own (a request's) borrow one of these, warmed at start,
        # and run their device work themselves: no hand-over to a device thread and back.
        with ThreadPoolExecutor(DEVICE_WORKERS, thread_name_prefix="cuda-start") as starting:  # pinning in parallel
            self.workers = Lender(starting.map(lambda _: self._new_worker(), range(DEVICE_WORKERS)))

    # --- device workers: a stream, a cuBLAS handle and pinned buffers each --------------------
    def _new_worker(self) -> DeviceWorker:
        """A device worker with its cuBLAS handle, kernels and pinned buffers made (before any request)."""
        cp.cuda.Device(self.device_id).use()
        with device_errors():
            cp.empty(1, dtype=cp.float32)  # the CUDA context, now rather than on the first request
            worker = DeviceWorker(self.pinned)
            with worker.stream:
                for dtype in (np.float16, np.float32, np.float64):
                    x = np.ones((8, 8), dtype=dtype)
                    self._gemm_on(worker, x, x, x, 1.0, 1.0, "default")
        return worker

    def bind_thread(self) -> DeviceWorker:
        """Give the calling thread a worker of its own (stream, cuBLAS handle, pinned buffers):
        from now on its ``on_device`` jobs run on that worker, borrowing none. Returns it. Made while
        no CUDA graph is being captured (another batcher thread's, at its start: these allocations and
        the stream's first work would break it)."""
        cp.cuda.Device(self.device_id).use()
        with self.pinned.capture_lock, device_errors():
            worker = DeviceWorker(self.pinned)
            with worker.stream:  # its pinned buffer for batches of pixels, and a first copy and kernel, now
                worker.upload_concatenated([np.zeros(1 << 20, np.uint8)], IMAGE_SLOT).sum()
                worker.stream.synchronize()
            self._local.worker = worker
        return worker

    def unbind_thread(self) -> None:
        """The calling thread's own worker is dropped: its ``on_device`` jobs borrow one from now on."""
        self._local.worker = None

    def on_device(self, job: Callable[["DeviceWorker"], T]) -> T:
        """Run ``job(worker)`` on the calling thread, in a worker's stream: the thread's own (one
        ``bind_thread`` bound, or the one it has borrowed: a nested call runs in the same stream),
        else one borrowed for the job (waiting its turn while all are lent); raises what it raised.

        Raises:
            NotReady: every worker stayed lent for ``BORROW_TIMEOUT_S``.
        """
        worker: DeviceWorker | None = getattr(self._local, "worker", None)
        if worker is not None:
            return self._run_on(worker, job)
        try:
            worker = self.workers.borrow(BORROW_TIMEOUT_S)
            self._local.worker = worker
            cp.cuda.Device(self.device_id).use()
            return self._run_on(worker, job)
        finally:
            if worker is not None:
                self._local.worker = None
                self.workers.give_back(worker)

    @staticmethod
    def _run_on(worker: "DeviceWorker", job: Callable[["DeviceWorker"], T]) -> T:
        with worker.stream:
            try:
                return job(worker)
            except BaseException:
                # copies it queued may still read host memory that goes once this fails (a gone
                # worker's arena, a region unregistered): they end first
                with contextlib.suppress(Exception):
                    worker.stream.synchronize()
                raise

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
            with device_errors(self.reclaim):
                return self.on_device(lambda worker: self._gemm_on(worker, a, b, c, alpha, beta, precision, out))
        finally:
            self.pinned.pin_touched()  # regions this gemm used unpinned: their pin starts now, after it

    @staticmethod
    def _gemm_on(worker: "DeviceWorker", a: np.ndarray, b: np.ndarray, c: np.ndarray | None, alpha: float, beta: float,
                 precision: str, out: np.ndarray | None = None) -> np.ndarray:
        da, db = worker.upload(a, 0), worker.upload(b, 1)
        use_c = c is not None and beta != 0.0
        dc = worker.upload(c, 2) if use_c else cp.empty((a.shape[0], b.shape[1]), dtype=a.dtype)
        worker.gemm(da, db, dc, alpha, beta if use_c else 0.0, tf32=precision == "tf32")
        # the stream orders this download after the uploads: out may overlap the operands
        return worker.download(dc, 3, out)

    def load_model(self, path: Path, instances: int = 1) -> ModelRunner:
        """A raw model (``ModelOp``'s): ``runner``'s, its runs' failures mapped as every CUDA call's."""
        runner = self.runner(path, instances)
        return MappedRunner(runner, self.reclaim) if runner.device == "cuda" else runner

    def runner(self, path: Path, instances: int = 1) -> onnx.OnnxRunner:
        """A session on the CUDA provider, or the CPU provider (logged) when onnxruntime-gpu is absent;
        ``instances`` copies of each batch size's session, so that as many batches run side by side."""
        if not onnx.has_cuda_provider():
            log.warning("onnxruntime has no CUDA provider (install onnxruntime-gpu): %s runs on the CPU", path.parent.name)
            return onnx.OnnxRunner(path, ["CPUExecutionProvider"], self.threads)
        # use_tf32 0: FP32 convolutions and products in FP32, so that the model agrees with its CPU twin;
        # each session's arena grows by what it asks, not to the next power of two: with nine sessions
        # of each model, 8.8 GiB of the H200's memory held after warm-up instead of 9.9
        providers = [("CUDAExecutionProvider", {"device_id": self.device_id, "cudnn_conv_algo_search": "EXHAUSTIVE",
                                                "do_copy_in_default_stream": True, "use_tf32": 0,
                                                "arena_extend_strategy": "kSameAsRequested"}),
                     "CPUExecutionProvider"]
        with device_errors():
            # each batch size on a session of fixed shapes, replaying a CUDA graph (one launch for
            # the whole model: a batch of 1 runs in about a third of the time node by node takes)
            runner = onnx.OnnxRunner(path, providers, self.threads, self.device_id, fixed=True,
                                     graphs=self.graphs and not self._sealed, device_copy=copy_on_device,
                                     copies=instances, capture_lock=self.pinned.capture_lock)
        if runner.device != "cuda":
            log.warning("onnxruntime could not load its CUDA provider: %s runs on the CPU", path.parent.name)
            return onnx.OnnxRunner(path, ["CPUExecutionProvider"], self.threads)  # unpadded, one session
        self._runners.add(runner)
        return runner

    @property
    def sealed(self) -> bool:
        """Warmed up: no CUDA graph is captured any more (``warmed``)."""
        return self._sealed

    def warmed(self) -> None:
        self._sealed = True
        for runner in self._runners:
            runner.graphs = False  # the sizes captured at warm-up keep replaying theirs

    def register_host(self, address: int, nbytes: int, now: bool = False) -> None:
        self.pinned.register(address, nbytes)
        if now:
            self.pinned.wait(address)

    def unregister_host(self, address: int) -> None:
        self.pinned.unregister(address)

    def image_pipeline(self, config: ModelConfig) -> "ImagePipeline":
        runner = self.runner(config.onnx, config.instances())
        if runner.device != "cuda":
            if self._jpeg_asked:
                log.warning("--gpu-jpeg: %s runs on the CPU (no CUDA provider); its JPEGs are decoded there",
                            config.name)
            return CpuImagePipeline(runner, config)
        from .cuda_imaging import CudaImagePipeline  # noqa: PLC0415 - it imports this module

        if self._jpeg_asked and self._jpeg is None:
            self._jpeg_asked = False  # asked once: logged once either way
            self._jpeg = jpeg_engines(self.device_id)
        return CudaImagePipeline(self, runner, config, self._jpeg)

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
