"""classify's JPEGs decoded on the GPU's JPEG engines (nvJPEG's hardware backend, ``nvjpeg``), in
the device process, for ``--gpu-jpeg``: a batch's JPEGs straight into their rows of the batch's
pixel array, in one call (or several, for large images: ``nvjpeg.CALL_PIXELS`` bounds the GPU memory a
decode state keeps).

Only plain baseline JPEGs come here (``ops.jpeg.plain_jpeg_shape``): on an H200 the engines gave the
sample photos' pixels as libjpeg-turbo does (the chelsea photo bit for bit, coffee at most 1 off in a
few values; classify's logits 0 and 0.0009 apart, ``bench/results/...-nvjpeg-probe.md``). Whatever
the engines do not decode is handed back: the op decodes it on the CPU, as its twin.
"""
from __future__ import annotations

import contextlib
import io
import logging
import threading
import time
from typing import Any, Sequence

import cupy as cp
import numpy as np
import simplejpeg
from PIL import Image

from . import cuda_driver
from .base import PlainJpeg
from .nvjpeg import CALL_PIXELS, Jpeg, Nvjpeg, NvjpegError, decode_in_calls

log = logging.getLogger(__name__)

STATES = 3  # decode states a device worker takes in turn: one is reused once its decode is done
WARN_EVERY_S = 60.0
MAX_OFF = 1  # a warm-up pixel may differ from libjpeg-turbo's by this much (rounding in the colour conversion)


def _sample_jpeg() -> bytes:
    """A 64 x 48 gradient as a baseline 4:2:0 JPEG (the engines' warm-up and check)."""
    y, x = np.mgrid[0:48, 0:64]
    rgb = np.stack([x * 4, y * 5, 255 - x * 3], axis=-1).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="JPEG", quality=90)
    return out.getvalue()


class _Decoder:
    """A device worker's decode states, taken in turn, each with an event recorded on the stream after
    its last decode: a state is reused only once its decode is done (waiting for it where it is not,
    which with ``STATES`` above the batches a worker may have queued happens only for a batch decoded in
    more calls than that: large images, or a failed call decoded again image by image)."""

    def __init__(self, nv: Nvjpeg, count: int = STATES) -> None:
        self._nv = nv
        self._states: list[int] = []
        try:
            for _ in range(count):
                self._states.append(nv.state())
        except BaseException:
            self.close()
            raise
        self._events = [cp.cuda.Event(block=True, disable_timing=True) for _ in self._states]
        self._next = 0

    def decode(self, jpegs: Sequence[Jpeg], targets: Sequence[int], widths: Sequence[int], stream: int) -> None:
        """``Nvjpeg.decode_batch`` on the next state.

        Raises:
            NvjpegError: as ``decode_batch``.
        """
        turn = self._next
        self._next = (turn + 1) % len(self._states)
        event = self._events[turn]
        if not cuda_driver.done(event.ptr):
            event.synchronize()
        try:
            self._nv.decode_batch(self._states[turn], jpegs, targets, widths, stream)
        finally:  # after what was queued, even a failed call's
            try:
                cuda_driver.record(event.ptr, stream)
            except BaseException:  # the state is not guarded: it is free once the stream is done
                with contextlib.suppress(Exception):
                    cp.cuda.runtime.streamSynchronize(stream)
                raise

    def close(self) -> None:
        """Destroys the states, once their decodes are done: every one, the first failure raised after."""
        states, self._states = self._states, []
        for event in getattr(self, "_events", ()):
            event.synchronize()
        failed: Exception | None = None
        for state in states:
            try:
                self._nv.destroy_state(state)
            except Exception as exc:  # noqa: BLE001 - the others are destroyed all the same
                failed = failed or exc
        if failed is not None:
            raise failed

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - a device already gone, or the interpreter's teardown
            pass


class JpegEngines:
    """GPU ``device_id``'s JPEG engines: one nvJPEG handle, and a ``_Decoder`` per device worker (per
    stream) that has decoded a sample JPEG as libjpeg-turbo does when it is made.

    Raises (constructor):
        RuntimeError: no nvJPEG library, the GPU has no JPEG engines, or their pixels differ.
    """

    def __init__(self, device_id: int) -> None:
        self._device_id = device_id
        try:
            with cp.cuda.Device(device_id):
                self._nv = Nvjpeg()
        except (OSError, NvjpegError) as exc:
            raise RuntimeError(f"no hardware JPEG decoder on GPU {device_id} ({exc})") from None
        self._sample = _sample_jpeg()
        self._sample_pixels = simplejpeg.decode_jpeg(self._sample, colorspace="RGB")
        self._warned: dict[str, float] = {}
        self.call_pixels = CALL_PIXELS  # a batched decode's pixels, at most (``nvjpeg.split_calls``)
        self._count = threading.Lock()  # ``fallbacks`` and ``_warned``: batcher threads (instance_count) add at once
        self.fallbacks = 0  # images the engines gave back undecoded (the CPU decoded them)
        self._new_decoder().close()  # here, so that a GPU without engines, or with other pixels, fails the start

    def decoder(self, owner: Any) -> _Decoder | None:
        """``owner``'s decoder (a device worker's: one per stream), made and warmed up on first use;
        None where it could not be made (logged, once for each owner).

        Raises:
            RuntimeError: it cannot be made (the first time for ``owner``; None after that).
        """
        decoder = getattr(owner, "_jpeg_decoder", None)
        if decoder is None:
            try:
                decoder = self._new_decoder()
            except RuntimeError:
                owner._jpeg_decoder = False  # not again for it: its JPEGs are decoded on the CPU
                raise
            owner._jpeg_decoder = decoder
        return decoder or None

    def _new_decoder(self) -> _Decoder:
        """A decoder each of whose states has decoded the sample JPEG as libjpeg-turbo does."""
        want = self._sample_pixels
        try:
            with cp.cuda.Device(self._device_id):
                decoder = _Decoder(self._nv)
                try:
                    stream = cp.cuda.Stream(non_blocking=True)
                    with stream:  # the rows are written there: not a block another stream still uses
                        got = cp.empty((STATES, *want.shape), cp.uint8)
                    for row in got:
                        decoder.decode([self._sample], [row.data.ptr], [want.shape[1]], stream.ptr)
                    stream.synchronize()
                    pixels = cp.asnumpy(got)
                    if np.abs(pixels.astype(np.int16) - want).max() > MAX_OFF:
                        raise RuntimeError("the JPEG engines' pixels differ from libjpeg-turbo's")
                except BaseException:
                    with contextlib.suppress(Exception):  # (waits for what was queued); the first error is the one
                        decoder.close()
                    raise
        except (NvjpegError, cp.cuda.runtime.CUDARuntimeError, cp.cuda.driver.CUDADriverError) as exc:
            raise RuntimeError(f"no hardware JPEG decoder on GPU {self._device_id} ({exc})") from None
        return decoder

    def decode_into(self, jpegs: Sequence[PlainJpeg], targets: Sequence[int], stream: int, owner: Any) -> list[int]:
        """Queue ``jpegs``' decode by ``owner``'s decoder (``decoder``) on ``stream``, each to uint8 RGB
        rows end to end at device address ``targets[i]`` (room for its ``shape``). Returns the
        indices of those the engines did not take: the header nvJPEG reads gives another shape, or
        its call failed and that JPEG failed again alone (each kind of trouble logged at most once
        a minute). The JPEGs' bytes must stay as they are until the stream has done it.

        Raises:
            TypeError: a JPEG's data is neither ``bytes`` nor a memoryview of flat bytes
                (``nvjpeg.address``: a copy made here would go before the stream read it), raised by
                the header reads, which come before anything is queued.
        """
        datas = [jpeg.data for jpeg in jpegs]
        missed: list[int] = list(range(len(jpegs)))
        try:
            decoder = self.decoder(owner)
        except RuntimeError as exc:
            self._warn("decoder", f"no decoder for a device worker ({exc})")
            decoder = None
        if decoder is not None:
            missed = [i for i, (jpeg, data) in enumerate(zip(jpegs, datas)) if self._nv.shape(data) != jpeg.shape]
            if missed:
                self._warn("shape", f"{len(missed)} JPEGs whose header nvJPEG reads otherwise than the op did")
            take = [i for i in range(len(jpegs)) if i not in missed]
            missed += self._decode(decoder, take, datas, jpegs, targets, stream)
            missed.sort()
        if missed:
            with self._count:
                self.fallbacks += len(missed)
                so_far = self.fallbacks
            self._warn("missed", f"{len(missed)} of {len(jpegs)} JPEGs not decoded by the engines: the CPU decodes "
                                 f"them ({so_far} so far)")
        return missed

    def _decode(self, decoder: _Decoder, take: list[int], datas: list[Jpeg], jpegs: Sequence[PlainJpeg],
                targets: Sequence[int], stream: int) -> list[int]:
        """``take``'s JPEGs decoded in calls of at most ``call_pixels`` (the room a decode state keeps),
        a call that fails again image by image (``decode_in_calls``). Returns those that failed."""
        def run(positions: list[int]) -> bool:
            rows = [take[i] for i in positions]
            try:
                decoder.decode([datas[i] for i in rows], [targets[i] for i in rows],
                               [jpegs[i].shape[1] for i in rows], stream)
            except NvjpegError as exc:
                self._warn("failed", f"the JPEG engines failed a batch of {len(rows)} ({exc})")
                return False
            return True

        pixels = [jpegs[i].shape[0] * jpegs[i].shape[1] for i in take]
        return [take[i] for i in decode_in_calls(pixels, self.call_pixels, run)]

    def _warn(self, kind: str, message: str) -> None:
        now = time.monotonic()
        with self._count:
            due = now - self._warned.get(kind, -WARN_EVERY_S) >= WARN_EVERY_S
            if due:
                self._warned[kind] = now
        if due:
            log.warning("--gpu-jpeg: %s", message)


def jpeg_engines(device_id: int) -> JpegEngines | None:
    """The JPEG engines of GPU ``device_id``, or None (logged: classify then decodes on the CPU)."""
    try:
        engines = JpegEngines(device_id)
    except Exception as exc:  # noqa: BLE001 - whatever it is, the shim serves without them
        log.warning("--gpu-jpeg: %s; JPEGs are decoded on the CPU", exc)
        return None
    log.info("--gpu-jpeg: classify's plain baseline JPEGs are decoded on GPU %d's JPEG engines", device_id)
    return engines
