"""Probe on the GPU machine: the JPEG engines' decode call as the shim makes it now
(``JpegEngines.decode_into``: nvJPEG through ctypes, straight into one array, the interpreter lock
let go once) against nvImageCodec's call, the shim's before the twenty-second session (CodeStreams,
decode, each image's array interface read; the images then still had to be copied into one array).

    python bench/jpeg_call_probe.py      # ci/gpu-run.sh jpegcall; with OUT set, also $OUT/jpeg-call.json

For batches of 1, 8 and 32 (the sample photos in turn, from ``.probe/nvjpeg``: ``nvjpeg_probe.py
make-inputs``): medians of 50 calls after 5 of warm-up, of wall ms and the calling thread's CPU ms
(``time.thread_time``), the stream waited for after each call (outside the timing); and whether the
two calls' pixels agree (max abs difference). Within the shim's call, ``nvjpegDecodeBatchedInitialize``
(which keeps the interpreter lock) is timed on its own.

Then the GPU memory nvJPEG takes for itself, outside cupy's pool and ``--gpu-memory-limit`` (the
drop in ``cudaMemGetInfo``'s free bytes less the growth of cupy's pool): the engines' handle, a
device worker's decoder (its ``STATES`` states, warmed up), and after batches of the photos and of
32 large JPEGs (``LARGE``, each state in turn).
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BATCHES = (1, 8, 32)
REPEATS, WARMUP = 50, 5
LARGE = (3024, 4032)  # a 12-megapixel photo's height and width


def _timed(call: Callable[[], Any], stream: Any) -> dict[str, float]:
    walls, cpus = [], []
    for i in range(WARMUP + REPEATS):
        wall, cpu = time.perf_counter(), time.thread_time()
        call()
        wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
        stream.synchronize()
        if i >= WARMUP:
            walls.append(wall * 1e3)
            cpus.append(cpu * 1e3)
    return {"wall_ms": round(statistics.median(walls), 4), "cpu_ms": round(statistics.median(cpus), 4)}


def _clocked(call: Callable[..., int], times: list[float]) -> Callable[..., int]:
    """``call``, its calling thread's CPU ms appended to ``times``."""
    def clocked(*args: Any) -> int:
        began = time.thread_time()
        try:
            return call(*args)
        finally:
            times.append((time.thread_time() - began) * 1e3)
    return clocked


class Memory:
    """The GPU memory nvJPEG takes for itself, in MiB: what ``during`` blocks take outside cupy's pool,
    summed (other work between them, nvImageCodec's, is not counted), noted block by block."""

    def __init__(self, cp: Any) -> None:
        self._cp = cp
        self._pool = cp.get_default_memory_pool()
        self.total = 0.0
        self.notes: dict[str, float] = {}

    def _outside_pool(self) -> int:
        self._cp.cuda.Device().synchronize()
        return self._cp.cuda.runtime.memGetInfo()[0] + self._pool.total_bytes()

    @contextlib.contextmanager
    def during(self, what: str) -> Iterator[None]:
        before = self._outside_pool()
        yield
        self.total += (before - self._outside_pool()) / 2**20
        self.notes[what] = round(self.total, 1)
        print(f"nvJPEG's own GPU memory {self.total:8.1f} MiB: {what}", flush=True)


def large_jpeg(height: int, width: int) -> bytes:
    """A baseline 4:2:0 JPEG of smooth gradients and noise (quality 90)."""
    import io

    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(0).integers(0, 24, (height, width, 3))
    rgb = (np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1) + noise).clip(0, 255)
    out = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(out, format="JPEG", quality=90)
    return out.getvalue()


def main() -> int:
    import cupy as cp

    from shim.backends.base import PlainJpeg
    from shim.backends.cuda_jpeg import JpegEngines
    from shim.ops.jpeg import plain_jpeg_shape

    photos = [(ROOT / ".probe" / "nvjpeg" / f"{name}.jpg").read_bytes() for name in ("chelsea", "coffee")]
    stream = cp.cuda.Stream(non_blocking=True)
    memory, owner = Memory(cp), SimpleNamespace()
    with memory.during("the engines' handle (a warm-up decoder made and closed)"):
        engines = JpegEngines(0)
    with memory.during("a device worker's decoder: its states, warmed up"):
        engines.decoder(owner)
    initialize: list[float] = []
    calls = engines._nv._calls  # noqa: SLF001 - a probe: the lock-keeping call timed on its own
    calls["nvjpegDecodeBatchedInitialize"] = _clocked(calls["nvjpegDecodeBatchedInitialize"], initialize)
    try:
        from nvidia import nvimgcodec as nv
        old = nv.Decoder(device_id=0, max_num_cpu_threads=2, backends=[nv.Backend(nv.BackendKind.HW_GPU_ONLY)])
        params = nv.DecodeParams(apply_exif_orientation=False, color_spec=nv.ColorSpec.SRGB, allow_any_depth=False)
    except Exception as exc:  # noqa: BLE001 - the probe still times the shim's call
        print(f"nvImageCodec: not compared ({type(exc).__name__}: {exc})")
        old = None
    results: dict[str, Any] = {"device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), "batches": {}}
    for batch in BATCHES:
        datas = [photos[i % len(photos)] for i in range(batch)]
        jpegs = [PlainJpeg(data, plain_jpeg_shape(data, 10**8)) for data in datas]
        sizes = [int(np.prod(jpeg.shape)) for jpeg in jpegs]
        flat = cp.empty(sum(sizes), cp.uint8)
        starts = [flat.data.ptr + sum(sizes[:i]) for i in range(batch)]
        per_call: list[float] = []  # Initialize's CPU ms in each of the shim's calls (one or more nvJPEG calls)

        def shim_call() -> None:
            before = len(initialize)
            engines.decode_into(jpegs, starts, stream.ptr, owner)
            per_call.append(sum(initialize[before:]))

        with memory.during(f"after batches of {batch} photos"):
            row: dict[str, Any] = {"nvjpeg (the shim's)": _timed(shim_call, stream)}
        row["initialize_cpu_ms (in the shim's call)"] = round(statistics.median(per_call[WARMUP:]), 4)
        if old is not None:
            def old_call() -> list[Any]:
                images = old.decode([nv.CodeStream(data) for data in datas], params=params, cuda_stream=stream.ptr)
                return [image.__cuda_array_interface__ for image in images]
            row["nvImageCodec (before)"] = _timed(old_call, stream)
            images = old.decode([nv.CodeStream(data) for data in datas], params=params, cuda_stream=stream.ptr)
            stream.synchronize()
            got = cp.asnumpy(flat)
            off = max(int(np.abs(np.asarray(image.cpu()).reshape(-1).astype(np.int16)
                                 - got[start - flat.data.ptr:start - flat.data.ptr + size]).max())
                      for image, start, size in zip(images, starts, sizes))
            row["max_abs_difference"] = off
        results["batches"][batch] = row
        print(f"batch {batch}: " + "; ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    large = large_jpeg(*LARGE)
    jpegs = [PlainJpeg(large, plain_jpeg_shape(large, 10**8))] * 32
    size = int(np.prod(jpegs[0].shape))
    flat = cp.empty(32 * size, cp.uint8)
    for turn in range(3):  # the decoder's states in turn: each grows once
        with memory.during(f"after {turn + 1} batch(es) of 32 {LARGE[1]} x {LARGE[0]} JPEGs"):
            missed = engines.decode_into(jpegs, [flat.data.ptr + i * size for i in range(32)], stream.ptr, owner)
        print(f"  ({len(missed)} of 32 missed)")
    results["nvjpeg_memory_mib"] = memory.notes
    print(f"fallbacks {engines.fallbacks}")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "jpeg-call.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
