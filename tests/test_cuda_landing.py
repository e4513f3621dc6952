"""The landing (run on the GPU machine: ``pytest -m gpu``): its estimate of the GPU's queued work,
and when what a batch read goes."""
from __future__ import annotations

import contextlib
import threading
import time
import weakref

import pytest

pytestmark = pytest.mark.gpu
cp = pytest.importorskip("cupy")

_SPIN = r"""
extern "C" __global__ void spin(long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) {}
}
"""


def test_batches_that_decode_jpegs_have_an_estimate_of_their_own() -> None:
    """A batch whose JPEGs the GPU decodes takes longer there than one of pixels of the same rows:
    each kind's time on the GPU is estimated apart, so a batch queued after a run of the other
    kind is not expected to end at their average."""
    from shim.backends.cuda_landing import Landing

    spin = cp.RawKernel(_SPIN, "spin")
    cycles_per_ms = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["clockRate"]  # kHz
    landing = Landing(2, 8 * 4 * 4, contextlib.nullcontext, "estimates")
    stream = cp.cuda.Stream(non_blocking=True)

    def batch(ms: float, jpegs: bool) -> tuple[float, float]:
        """One batch of ``ms`` on the GPU, landed; how long after queueing ``busy_until`` put its end."""
        slot = landing.slot()
        with stream:
            spin((1,), (1,), (cp.int64(int(ms * cycles_per_ms)),))
        queued = time.perf_counter()
        future = landing.land(slot, stream.ptr, 8, (8, 4), None, queued, jpegs=jpegs)
        expected = landing.busy_until() - queued
        assert future.result(10).shape == (8, 4)
        took = time.perf_counter() - queued
        time.sleep(0.01)  # the next batch starts on an idle GPU: no estimate of this one carried over
        return expected, took

    for _ in range(8):  # alternating, as a --gpu-jpeg shim's batches may (PNGs go as pixels)
        batch(20.0, True)
        batch(2.0, False)
    jpeg_expected, jpeg_took = batch(20.0, True)
    pixels_expected, pixels_took = batch(2.0, False)
    assert jpeg_took > 0.018 and pixels_took < 0.015, (jpeg_took, pixels_took)
    assert 0.015 < jpeg_expected < 0.05, jpeg_expected  # rows alone: about 11 ms for both
    assert 0.001 < pixels_expected < 0.006, pixels_expected


def test_what_a_batch_read_in_host_memory_goes_when_it_lands_and_its_device_memory_when_its_slot_is_taken() -> None:
    """``host`` (a request worker's arena views) is let go on the landing's thread once the batch has
    landed; ``keep`` (device memory, freed only on the batcher's thread) when its slot is next taken."""
    from shim.backends.cuda_landing import Landing

    class Held:
        pass

    spin = cp.RawKernel(_SPIN, "spin")
    cycles_per_ms = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["clockRate"]  # kHz
    landing = Landing(2, 8 * 4 * 4, contextlib.nullcontext, "held")
    stream = cp.cuda.Stream(non_blocking=True)
    host, device = Held(), Held()
    host_ref, device_ref = weakref.ref(host), weakref.ref(device)
    dropped_on: list[str] = []
    weakref.finalize(host, lambda: dropped_on.append(threading.current_thread().name))
    slot = landing.slot()
    with stream:
        spin((1,), (1,), (cp.int64(int(50 * cycles_per_ms)),))
    future = landing.land(slot, stream.ptr, 8, (8, 4), device, time.perf_counter(), jpegs=False, host=host)
    del host, device
    assert host_ref() is not None, "let go while the GPU may still read it"
    future.result(10)
    deadline = time.monotonic() + 5
    while host_ref() is not None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert host_ref() is None, "the landed batch still holds its host memory"
    assert dropped_on == ["landing-held"], dropped_on
    assert device_ref() is not None, "its device memory went off the batcher's thread"
    landing.slot()
    landing.slot()  # the ring of two comes back to the landed batch's slot
    assert device_ref() is None
