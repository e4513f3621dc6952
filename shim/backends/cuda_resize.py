"""Pillow's resize + normalisation on the GPU (the preloaded kernels of ``shim/kernels/resample.cu``):
each image size's resize plan cached on the device, and the kernels' launches for a batch's images
(``CudaResizer``, held by ``cuda_imaging.CudaImagePipeline``)."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Sequence

import cupy as cp
import numpy as np

from ..kernels.resample import CUDA_SOURCE, Pass, plan
from ..modelrepo import Preprocessing
from . import cuda_driver
from .cuda_errors import device_errors

PLAN_RESERVE_BYTES = 8 << 20  # resize plans' device memory, reserved: 16-20 KiB each for a photo, 90 for 4000x3000
_THREADS_PER_BLOCK = 256


def _uploaded(host: np.ndarray, stream: cp.cuda.Stream) -> cp.ndarray:
    """``host`` on the device, copied on ``stream`` (allocated in its part of the pool)."""
    device = cp.empty(host.shape, host.dtype)
    device.set(host, stream=stream)
    return device


def same_shape_runs(shapes: Sequence[tuple[int, ...]]) -> list[tuple[tuple[int, ...], int]]:
    """``(shape, count)`` of each run of equal consecutive shapes, in order."""
    runs: list[tuple[tuple[int, ...], int]] = []
    for shape in shapes:
        if runs and runs[-1][0] == shape:
            runs[-1] = (shape, runs[-1][1] + 1)
        else:
            runs.append((shape, 1))
    return runs


class CudaResizer:
    """Uint8 HWC images on the device resized + normalised into a model's float32 NCHW input, on
    the current stream (bit-exact with the CPU twin), with one launch per pass for each run of
    same-size images; each size's plan (its passes' bounds and weights) cached on the device."""

    def __init__(self, pre: Preprocessing) -> None:
        self._pre = pre
        with device_errors():
            module = cp.RawModule(code=CUDA_SOURCE.read_text(encoding="utf-8"), options=("-std=c++14",))
            self._module = module  # kept: the kernels' handles below are valid while it is loaded
            self._h, self._v = (cuda_driver.kernel_handle(module.get_function(name))
                                for name in ("resample_h", "resample_v"))
        self._plans: OrderedDict[tuple[int, int], list[tuple[Pass, cp.ndarray, cp.ndarray]]] = OrderedDict()
        with device_errors():
            # a new size's plan goes up on a stream of its own: waiting for it does not wait for the
            # batches queued on the batcher's streams. Its arrays come from that stream's part of the
            # memory pool, reserved here: a device allocation (cudaMalloc) would serialise the streams
            self._plan_stream = cp.cuda.Stream(non_blocking=True)
            with self._plan_stream:
                cp.empty(PLAN_RESERVE_BYTES, cp.uint8)  # freed at once, kept by the pool for this stream
        self._lock = threading.Lock()  # the plan cache's (batcher threads look plans up at once)

    def preprocess_batch(self, flat: cp.ndarray, shapes: Sequence[tuple[int, ...]], out: cp.ndarray,
                         plans: list[Any]) -> None:
        """Images of ``shapes`` laid end to end in ``flat`` (uint8 on the device) into ``out[:len(shapes)]``;
        each run of same-size images is resized with one launch per pass (their plans into ``plans``,
        as ``preprocess_run``)."""
        offset = row = 0
        for shape, count in same_shape_runs(shapes):
            span = count * int(np.prod(shape))
            self.preprocess_run(flat[offset:offset + span], shape, out[row:row + count], plans)
            offset, row = offset + span, row + count

    def preprocess_run(self, src: cp.ndarray, shape: tuple[int, ...], out: cp.ndarray, plans: list[Any]) -> None:
        """Resize + normalise ``len(out)`` uint8 HWC images of one ``shape``, laid end to end in ``src``
        (their bytes on the device), into ``out`` [n, C, size, size]: one launch per pass for all.
        The plan the launches read goes into ``plans``, for the caller to hold until they have run."""
        height, width, channels = shape
        count = out.shape[0]
        src_w, src_stride = width, height * width * channels
        mean, std = np.float32(self._pre.mean), np.float32(self._pre.std)
        null, out_stride = np.uint64(0), np.int64(out[0].size)
        stream = cp.cuda.get_current_stream().ptr  # the device worker's
        steps = self._plan(width, height)
        plans.append(steps)  # held until the kernels that read them have run
        for index, (step, bounds, weights) in enumerate(steps):
            last = index == len(steps) - 1
            out_n = len(step.bounds)
            if step.axis == 1:
                rows = step.last - step.first
                per_image = rows * out_n * channels
                args = (src, np.int32(src_w), np.int32(channels), np.int32(step.first), np.int32(rows),
                        bounds, weights, np.int32(step.weights.shape[1]), np.int32(out_n))
                kernel, src_w = self._h, out_n
            else:
                per_image = out_n * src_w * channels
                args = (src, np.int32(src_w), np.int32(channels), bounds, weights,
                        np.int32(step.weights.shape[1]), np.int32(out_n))
                kernel = self._v
            dst = None if last else cp.empty(count * per_image, dtype=cp.uint8)
            cuda_driver.launch(kernel, ((per_image + _THREADS_PER_BLOCK - 1) // _THREADS_PER_BLOCK, count),
                               _THREADS_PER_BLOCK, args + (dst if dst is not None else null, out if last else null,
                                                           mean, std, np.int64(src_stride), np.int64(per_image),
                                                           out_stride), stream)
            if dst is not None:
                src, src_stride = dst, per_image

    def _plan(self, width: int, height: int) -> list[tuple[Pass, cp.ndarray, cp.ndarray]]:
        """The resize passes of a ``width`` x ``height`` image with their bounds and weights on the
        device, cached per image size (LRU of 256). A plan dropped from the cache goes back to the
        plan stream's part of the pool, where the next plan's upload may take it at once, not
        ordered after the kernels queued on other streams: whoever launches kernels that read a
        plan holds it until they have run (``preprocess_run``'s ``plans``; a queued batch's landing)."""
        key = (width, height)
        with self._lock:
            cached = self._plans.get(key)
            if cached is not None:
                self._plans.move_to_end(key)
                return cached
        with self._plan_stream:  # straight from pageable memory (cp.asarray stages through pinned memory
            # that it may allocate: a page-locked allocation serialises the streams too)
            steps = [(p, _uploaded(p.bounds, self._plan_stream), _uploaded(p.weights, self._plan_stream))
                     for p in plan(width, height, self._pre)]
            self._plan_stream.synchronize()  # up before any stream (this thread's, others') reads them
        with self._lock:
            cached = self._plans.get(key)
            if cached is not None:  # another thread's went in first: ours was never read, it may go
                self._plans.move_to_end(key)
                return cached
            self._plans[key] = steps
            while len(self._plans) > 256:
                self._plans.popitem(last=False)
        return steps
