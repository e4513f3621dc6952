"""classify's JPEGs decoded on the GPU's JPEG engines (nvImageCodec's hardware backend), in the
device process, for ``--gpu-jpeg``.

Only plain baseline JPEGs come here (``ops.jpeg.plain_jpeg_shape``): on an H200 the engines gave the
sample photos' pixels as libjpeg-turbo does (the chelsea photo bit for bit, coffee at most 1 off in a
few values; classify's logits 0 and 0.0009 apart, ``bench/results/...-nvjpeg-probe.md``), in 0.5 ms
for a batch of 6 with 0.1 ms of CPU per image, where the CPU decode takes 0.6-1.1 ms of CPU each.
Whatever the engines do not decode comes back as None: the op decodes it on the CPU, as its twin.
"""
from __future__ import annotations

import io
import logging
import threading
import time
from typing import Any, Sequence

import numpy as np
import simplejpeg
from PIL import Image

from .cuda_driver import DeviceImage

log = logging.getLogger(__name__)

CPU_THREADS = 2  # each decoder's own pool (nvImageCodec's default: one thread per core, per decoder)
WARN_EVERY_S = 60.0
MAX_OFF = 1  # a warm-up pixel may differ from libjpeg-turbo's by this much (rounding in the colour conversion)


def _sample_jpeg() -> bytes:
    """A 64 x 48 gradient as a baseline 4:2:0 JPEG (the engines' warm-up and check)."""
    y, x = np.mgrid[0:48, 0:64]
    rgb = np.stack([x * 4, y * 5, 255 - x * 3], axis=-1).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="JPEG", quality=90)
    return out.getvalue()


class JpegEngines:
    """One nvImageCodec decoder per device worker (per stream), on the hardware backend only, never a
    slower GPU decoder whose pixels differ from libjpeg-turbo's; each decodes a sample JPEG when it
    is made (its buffers, now), whose pixels must be libjpeg-turbo's.

    Raises (constructor):
        RuntimeError: nvImageCodec is not installed, the GPU has no JPEG engines, or their pixels differ.
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
        self._sample = _sample_jpeg()
        self._sample_pixels = simplejpeg.decode_jpeg(self._sample, colorspace="RGB")
        self._warned: dict[str, float] = {}
        self._count = threading.Lock()  # ``fallbacks`` and ``_warned``: batcher threads (instance_count) add at once
        self.fallbacks = 0  # images the engines gave back undecoded (the CPU decoded them)
        self._new_decoder()  # here, so that a GPU without engines, or with other pixels, fails the start

    def decoder(self, owner: Any) -> Any:
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

    def _new_decoder(self) -> Any:
        """A decoder on the engines that has decoded the sample JPEG as libjpeg-turbo does."""
        try:
            decoder = self._nv.Decoder(device_id=self._device_id, max_num_cpu_threads=CPU_THREADS,
                                       backends=[self._nv.Backend(self._nv.BackendKind.HW_GPU_ONLY)])
            image = decoder.decode(self._nv.CodeStream(self._sample), params=self._params)
        except Exception as exc:  # noqa: BLE001 - nvImageCodec raises plain RuntimeErrors
            raise RuntimeError(f"no hardware JPEG decoder on GPU {self._device_id} ({exc})") from None
        if image is None:
            raise RuntimeError("the JPEG engines did not decode a plain baseline JPEG")
        got, want = np.asarray(image.cpu()), self._sample_pixels
        if got.shape != want.shape or np.abs(got.astype(np.int16) - want).max() > MAX_OFF:
            raise RuntimeError("the JPEG engines' pixels differ from libjpeg-turbo's")
        return decoder

    def decode(self, jpegs: Sequence[bytes], stream: int, owner: Any) -> list[DeviceImage | None]:
        """``jpegs`` decoded as one batch by ``owner``'s decoder (``decoder``) to uint8 RGB HWC images
        on the device, ready in ``stream``'s order (the engines' work and their buffers' allocation
        and release are queued there); None for each they did not decode, all None where the decoder
        failed (each kind of trouble logged at most once a minute). The records keep the decoded
        images and their decoder alive."""
        images: list[Any] = [None] * len(jpegs)
        decoder = None
        try:
            decoder = self.decoder(owner)
            if decoder is not None:
                images = decoder.decode([self._nv.CodeStream(data) for data in jpegs], params=self._params,
                                        cuda_stream=stream)
        except Exception as exc:  # noqa: BLE001 - the CPU decodes them; a broken device fails what follows
            self._warn("failed", f"the JPEG engines failed a batch of {len(jpegs)} ({type(exc).__name__}: {exc})")
        decoded = [self._image(image, decoder) for image in images]
        missed = sum(image is None for image in decoded)
        if missed:
            with self._count:
                self.fallbacks += missed
                so_far = self.fallbacks
            self._warn("missed", f"{missed} of {len(jpegs)} JPEGs not decoded by the engines: the CPU decodes "
                                 f"them ({so_far} so far)")
        return decoded

    def _image(self, image: Any, decoder: Any) -> DeviceImage | None:
        if image is None:
            return None
        try:  # the record keeps the decoder too (an image that outlived its decoder crashed the process),
            # image last in the tuple: a tuple lets go of its items last to first, the image before its decoder
            return device_image(image, (decoder, image))
        except Exception as exc:  # noqa: BLE001 - an image not as expected: the CPU decodes it
            self._warn("array", f"a decoded image could not be read ({type(exc).__name__}: {exc})")
            return None

    def _warn(self, kind: str, message: str) -> None:
        now = time.monotonic()
        with self._count:
            due = now - self._warned.get(kind, -WARN_EVERY_S) >= WARN_EVERY_S
            if due:
                self._warned[kind] = now
        if due:
            log.warning("--gpu-jpeg: %s", message)


def device_image(image: Any, keep: Any) -> DeviceImage:
    """A decoded image's device buffer, read from its ``__cuda_array_interface__`` without the host
    wait ``cp.asarray`` makes for the stream it names (that work is ordered on the stream anyway), as
    a record that keeps ``keep`` (its decoder, the image) alive.

    Raises:
        ValueError: not uint8 RGB rows of contiguous pixels.
    """
    face = image.__cuda_array_interface__
    shape = tuple(face["shape"])
    if face["typestr"][1:] != "u1" or len(shape) != 3 or shape[2] != 3:
        raise ValueError(f"not uint8 HWC RGB: {face['typestr']} {shape}")
    strides = tuple(face.get("strides") or ())
    if strides and (strides[1:] != (3, 1) or strides[0] < 3 * shape[1]):
        raise ValueError(f"rows laid out as {strides}, not as pixels end to end")
    if not strides:
        return DeviceImage.packed(face["data"][0], shape, keep)
    return DeviceImage(face["data"][0], shape, strides[0], keep)


def jpeg_engines(device_id: int) -> JpegEngines | None:
    """The JPEG engines of GPU ``device_id``, or None (logged: classify then decodes on the CPU)."""
    try:
        engines = JpegEngines(device_id)
    except Exception as exc:  # noqa: BLE001 - whatever it is, the shim serves without them
        log.warning("--gpu-jpeg: %s; JPEGs are decoded on the CPU", exc)
        return None
    log.info("--gpu-jpeg: classify's plain baseline JPEGs are decoded on GPU %d's JPEG engines", device_id)
    return engines
