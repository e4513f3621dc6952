"""classify's JPEGs decoded on the GPU's JPEG engines (nvImageCodec's hardware backend), in the
device process, for ``--gpu-jpeg``.

Only plain baseline JPEGs come here (``ops.jpeg.plain_jpeg_shape``): on an H200 the engines gave the
sample photos' pixels as libjpeg-turbo does (the chelsea photo bit for bit, coffee at most 1 off in a
few values; classify's logits 0 and 0.0009 apart, ``bench/results/...-nvjpeg-probe.md``), in 0.5 ms
for a batch of 6 with 0.1 ms of CPU per image, where the CPU decode takes 0.6-1.1 ms of CPU each.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Sequence

import cupy as cp
import numpy as np

log = logging.getLogger(__name__)


class JpegEngines:
    """One nvImageCodec decoder per thread (a batcher's), on the hardware backend only: an image it
    cannot decode comes back as None, for the CPU to decode, never through a slower GPU decoder
    whose pixels differ from libjpeg-turbo's.

    Raises (constructor):
        RuntimeError: nvImageCodec is not installed, or the GPU has no JPEG engines.
    """

    def __init__(self, device_id: int) -> None:
        try:
            from nvidia import nvimgcodec  # noqa: PLC0415 - optional: the nvidia-nvimgcodec-cu13 wheel
        except Exception as exc:  # noqa: BLE001 - ImportError, or a library it loads
            raise RuntimeError(f"nvImageCodec is not importable ({type(exc).__name__}: {exc})") from None
        self._nv = nvimgcodec
        self._device_id = device_id
        # plain JPEGs are upright (no orientation to apply); sRGB: YCbCr to RGB as libjpeg does
        self._params = nvimgcodec.DecodeParams(apply_exif_orientation=False, color_spec=nvimgcodec.ColorSpec.SRGB,
                                               allow_any_depth=False)
        self._local = threading.local()
        self.decoder()  # here, so that a GPU without engines fails the start, not a batch

    def decoder(self) -> Any:
        """The calling thread's decoder, made on first use."""
        decoder = getattr(self._local, "decoder", None)
        if decoder is None:
            try:
                decoder = self._nv.Decoder(device_id=self._device_id,
                                           backends=[self._nv.Backend(self._nv.BackendKind.HW_GPU_ONLY)])
            except Exception as exc:  # noqa: BLE001 - nvImageCodec raises plain RuntimeErrors
                raise RuntimeError(f"no hardware JPEG decoder on GPU {self._device_id} ({exc})") from None
            self._local.decoder = decoder
        return decoder

    def decode(self, jpegs: Sequence[bytes], stream: int) -> list[cp.ndarray | None]:
        """``jpegs`` decoded as one batch to uint8 RGB HWC arrays on the device, ready in ``stream``'s
        order; None for each the engines could not decode. The arrays own their memory."""
        images = self.decoder().decode([self._nv.CodeStream(data) for data in jpegs], params=self._params,
                                       cuda_stream=stream)
        return [None if image is None else device_array(image) for image in images]


def device_array(image: Any) -> cp.ndarray:
    """A decoded image's device buffer as a cupy array that keeps ``image`` alive, without the host
    wait ``cp.asarray`` makes for the stream its interface names (that work is ordered on the stream
    anyway)."""
    face = image.__cuda_array_interface__
    shape = tuple(face["shape"])
    strides = face.get("strides")
    nbytes = strides[0] * shape[0] if strides else int(np.prod(shape))
    memory = cp.cuda.UnownedMemory(face["data"][0], nbytes, image)
    return cp.ndarray(shape, cp.uint8, cp.cuda.MemoryPointer(memory, 0), strides=strides)


def jpeg_engines(device_id: int) -> JpegEngines | None:
    """The JPEG engines of GPU ``device_id``, or None (logged: classify then decodes on the CPU)."""
    try:
        engines = JpegEngines(device_id)
    except RuntimeError as exc:
        log.warning("--gpu-jpeg: %s; JPEGs are decoded on the CPU", exc)
        return None
    log.info("--gpu-jpeg: classify's plain baseline JPEGs are decoded on GPU %d's JPEG engines", device_id)
    return engines
