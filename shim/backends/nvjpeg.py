"""nvJPEG's batched decode on a GPU's JPEG engines (its hardware backend) through ctypes: the few
calls ``cuda_jpeg`` makes, with no Python object per image and one release of the interpreter lock
per batch (nvImageCodec's Python binding, used before, made several objects per image and let go of
the lock about six times for each).

The library comes from the ``nvidia-nvjpeg`` wheel (``nvidia/cu13/lib/libnvjpeg.so.13`` on the
path) or the system's loader. Calls that only read a header or reset a state keep the lock
(``PyDLL``); the decode, which parses every bitstream and queues the engines' work, lets go of it.
Nothing here imports cupy: what needs a GPU fails with ``NvjpegError``, on any machine.
"""
from __future__ import annotations

import ctypes
import sys
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np

BACKEND_HARDWARE = 3  # NVJPEG_BACKEND_HARDWARE: the JPEG engines (baseline, one scan)
OUTPUT_RGBI = 5  # NVJPEG_OUTPUT_RGBI: interleaved RGB in the first channel
CSS_444 = 0  # NVJPEG_CSS_444
# NVJPEG_FLAGS_UPSAMPLING_WITH_INTERPOLATION: chroma upsampled as libjpeg's "fancy" upsampling does (without it
# the H200's engines gave the cat photo 14 off libjpeg-turbo's pixels, a gradient 84; nvImageCodec sets it too)
FLAGS = 1 << 5
# decoded pixels one batched decode takes at most (a larger JPEG goes alone): a decode state keeps the room
# its largest call needed, outside cupy's pool and --gpu-memory-limit, not in proportion to the pixels (on
# the H200 a call of 32 12-megapixel JPEGs grew a state by 556 MiB; calls of five of them, under this budget,
# by about 200 MiB each); 1 << 26 takes 32 1080p frames in one call
CALL_PIXELS = 1 << 26
_STATUS = ("SUCCESS", "NOT_INITIALIZED", "INVALID_PARAMETER", "BAD_JPEG", "JPEG_NOT_SUPPORTED", "ALLOCATOR_FAILURE",
           "EXECUTION_FAILED", "ARCH_MISMATCH", "INTERNAL_ERROR", "IMPLEMENTATION_NOT_SUPPORTED",
           "INCOMPLETE_BITSTREAM")
_NAMES = ("libnvjpeg.so.13", "libnvjpeg.so.12", "libnvjpeg.so")  # the loader's, after the wheel's


Jpeg = Union[bytes, memoryview]  # a JPEG's bytes (a memoryview: flat bytes, kept alive by the caller)


def address(data: Jpeg) -> bytes | int:
    """What ctypes passes as ``data``'s address: ``bytes`` as they are, a memoryview's first byte (the
    caller keeps it alive; read-only too: unpickled out-of-band buffers are). No copy is made: the
    decode reads the bytes after the call returns.

    Raises:
        TypeError: a memoryview that is not of flat bytes (one dimension of one-byte items, contiguous,
            not empty: its ``len`` is its size), or another type.
    """
    if type(data) is bytes:
        return data
    if type(data) is not memoryview or data.ndim != 1 or data.itemsize != 1 or not data.c_contiguous \
            or not data.nbytes:
        raise TypeError(f"a JPEG's bytes must be bytes or a memoryview of flat bytes, not {_described(data)}")
    return np.frombuffer(data, np.uint8).ctypes.data


def _described(data: object) -> str:
    """What ``data`` is, not what it holds (an error message must not carry the image)."""
    if type(data) is memoryview:
        return f"a {data.ndim}-dimensional memoryview of format {data.format!r}, {data.nbytes} bytes"
    return type(data).__name__


class NvjpegError(RuntimeError):
    """An nvJPEG call returned a status other than success (``status``)."""

    def __init__(self, call: str, status: int) -> None:
        name = _STATUS[status] if 0 <= status < len(_STATUS) else "unknown"
        super().__init__(f"{call} failed: NVJPEG_STATUS_{name} ({status})")
        self.status = status


class Image(ctypes.Structure):
    """``nvjpegImage_t``: a pointer and a pitch per channel (RGBI uses the first)."""

    _fields_ = [("channel", ctypes.c_void_p * 4), ("pitch", ctypes.c_size_t * 4)]


def split_calls(pixels: Sequence[int], budget: int = CALL_PIXELS) -> list[range]:
    """The images, by their pixel counts in order, as consecutive runs of at most ``budget`` pixels
    each (an image over it alone): one batched decode each."""
    calls: list[range] = []
    first, total = 0, 0
    for index, count in enumerate(pixels):
        if index > first and total + count > budget:
            calls.append(range(first, index))
            first, total = index, 0
        total += count
    if first < len(pixels):
        calls.append(range(first, len(pixels)))
    return calls


def decode_in_calls(pixels: Sequence[int], budget: int, run: Callable[[list[int]], bool]) -> list[int]:
    """Decode images (by their pixel counts, in order) with ``run(indices) -> whether it succeeded``:
    in the calls ``split_calls`` gives, a call that fails again image by image. Returns the indices
    that failed, in order."""
    failed: list[int] = []
    for call in split_calls(pixels, budget):
        rows = list(call)
        if not run(rows):
            failed += [i for i in rows if len(rows) == 1 or not run([i])]
    return failed


def library_path() -> str | None:
    """The wheel's ``libnvjpeg.so.*`` under an ``nvidia/*/lib`` folder on ``sys.path`` (CUDA 13's
    first), else None (the loader's search then)."""
    for entry in sys.path:
        found = sorted(Path(entry or ".").glob("nvidia/cu*/lib/libnvjpeg.so.*"), reverse=True)
        if found:
            return str(found[0])
    return None


def _load(path: str | None) -> tuple[ctypes.CDLL, ctypes.PyDLL]:
    """The library twice: calls that let go of the interpreter lock, and calls that keep it."""
    errors = []
    for name in ([path] if path else []) + list(_NAMES):
        try:
            return ctypes.CDLL(name), ctypes.PyDLL(name)
        except OSError as exc:
            errors.append(str(exc))
    raise OSError("libnvjpeg not found (install the nvidia-nvjpeg wheel): " + "; ".join(errors))


_vp, _size, _int, _ints = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.POINTER(ctypes.c_int)
# (keeps the interpreter lock, name, argument types): every call made, each returning an nvjpegStatus_t
SIGNATURES = (
    (False, "nvjpegCreateEx", [_int, _vp, _vp, ctypes.c_uint, ctypes.POINTER(_vp)]),
    (False, "nvjpegJpegStateCreate", [_vp, ctypes.POINTER(_vp)]),
    (False, "nvjpegJpegStateDestroy", [_vp]),
    (False, "nvjpegDecodeBatchedPreAllocate", [_vp, _vp, _int, _int, _int, _int, _int]),
    (True, "nvjpegGetImageInfo", [_vp, _vp, _size, _ints, _ints, _ints, _ints]),
    (True, "nvjpegDecodeBatchedInitialize", [_vp, _vp, _int, _int, _int]),
    (False, "nvjpegDecodeBatched", [_vp, _vp, _vp, _vp, _vp, _vp]),
)


class Nvjpeg:
    """One nvJPEG handle on the hardware backend. Its states (``state``) are one per thread at a time,
    the handle shared (nvJPEG's thread-safety rules).

    Raises (constructor):
        OSError: the library cannot be loaded, or lacks a call used here.
        NvjpegError: no handle on the engines (no GPU, no driver, a GPU without JPEG engines).
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = path or library_path()
        self._free, self._held = _load(self.path)
        self._calls = {}
        for keeps_lock, name, args in SIGNATURES:
            try:
                call = getattr(self._held if keeps_lock else self._free, name)
            except AttributeError:
                raise OSError(f"{self.path or 'libnvjpeg'} has no {name}") from None
            call.argtypes, call.restype = args, ctypes.c_int
            self._calls[name] = call
        handle = ctypes.c_void_p()
        self._check("nvjpegCreateEx", BACKEND_HARDWARE, None, None, FLAGS, ctypes.byref(handle))
        self.handle = handle.value

    def _check(self, name: str, *args: object) -> None:
        status = self._calls[name](*args)
        if status:
            raise NvjpegError(name, status)

    def state(self) -> int:
        """A new decode state on the engines' memory pool (preallocated for one 1 x 1 image, then grown
        as needed: nvImageCodec found the pool much faster)."""
        state = ctypes.c_void_p()
        self._check("nvjpegJpegStateCreate", self.handle, ctypes.byref(state))
        try:
            self._check("nvjpegDecodeBatchedPreAllocate", self.handle, state, 1, 1, 1, CSS_444, OUTPUT_RGBI)
        except NvjpegError:
            self.destroy_state(state.value)  # type: ignore[arg-type]
            raise
        return state.value  # type: ignore[return-value]

    def destroy_state(self, state: int) -> None:
        self._check("nvjpegJpegStateDestroy", state)

    def shape(self, data: Jpeg) -> tuple[int, int, int] | None:
        """The (height, width, components) nvJPEG reads in ``data``'s header, or None where it cannot."""
        components, subsampling = ctypes.c_int(), ctypes.c_int()
        widths, heights = (ctypes.c_int * 4)(), (ctypes.c_int * 4)()
        if self._calls["nvjpegGetImageInfo"](self.handle, address(data), len(data), ctypes.byref(components),
                                             ctypes.byref(subsampling), widths, heights):
            return None
        return heights[0], widths[0], components.value

    def decode_batch(self, state: int, jpegs: Sequence[Jpeg], targets: Sequence[int], widths: Sequence[int],
                     stream: int) -> None:
        """Queue the decode of ``jpegs`` on ``stream``, each to interleaved RGB rows end to end at device
        address ``targets[i]``, room for its height x ``widths[i]`` x 3 bytes (``shape``'s). ``state``
        and the JPEGs' bytes must stay untouched until the stream has done it.

        Raises:
            NvjpegError: the batch was refused or failed (any of its JPEGs); its targets hold anything.
        """
        n = len(jpegs)
        self._check("nvjpegDecodeBatchedInitialize", self.handle, state, n, 1, OUTPUT_RGBI)
        images = (Image * n)()
        for image, target, width in zip(images, targets, widths):
            image.channel[0] = target
            image.pitch[0] = width * 3
        self._check("nvjpegDecodeBatched", self.handle, state, (ctypes.c_char_p * n)(*map(address, jpegs)),
                    (ctypes.c_size_t * n)(*map(len, jpegs)), images, stream)
