"""Probe on the GPU machine: the JPEG engines' decode call as the shim makes it now
(``JpegEngines.decode_into``: nvJPEG through ctypes, straight into one array, the interpreter lock
let go once) against nvImageCodec's call, the shim's before the twenty-second session (CodeStreams,
decode, each image's array interface read; the images then still had to be copied into one array).

    python bench/jpeg_call_probe.py      # ci/gpu-run.sh jpegcall; with OUT set, also $OUT/jpeg-call.json

For batches of 1, 8 and 32 (the sample photos in turn, from ``.probe/nvjpeg``: ``nvjpeg_probe.py
make-inputs``): medians of 50 calls after 5 of warm-up, of wall ms and the calling thread's CPU ms
(``time.thread_time``), the stream waited for after each call (outside the timing); and whether the
two calls' pixels agree (max abs difference).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BATCHES = (1, 8, 32)
REPEATS, WARMUP = 50, 5


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


def main() -> int:
    import cupy as cp

    from shim.backends.base import PlainJpeg
    from shim.backends.cuda_jpeg import JpegEngines
    from shim.ops.jpeg import plain_jpeg_shape

    photos = [(ROOT / ".probe" / "nvjpeg" / f"{name}.jpg").read_bytes() for name in ("chelsea", "coffee")]
    engines, owner, stream = JpegEngines(0), SimpleNamespace(), cp.cuda.Stream(non_blocking=True)
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
        row: dict[str, Any] = {"nvjpeg (the shim's)": _timed(
            lambda: engines.decode_into(jpegs, starts, stream.ptr, owner), stream)}
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
    print(f"fallbacks {engines.fallbacks}")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "jpeg-call.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
