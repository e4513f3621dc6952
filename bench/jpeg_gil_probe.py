"""Does nvImageCodec's decode call hold the interpreter lock? On the GPU machine, with nvImageCodec in
/tmp/site-nvjpeg (``ci/gpu-run.sh`` installs it): ``PYTHONPATH=/tmp/site-nvjpeg python3 bench/jpeg_gil_probe.py``.

The engines' decode of 1, 10 and 30 JPEGs (the chelsea photo) timed alone; then a Python thread spins
while another decodes batches of 10: the spinner's rate and largest gaps against spinning alone (a
call that held the lock would stall it), and the decoding thread's wall and CPU time per call (a
call that lets go of the lock waits to take it back); then the same beside threads that hold the lock
in short stretches, about as the shim's device process does at 32 clients (how many times a call
takes it back), without and with ``bench/turnstile_probe.py``'s turnstile. Then what reading the decoded images costs
and whether it waits for the engines: each image's ``__cuda_array_interface__``, the shim's
``device_image`` (which reads it; before, a cupy array for each), ``cupy.from_dlpack``; the share of batches whose stream was still
busy right after the decode call and right after the reads (a read that waits leaves none busy).
Last, the same calls behind about 100 ms of matrix products queued on the stream: whether the decode
call or a read waits for work queued before it (on a batcher's stream, the batches before). Needs
the repository and simplejpeg on the path (``ci/gpu-run.sh gil``).
"""
from __future__ import annotations

import io
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import cupy as cp
import numpy as np
from nvidia import nvimgcodec as nv
from PIL import Image
from skimage import data as skdata

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.turnstile_probe import Turnstile, beside_holders, python_for  # noqa: E402

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


def _decode_until(engines: Engines, stop: threading.Event, stats: dict) -> None:
    """Decode batches of ``BATCH`` until ``stop``; then ``stats`` has the calls, wall and CPU seconds."""
    calls, wall, cpu = 0, time.perf_counter(), time.thread_time()
    while not stop.is_set():
        engines.decode(BATCH)
        calls += 1
    stats.update(calls=calls, wall=time.perf_counter() - wall, cpu=time.thread_time() - cpu)


def decoding_beside_a_spinner(engines: Engines, seconds: float) -> tuple[tuple[float, float, float, int], dict]:
    """``spin`` while another thread decodes batches of ``BATCH``; the spin's numbers and the
    decoding thread's calls, wall and CPU seconds."""
    stop, stats = threading.Event(), {}
    thread = threading.Thread(target=_decode_until, args=(engines, stop, stats))
    thread.start()
    time.sleep(0.1)
    spun = spin(seconds)
    stop.set()
    thread.join()
    return spun, stats


def _reads(engines: Engines) -> dict[str, Callable[[Any], Any] | None]:
    """The ways of reading a decoded image compared (None: not read)."""
    from shim.backends.cuda_driver import as_array  # noqa: PLC0415 - the repository on the path
    from shim.backends.cuda_jpeg import device_image  # noqa: PLC0415

    return {"decode only": None,
            "__cuda_array_interface__": lambda image: image.__cuda_array_interface__,
            "device_image (the shim's)": lambda image: device_image(image, (engines.decoder, image)),
            "a cupy array over the record (about the shim's before)": lambda image: as_array(device_image(image, image), 0),
            "cupy.from_dlpack": cp.from_dlpack}


def reading_the_images(engines: Engines) -> None:
    """Per batch of ``BATCH``: the decode call and the reads of its images, timed, and whether the
    stream was still busy after each."""
    for how, read in _reads(engines).items():
        decode_ms, read_ms, read_cpu, busy = [], [], [], [0, 0]
        for _ in range(100):
            engines.stream.synchronize()
            began = time.perf_counter()
            with engines.stream:
                images = engines.decode(BATCH)
                decoded, busy[0] = time.perf_counter(), busy[0] + (not engines.stream.done)
                cpu = time.thread_time()
                arrays = [read(image) for image in images] if read is not None else []
            read_cpu.append(time.thread_time() - cpu)
            busy[1] += not engines.stream.done
            read_ms.append(time.perf_counter() - decoded)
            decode_ms.append(decoded - began)
            del arrays, images
        print(f"{how:28s} decode {1e3 * np.median(decode_ms):.2f} ms, then the reads {1e3 * np.median(read_ms):.3f} ms "
              f"(CPU {1e3 * np.median(read_cpu):.3f}); stream busy after the decode {busy[0]}%, after the reads {busy[1]}%")
    face = engines.decode(1)[0].__cuda_array_interface__
    print("an image's interface:", {key: value for key, value in face.items() if key != "data"})


def behind_queued_work(engines: Engines) -> None:
    """The decode call and each way of reading its images, with about 100 ms of matrix products
    queued on the stream first: their times, and whether that work was still running after them."""
    a = cp.random.random((8192, 8192), dtype=cp.float32)
    reads = {**_reads(engines),
             "UnownedMemory": lambda image: cp.cuda.UnownedMemory(image.__cuda_array_interface__["data"][0], 1,
                                                                  image, 0)}
    with engines.stream:
        a @ a  # cuBLAS warmed up
    for how, read in reads.items():
        for _ in range(3):
            engines.stream.synchronize()
            with engines.stream:
                for _ in range(5):
                    a @ a
                began = time.perf_counter()
                images = engines.decode(BATCH)
                decoded = time.perf_counter()
                arrays = [read(image) for image in images] if read is not None else []
                read_at = time.perf_counter()
                busy = not engines.stream.done
            engines.stream.synchronize()
            left = time.perf_counter() - read_at
            print(f"behind queued work, {how:26s} decode {1e3 * (decoded - began):.2f} ms, reads "
                  f"{1e3 * (read_at - decoded):.2f} ms, the work still running after them: {busy} "
                  f"({1e3 * left:.0f} ms left)")
            del arrays, images


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
    # beside threads holding the lock in short stretches, as the device process's readers and landing
    # do at 32 clients (the lock held about 59% of the time), without and with the turnstile, as
    # bench/turnstile_probe.py's stand-in: each call as the shim's (code streams, the
    # decode, each image's interface read), then 1 ms of other Python; wall well beyond CPU per call
    # means the call waits out their stretches
    from shim.backends.cuda_jpeg import device_image  # noqa: PLC0415 - the repository on the path

    def shim_like() -> None:
        for image in engines.decode(BATCH):
            device_image(image, image)

    for turnstile in (None, Turnstile(), None, Turnstile()):
        walls, cpu, held = beside_holders(shim_like, 2.0, turnstile, after=lambda: python_for(1e-3))
        walls.sort()
        print(f"beside 3 threads holding the lock 60 us at a time, 120 us apart "
              f"({'with' if turnstile else 'without'} the turnstile; they ran {held:.0%} of the time): "
              f"{len(walls) / 2.0:.0f} cycles/s, the call p50 {1e3 * walls[len(walls) // 2]:.2f} ms wall, "
              f"{1e3 * cpu / len(walls):.2f} ms CPU on average, per batch of {BATCH}")
    reading_the_images(engines)
    behind_queued_work(engines)


if __name__ == "__main__":
    main()
