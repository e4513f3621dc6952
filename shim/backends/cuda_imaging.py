"""classify's device half on the GPU: decoded RGB pixels up (or, with ``--gpu-jpeg``, plain JPEGs
decoded there by the JPEG engines), Pillow's resize + normalisation there (``cuda_resize``), the batch
straight into the model. A batcher's batches (pixels, or JPEGs for the engines) are queued on its
stream one behind the other (``logits_later``, ``cuda_landing``)."""
from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
import weakref
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Callable, Sequence

import cupy as cp
import numpy as np

from ..padding import padded_sizes
from ..faults import DeviceLost
from ..kernels.resample import Picture, rgb_pixels
from ..modelrepo import ModelConfig
from . import cuda_driver, onnx
from .base import PlainJpeg, UndecodedImages
from .cuda import IMAGE_SLOT
from .cuda_errors import device_errors
from .cuda_landing import Landing
from .cuda_resize import CudaResizer

if TYPE_CHECKING:
    from .cuda import CudaBackend
    from .cuda_host import DeviceWorker
    from .cuda_jpeg import JpegEngines

log = logging.getLogger(__name__)


class CudaImagePipeline:
    """Decoded RGB pixels up to the GPU, Pillow's resize + normalisation there (bit-exact with the
    CPU twin), and the batch straight into the model through I/O binding. With ``jpeg`` (the JPEG
    engines), items may be ``PlainJpeg``s, decoded there as one batch (``decodes_jpeg``).

    A bound thread (a batcher's) may queue its batches (``logits_later``) up to ``in_flight`` at
    once: the GPU runs one while the thread gathers and queues the next. A model's instance_count
    gives its batcher that many bound threads, each with its stream, JPEG decoder, sessions and
    landing slots, taking turns (on the H200 two were slower than one: ``Batcher``).
    """

    in_flight = 2  # batches a bound thread may have queued on its stream at once (its landing's slots)
    lands_apart = True  # ``logits_later``'s Futures are set on a landing thread that waits for nothing else

    def __init__(self, backend: CudaBackend, runner: onnx.OnnxRunner, config: ModelConfig,
                 jpeg: JpegEngines | None = None) -> None:
        assert config.preprocessing is not None
        self.device = "cuda"
        self.decodes_jpeg = jpeg is not None
        self._jpeg = jpeg
        self.runner = runner
        self._backend = backend
        self._pre = config.preprocessing
        self._name = config.name
        self._step = max(1, config.max_batch_size)
        self._input = runner.inputs[0].name
        self._lock = threading.Lock()  # ``_landings``'
        self.resizer = CudaResizer(self._pre)  # the batches' resize + normalisation
        self._local = threading.local()  # ``landing``: a bound thread's, where its batches may be queued
        self._landings: weakref.WeakSet[Landing] = weakref.WeakSet()  # every bound thread's (under ``_lock``)

    def prepare(self, image: Picture) -> np.ndarray:
        return rgb_pixels(image)

    def bind_thread(self) -> None:
        """The calling thread (a batcher's) gets a device worker and the model's sessions of every
        batch size it may run, its own (built and captured on it, now), on the worker's stream: a
        batch's upload, resize and model follow one another there, with no wait on the host. Where
        that fails, the thread runs the shared sessions (logged), on a new worker: a failed capture
        may have left the first one's stream capturing."""
        worker = self._backend.bind_thread()
        stream = worker.stream
        if self._jpeg is not None:
            try:
                with self._backend.pinned.capture_lock:  # its buffers and streams: not while a graph is captured
                    self._jpeg.decoder(worker)
            except RuntimeError as exc:  # its batches' JPEGs are decoded on the CPU
                log.warning("%s: a batcher thread has no JPEG decoder (%s)", self._name, exc)
        try:
            with device_errors():
                self.runner.bind_thread(padded_sizes(self._step), onnx.ComputeStream(stream.ptr, stream.synchronize))
        except DeviceLost:
            raise
        except Exception as exc:  # noqa: BLE001 - onnxruntime's run raises plain RuntimeErrors; the thread still serves
            log.warning("%s: a batcher thread could not build the model's sessions on its stream (%s: %s); it runs "
                        "the shared ones", self._name, type(exc).__name__, onnx.first_line(exc))
            decoder = getattr(worker, "_jpeg_decoder", None)
            if decoder:  # its states freed now, under the lock, not wherever the worker goes
                with self._backend.pinned.capture_lock, contextlib.suppress(Exception):
                    decoder.close()
                worker._jpeg_decoder = False  # type: ignore[attr-defined]
            self._backend.unbind_thread()  # a borrowed worker, should a new one fail too
            self._backend.bind_thread()
            return
        logits = self.runner.outputs[0]
        classes = logits.shape[1:] if logits.shape else (-1,)
        # else every batch runs in ``logits``: a landing slot holds FP32 logits of fixed shape
        if self.runner.fixed and logits.datatype == "FP32" and all(d >= 0 for d in classes):
            with self._backend.pinned.capture_lock, device_errors():  # pinned memory: not while a graph is captured
                nbytes = onnx.padded_batch(self._step) * int(np.prod(classes)) * 4
                self._local.landing = Landing(self.in_flight, nbytes, lambda: device_errors(self._backend.reclaim),
                                              self._name, self._freeing)
            with self._lock:
                self._landings.add(self._local.landing)

    def logits_later(self, items: Sequence[np.ndarray | PlainJpeg]) -> Future[np.ndarray]:
        """``logits`` without waiting for the GPU, on a bound thread (a batcher's): the batch's upload,
        resize, model run and the logits' download are queued on its stream, behind the batch
        before, and the Future is set on the landing's thread once they are done. Where that cannot
        be (a thread not bound, more rows than a session takes), ``logits`` runs here and the Future
        comes done. JPEGs (``PlainJpeg``) are decoded by the engines on the same stream, queued too:
        which ones the engines could not decode is known before the model's run is queued.

        Raises:
            UndecodedImages: as ``logits`` (nothing queued for the batch), and its errors.
        """
        began = time.perf_counter()
        landing: Landing | None = getattr(self._local, "landing", None)
        if landing is not None and len(items) <= self._step:
            with device_errors(self._backend.reclaim):
                queued = self._backend.on_device(lambda state: self._queue(state, landing, items, began))
            if queued is not None:
                return queued
        if landing is not None:  # batches queued before may still be going up from the staging buffer
            with device_errors(self._backend.reclaim):
                landing.staging_free()
        done: Future[np.ndarray] = Future()
        done.set_result(self.logits(items))
        return done

    def busy_until(self) -> float | None:
        """On a bound thread, until when (``perf_counter``) the GPU stays busy with the batches
        queued before: the latest ``Landing.busy_until`` of every bound thread's (their streams
        share the GPU: a batch gathered on one while another's are queued waits for those too);
        else None."""
        if getattr(self._local, "landing", None) is None:
            return None
        with self._lock:
            landings = list(self._landings)
        return max(landing.busy_until() for landing in landings)

    def _queue(self, state: DeviceWorker, landing: Landing, items: Sequence[np.ndarray | PlainJpeg],
               began: float) -> Future[np.ndarray] | None:
        """``items``' upload (their JPEGs' decode), resize, model run and logits' download queued on
        ``state``'s stream, into the bound session's own input (from ``began``); None (nothing
        queued) where the session is not on that stream.

        Raises:
            UndecodedImages: JPEGs the engines did not decode (the stream waited for: nothing queued
                still reads what goes with the batch).
        """
        rows = onnx.padded_batch(len(items))
        size = self._pre.size
        target = self.runner.input_buffer(self._input, rows)
        if target is None or target.stream != state.stream.ptr or target.shape != (rows, 3, size, size):
            return None
        batch = self._batch_array(target.shape, target)  # type: ignore[arg-type]
        slot = landing.slot()
        keep: list[Any] = []  # what its queued work reads (pixels, their device array, resize plans): until it lands
        try:
            jpegs = any(isinstance(item, PlainJpeg) for item in items)
            if jpegs:
                missed = self._decode_into(state, items, batch, keep, landing.staging_free)
                if missed:
                    raise UndecodedImages(missed)
            else:
                flat = state.upload_concatenated([p.reshape(-1) for p in items],  # type: ignore[union-attr]
                                                 IMAGE_SLOT, landing.staging_free)
                keep.append(flat)
                self.resizer.preprocess_batch(flat, [p.shape for p in items], batch, keep)  # type: ignore[union-attr]
            self._pad(state, batch, len(items))
            if any(isinstance(item, np.ndarray) for item in items):  # (JPEGs alone stage nothing)
                landing.uploaded(state.stream.ptr)
            shape = (rows, *self.runner.outputs[0].shape[1:])
            if not self.runner.launch_device(self._input, batch.data.ptr, batch.shape, slot.view(shape),
                                             cuda_driver.copy_to_host):
                raise RuntimeError(f"{self._name}: the session of {rows} rows could not queue its run")
            # the stream and its worker (the JPEG decoder) first: a tuple lets go of its items last to
            # first, so what the queued work read goes before the stream it was queued on (the thread
            # may end before they go)
            return landing.land(slot, state.stream.ptr, len(items), shape, (state.stream, state, keep), began,
                                jpegs=jpegs, host=items)
        except BaseException:
            with contextlib.suppress(Exception):  # what was queued reads what ``keep`` holds: done first
                state.stream.synchronize()
            with self._freeing():
                keep.clear()
            landing.release(slot)
            raise

    def logits(self, items: Sequence[np.ndarray | PlainJpeg]) -> np.ndarray:
        """Raises:
            UndecodedImages: ``PlainJpeg`` items the JPEG engines did not decode (every chunk's, the
                others' chunks run or not: the caller runs the whole batch again).
        """
        size = self._pre.size
        parts = []
        missed: list[int] = []  # rows of JPEGs the engines did not decode

        def run(state: DeviceWorker) -> None:
            held: list[Any] = []  # device arrays, resize plans: until the runs read them (they wait for the stream)
            try:
                run_chunks(state, held)
            except BaseException:
                with contextlib.suppress(Exception):  # the resize kernels queued read ``held``: done before it goes
                    state.stream.synchronize()
                raise
            finally:
                with self._freeing():
                    held.clear()

        def run_chunks(state: DeviceWorker, held: list[Any]) -> None:
            for start in range(0, len(items), self._step):
                chunk = items[start:start + self._step]
                rows = onnx.padded_batch(len(chunk))
                target = self.runner.input_buffer(self._input, rows)
                batch = self._batch_array((rows, 3, size, size), target)
                if any(isinstance(item, PlainJpeg) for item in chunk):
                    missed.extend(start + row for row in self._decode_into(state, chunk, batch, held))
                else:  # the chunk's images go up end to end: from a worker's pinned arena, or staged
                    flat = state.upload_concatenated([p.reshape(-1) for p in chunk], IMAGE_SLOT)  # type: ignore[union-attr]
                    self.resizer.preprocess_batch(flat, [p.shape for p in chunk],  # type: ignore[union-attr]
                                                  batch, held)
                if missed:  # no model run: the batch runs again once they are decoded (on the CPU)
                    state.stream.synchronize()  # what went up and was decoded is read before it goes
                    continue
                self._pad(state, batch, len(chunk))
                # the session on this stream runs after the resize and waits for the stream once done
                # (FixedSession), so the parts and the staging slot stay put until then; else wait here
                if target is None or target.pointer != batch.data.ptr or target.stream != state.stream.ptr:
                    state.stream.synchronize()  # onnxruntime runs on a stream of its own, or copies the batch
                logits = self.runner.run_device(self._input, batch.data.ptr, batch.shape, self._backend.device_id)
                parts.append(logits[:len(chunk)])

        with device_errors(self._backend.reclaim):
            self._backend.on_device(run)
        if missed:
            raise UndecodedImages(missed)
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    @staticmethod
    def _pad(state: DeviceWorker, batch: cp.ndarray, rows: int) -> None:
        """Zeros in ``batch``'s rows from ``rows`` on: the padding to a warmed-up shape (dropped after)."""
        if rows < len(batch):
            row = batch[0].nbytes
            cuda_driver.fill_zeros(batch.data.ptr + rows * row, (len(batch) - rows) * row, state.stream.ptr)

    def _decode_into(self, state: DeviceWorker, chunk: Sequence[np.ndarray | PlainJpeg], batch: cp.ndarray,
                     keep: list[Any], before_staging: Callable[[], None] | None = None) -> list[int]:
        """``chunk``'s images resized into ``batch[:len(chunk)]``: all of them end to end in row order
        in one array, the JPEGs decoded into their places there by the engines as one batch, first,
        then the pixels up (``before_staging`` as ``upload_concatenated``'s) and copied to theirs, and
        resized as ``CudaResizer.preprocess_batch`` does. What the stream reads from goes into
        ``keep``. Returns the rows of the JPEGs the engines did not decode: where there are any,
        nothing but the decode was queued."""
        assert self._jpeg is not None, "PlainJpeg items without JPEG engines"
        shapes = [item.shape for item in chunk]
        sizes = [int(np.prod(shape)) for shape in shapes]
        flat = cp.empty(sum(sizes), cp.uint8)
        keep.append(flat)
        starts = list(itertools.accumulate(sizes[:-1], initial=flat.data.ptr))
        rows = [row for row, item in enumerate(chunk) if isinstance(item, PlainJpeg)]
        with self._freeing():  # the decoder allocates: not while a graph is captured
            missed = self._jpeg.decode_into([chunk[row] for row in rows], [starts[row] for row in rows],
                                            state.stream.ptr, state)
        if missed:  # no model run: the batch runs again once they are decoded (on the CPU)
            return [rows[i] for i in missed]
        pixels = [row for row, item in enumerate(chunk) if not isinstance(item, PlainJpeg)]
        if pixels:
            up = state.upload_concatenated([chunk[row].reshape(-1) for row in pixels],  # type: ignore[union-attr]
                                           IMAGE_SLOT, before_staging)
            keep.append(up)
            at = up.data.ptr
            for first, count in _runs(pixels):  # rows next to each other lie end to end in both
                nbytes = sum(sizes[first:first + count])
                cuda_driver.copy_on_device(starts[first], at, nbytes, state.stream.ptr)
                at += nbytes
        self.resizer.preprocess_batch(flat, shapes, batch, keep)
        return []

    def _freeing(self) -> contextlib.AbstractContextManager[Any]:
        """What to hold where the JPEG decoder allocates or device memory is let go: the capture lock
        until the backend is sealed (captures happen at warm-up only; a free or an allocation on
        another thread breaks one)."""
        return contextlib.nullcontext() if self._backend.sealed else self._backend.pinned.capture_lock

    def _batch_array(self, shape: tuple[int, int, int, int], target: onnx.BoundInput | None) -> cp.ndarray:
        """Where a batch of ``shape`` is resized to: the model's own input ``target`` on a bound thread
        (``OnnxRunner.input_buffer``: the run copies nothing), else a new array."""
        if target is None or target.shape != shape:
            return cp.empty(shape, dtype=cp.float32)
        nbytes = int(np.prod(shape)) * 4
        memory = cp.cuda.UnownedMemory(target.pointer, nbytes, self.runner, self._backend.device_id)
        return cp.ndarray(shape, cp.float32, cp.cuda.MemoryPointer(memory, 0))

    def preprocess(self, pixels: np.ndarray) -> np.ndarray:
        """One image's model input (float32 CHW) on the host: the GPU twin of ``pillow_preprocess``."""
        def run(state: DeviceWorker) -> np.ndarray:
            out = cp.empty((1, 3, self._pre.size, self._pre.size), dtype=cp.float32)
            plans: list[Any] = []  # held until the copy back (blocking) has waited for the kernels
            self.resizer.preprocess_run(cp.asarray(pixels).reshape(-1), pixels.shape, out, plans)
            return cp.asnumpy(out[0], stream=state.stream)

        with device_errors():
            return self._backend.on_device(run)


def _runs(rows: Sequence[int]) -> list[tuple[int, int]]:
    """Ascending ``rows`` as (first, count) runs of consecutive rows."""
    runs: list[tuple[int, int]] = []
    for row in rows:
        if runs and runs[-1][0] + runs[-1][1] == row:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((row, 1))
    return runs
