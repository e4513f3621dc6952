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
_BASELINE, _DHT, _DQT = 0xC0, 0xC4, 0xDB  # the frame the GPU's JPEG engines decode, and its tables
_DEVICE_SUBSAMPLING = {"444", "422", "420"}


def decode_plain_jpeg(data: bytes, max_pixels: int) -> np.ndarray | None:
    """``data`` decoded to uint8 RGB HWC, or None: not a JPEG this path is sure of (Pillow's turn).

    Over ``max_pixels`` also answers None: Pillow's path reads the size first and raises there."""
    data = bytes(data) if not isinstance(data, bytes) else data  # a bytearray or memoryview: one copy
    if _plain_header(data, max_pixels) is None:
        return None
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    except Exception:  # noqa: BLE001 - corrupt, truncated, only warned about, or not understood
        return None  # (simplejpeg raises KeyError on 4:4:1 sampling): Pillow decides


def plain_jpeg_shape(data: bytes, max_pixels: int) -> tuple[int, int, int] | None:
    """The shape of ``data``'s pixels when it is a plain JPEG (``decode_plain_jpeg``'s) that a GPU's
    JPEG engines decode as libjpeg-turbo does: baseline in one scan, YCbCr with 4:4:4, 4:2:2 or 4:2:0 chroma,
    its quantization and Huffman tables in it, ending in its end-of-image marker (without them the
    CPU refuses it, where the engines might make pixels up); else None (the CPU decodes it). Reads
    the markers only: a scan that turns out corrupt is found where it is decoded."""
    data = bytes(data) if not isinstance(data, bytes) else data
    if not data.endswith(b"\xff\xd9"):
        return None
    header = _plain_header(data, max_pixels)
    if header is None:
        return None
    height, width, colorspace, subsampling, segments = header
    frames = {m for m, _ in segments if 0xC0 <= m <= 0xCF and m not in (_DHT, 0xC8, 0xCC)}
    if frames != {_BASELINE} or colorspace != "YCbCr" or subsampling not in _DEVICE_SUBSAMPLING \
            or not _one_scan_with_tables(segments):
        return None
    return height, width, 3


def _one_scan_with_tables(segments: list[tuple[int, bytes]]) -> bool:
    """Whether the first scan holds every component of the frame (a baseline JPEG then has no other:
    the engines decode one scan only, and what they do with more is not known), and each
    quantization table the frame's components use, and each Huffman table the scan's use, is defined
    before it (``segments``: ``_upright_segments``)."""
    quant, huffman, used_quant, components = set(), set(), None, 0
    try:
        for marker, segment in segments:
            if marker == _DQT:  # tables of (precision << 4 | id) and 64 values of 1 or 2 bytes
                j = 0
                while j < len(segment):
                    quant.add(segment[j] & 15)
                    j += 1 + (128 if segment[j] >> 4 else 64)
            elif marker == _DHT:  # tables of (class << 4 | id), 16 counts, then the values
                j = 0
                while j + 17 <= len(segment):
                    huffman.add((segment[j] >> 4, segment[j] & 15))
                    j += 17 + sum(segment[j + 1:j + 17])
            elif marker == _BASELINE:  # precision, height, width, components: (id, sampling, quant table)
                components = segment[5]
                used_quant = {segment[5 + 3 * k + 3] for k in range(components)}
            elif marker == _SOS:  # components: (id, dc table << 4 | ac table)
                used = set()
                for k in range(segment[0]):
                    tables = segment[2 + 2 * k]
                    used |= {(0, tables >> 4), (1, tables & 15)}
                return used_quant is not None and segment[0] == components and used_quant <= quant \
                    and used <= huffman
    except IndexError:  # a segment cut short
        return False
    return False


def _plain_header(data: bytes, max_pixels: int) -> tuple[int, int, str, str, list[tuple[int, bytes]]] | None:
    """(height, width, colorspace, subsampling, the segments up to the scan's) of a plain JPEG
    (upright, YCbCr or grayscale, within the pixel limits), or None."""
    if data[:2] != b"\xff\xd8":
        return None
    segments = _upright_segments(data)
    if segments is None:
        return None
    try:
        height, width, colorspace, subsampling = simplejpeg.decode_jpeg_header(data)
    except Exception:  # noqa: BLE001 - corrupt, truncated, or not understood: Pillow decides
        return None
    limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
    if colorspace not in _COLORSPACES or width * height > limit:
        return None
    return height, width, colorspace, str(subsampling), segments


def _upright_segments(data: bytes) -> list[tuple[int, bytes]] | None:
    """The segments (marker, payload) before the scan and the scan's header, when they hold nothing
    that turns the image (Pillow's ``exif_transpose``: EXIF orientation, else XMP's) and no
    multi-picture index (MPO); else None."""
    i, n, exif, segments = 2, len(data), 0, []
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == _SOS:
            segments.append((marker, data[i + 4:i + 2 + ((data[i + 2] << 8) | data[i + 3])]))
            return segments
        if marker == _EOI:
            return segments
        if marker in _STANDALONE:
            i += 2
            continue
        length = (data[i + 2] << 8) | data[i + 3]
        if length < 2 or i + 2 + length > n:
            return None
        segment = data[i + 4:i + 2 + length]
        if marker == _APP1:
            if segment.startswith(b"Exif\x00\x00"):
                exif += 1
                if exif > 1 or _orientation(segment[6:]) != 1:
                    return None
            elif b"Orientation" in segment:  # XMP: Pillow takes tiff:Orientation from it
                return None
        elif marker == _APP2 and segment.startswith(b"MPF\x00"):
            return None
        segments.append((marker, segment))
        i += 2 + length
    return None


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
