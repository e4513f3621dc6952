"""Probe on the GPU machine: the GPU memory nvJPEG's decode states keep (outside cupy's pool and
``--gpu-memory-limit``) and the time of a batch of 32 large JPEGs, for one budget of pixels per
batched decode (``JpegEngines.call_pixels``, ``nvjpeg.CALL_PIXELS`` by default).

    python bench/jpeg_memory_probe.py BUDGET_MPX HEIGHT WIDTH    # ci/gpu-run.sh jpegmemory: several

A process each (an nvJPEG handle is never destroyed, so its memory would stay): a device worker's
decoder made, then two batches of 32 copies of one HEIGHT x WIDTH JPEG decoded (each state of the
decoder's ring used once the batch takes three calls or more), the memory and wall time of each.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

BATCH = 32


def main(budget_mpx: int, height: int, width: int) -> int:
    import cupy as cp
    from jpeg_call_probe import Memory, large_jpeg

    from shim.backends.base import PlainJpeg
    from shim.backends.cuda_jpeg import JpegEngines
    from shim.ops.jpeg import plain_jpeg_shape

    stream, owner = cp.cuda.Stream(non_blocking=True), SimpleNamespace()
    memory = Memory(cp)
    with memory.during("the engines' handle and a device worker's decoder"):
        engines = JpegEngines(0)
        engines.decoder(owner)
    engines.call_pixels = budget_mpx << 20
    data = large_jpeg(height, width)
    jpeg = PlainJpeg(data, plain_jpeg_shape(data, 10**9))
    size = int(np.prod(jpeg.shape))
    flat = cp.empty(BATCH * size, cp.uint8)
    for turn in range(2):
        began = time.perf_counter()
        with memory.during(f"budget {budget_mpx} Mpx, {width} x {height}: batch {turn + 1} of {BATCH}"):
            missed = engines.decode_into([jpeg] * BATCH, [flat.data.ptr + i * size for i in range(BATCH)],
                                         stream.ptr, owner)
        print(f"   {len(missed)} missed, {1e3 * (time.perf_counter() - began):.1f} ms", flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    sys.exit(main(*map(int, sys.argv[1:])))
