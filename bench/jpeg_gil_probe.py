"""Does nvImageCodec's decode call hold the interpreter lock? On the GPU machine, with nvImageCodec in
/tmp/site-nvjpeg (``ci/gpu-run.sh`` installs it): ``PYTHONPATH=/tmp/site-nvjpeg python3 bench/jpeg_gil_probe.py``.

The engines' decode of 1, 10 and 30 JPEGs (the chelsea photo) timed alone; then a Python thread spins
while another decodes batches of 10: the spinner's rate and largest gaps against spinning alone (a
call that held the lock would stall it), and the decoding thread's wall and CPU time per call (a
call that lets go of the lock waits to take it back).
"""
from __future__ import annotations

import io
import threading
import time
from typing import Any

import cupy as cp
import numpy as np
from nvidia import nvimgcodec as nv
from PIL import Image
from skimage import data as skdata

BATCH = 10


class Engines:
    """One decoder on the JPEG engines (as the shim's ``JpegEngines``), one stream, one JPEG."""

    def __init__(self) -> None:
        out = io.BytesIO()
        Image.fromarray(skdata.chelsea()).save(out, "JPEG", quality=90)
        self.jpeg = out.getvalue()
        self.decoder = nv.Decoder(device_id=0, max_num_cpu_threads=2,
                                  backends=[nv.Backend(nv.BackendKind.HW_GPU_ONLY)])
        self.params = nv.DecodeParams(apply_exif_orientation=False, color_spec=nv.ColorSpec.SRGB,
                                      allow_any_depth=False)
        self.stream = cp.cuda.Stream(non_blocking=True)

    def decode(self, count: int) -> Any:
        return self.decoder.decode([nv.CodeStream(self.jpeg) for _ in range(count)], params=self.params,
                                   cuda_stream=self.stream.ptr)


def spin(seconds: float) -> tuple[float, float, float, int]:
    """A Python loop for ``seconds``: iterations/s, the 99.9th percentile and largest gap between
    iterations (ms), and the gaps above 0.2 ms (a decode call of 10 that kept the lock would make one each)."""
    gaps: list[float] = []
    end = last = time.perf_counter()
    end += seconds
    while (now := time.perf_counter()) < end:
        gaps.append(now - last)
        last = now
    ms = np.array(gaps) * 1e3
    return len(gaps) / seconds, float(np.percentile(ms, 99.9)), float(ms.max()), int((ms > 0.2).sum())


def decoding_beside_a_spinner(engines: Engines, seconds: float) -> tuple[tuple[float, float, float, int], dict]:
    """``spin`` while another thread decodes batches of ``BATCH``; the spin's numbers and the
    decoding thread's calls, wall and CPU seconds."""
    stop, stats = threading.Event(), {}

    def decoding() -> None:
        calls, wall, cpu = 0, time.perf_counter(), time.thread_time()
        while not stop.is_set():
            engines.decode(BATCH)
            calls += 1
        stats.update(calls=calls, wall=time.perf_counter() - wall, cpu=time.thread_time() - cpu)

    thread = threading.Thread(target=decoding)
    thread.start()
    time.sleep(0.1)
    spun = spin(seconds)
    stop.set()
    thread.join()
    return spun, stats


def main() -> None:
    engines = Engines()
    for _ in range(20):
        engines.decode(BATCH)
    engines.stream.synchronize()
    began = time.perf_counter()
    for _ in range(1000):
        nv.CodeStream(engines.jpeg)
    print(f"CodeStream: {(time.perf_counter() - began):.4f} ms each")  # 1000 of them: s = ms each
    for count in (1, BATCH, 30):
        walls, cpus = [], []
        for _ in range(50):
            wall, cpu = time.perf_counter(), time.thread_time()
            engines.decode(count)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.thread_time() - cpu)
        engines.stream.synchronize()
        print(f"decode batch {count}: wall {1e3 * np.median(walls):.2f} ms, thread CPU {1e3 * np.median(cpus):.2f} ms")
    line = "%s %.0f it/s, p99.9 gap %.3f ms, max %.3f ms, gaps > 0.2 ms: %d"
    print(line % ("alone:    ", *spin(2.0)))
    spun, stats = decoding_beside_a_spinner(engines, 2.0)
    print(line % ("decoding: ", *spun))
    print(f"decoder thread: {stats['calls'] / stats['wall']:.0f} calls/s, {1e3 * stats['wall'] / stats['calls']:.2f} ms "
          f"wall and {1e3 * stats['cpu'] / stats['calls']:.2f} ms CPU per call of {BATCH}")


if __name__ == "__main__":
    main()
