"""A fast path for plain JPEGs: libjpeg-turbo straight into a numpy array (simplejpeg), with none of
Pillow's marker parsing in Python and no copy out of a Pillow image.

It decodes only JPEGs whose pixels it is sure Pillow would give alike (``decode_image`` then
``rgb_pixels``): baseline or progressive YCbCr or grayscale JPEGs, upright (no EXIF or XMP
orientation to apply), within the pixel limits. Anything else, and any JPEG libjpeg-turbo only
warns about or cannot read, goes to Pillow as before, which decides what it is and which error it
gets. One difference is by design: metadata that libjpeg skips and Pillow's own marker parser
chokes on (a TEM marker, a cut-short JFIF, Adobe, Photoshop or ICC segment, EXIF tags Pillow
misreads while looking for the resolution) no longer fails the image, and neither do arithmetic-coded
JPEGs over 64 KiB, which Pillow feeds libjpeg in pieces it cannot resume from.
"""
from __future__ import annotations

import struct

import numpy as np
import simplejpeg
from PIL import Image

_SOI, _SOS, _EOI, _APP1, _APP2 = 0xD8, 0xDA, 0xD9, 0xE1, 0xE2
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # markers without a length
_COLORSPACES = {"YCbCr", "Gray"}  # decoded alike by both; CMYK/YCCK and Adobe RGB are not (off by 1)
_ORIENTATION = 0x0112


def decode_plain_jpeg(data: bytes, max_pixels: int) -> np.ndarray | None:
    """``data`` decoded to uint8 RGB HWC, or None: not a JPEG this path is sure of (Pillow's turn).

    Over ``max_pixels`` also answers None: Pillow's path reads the size first and raises there."""
    if not isinstance(data, bytes):  # a bytearray or memoryview (requests bring bytes): one copy
        data = bytes(data)
    if data[:2] != b"\xff\xd8" or not _upright(data):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
        if colorspace not in _COLORSPACES or width * height > limit:
            return None
        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    except Exception:  # noqa: BLE001 - corrupt, truncated, only warned about, or not understood
        return None  # (simplejpeg raises KeyError on 4:4:1 sampling): Pillow decides


def _upright(data: bytes) -> bool:
    """True when the markers before the scan hold nothing that turns the image (Pillow's
    ``exif_transpose``: EXIF orientation, else XMP's) and no multi-picture index (MPO)."""
    i, n, exif = 2, len(data), 0
    while i + 4 <= n:
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (_SOS, _EOI):
            return True
        if marker in _STANDALONE:
            i += 2
            continue
        length = (data[i + 2] << 8) | data[i + 3]
        if length < 2 or i + 2 + length > n:
            return False
        segment = data[i + 4:i + 2 + length]
        if marker == _APP1:
            if segment.startswith(b"Exif\x00\x00"):
                exif += 1
                if exif > 1 or _orientation(segment[6:]) != 1:
                    return False
            elif b"Orientation" in segment:  # XMP: Pillow takes tiff:Orientation from it
                return False
        elif marker == _APP2 and segment.startswith(b"MPF\x00"):
            return False
        i += 2 + length
    return False


def _orientation(tiff: bytes) -> int | None:
    """The orientation in an EXIF block (1 where it has none); None where it cannot be read plainly."""
    try:
        order = {b"II": "<", b"MM": ">"}[tiff[:2]]
        magic, ifd = struct.unpack_from(order + "HI", tiff, 2)
        if magic != 42:
            return None
        (count,) = struct.unpack_from(order + "H", tiff, ifd)
        for k in range(count):
            tag, kind, items = struct.unpack_from(order + "HHI", tiff, ifd + 2 + 12 * k)
            if tag == _ORIENTATION:
                if kind != 3 or items != 1:  # not one SHORT
                    return None
                return struct.unpack_from(order + "H", tiff, ifd + 10 + 12 * k)[0]
    except (KeyError, struct.error):
        return None
    return 1
