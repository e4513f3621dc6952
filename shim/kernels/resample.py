"""Image preprocessing for the classifier: Pillow's resampling, as a numpy twin of ``resample.cu``.

Pillow resizes 8-bit images in two separable passes (horizontal over the rows the vertical pass
needs, then vertical), with filter weights normalised and rounded to fixed point
(``PRECISION_BITS`` = 22) and every pass rounded back to uint8 (Pillow 13's pass order included). ``coefficients`` computes those
weights exactly as Pillow's ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` do (same float
operations, same order), so ``resize_reference`` here and the CUDA kernels in ``resample.cu``
(which take the same coefficients) produce Pillow's bytes exactly; ``pillow_preprocess`` is the
path the CPU backend runs, and the reference both are tested against.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

from ..modelrepo import Preprocessing

Picture = Union[Image.Image, np.ndarray]  # a decoded RGB image: Pillow's, or uint8 HWC
PRECISION_BITS = 22
CUDA_SOURCE = Path(__file__).with_name("resample.cu")
_SUPPORT = {"bicubic": 2.0, "bilinear": 1.0}
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}


def crop_box(width: int, height: int, crop: float) -> tuple[float, float, float, float]:
    """The centred square of side ``crop * min(width, height)``, as Pillow's resize box."""
    side = crop * min(width, height)
    return ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)


def pillow_preprocess(image: Picture, pre: Preprocessing) -> np.ndarray:
    """Center crop, resize to ``pre.size`` (Pillow), ``(x - mean) / std``: float32 CHW (or HWC), RGB."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    box = crop_box(*image.size, pre.crop)
    resized = image.resize((pre.size, pre.size), _RESAMPLE[pre.resize], box=box)
    return normalize(np.asarray(resized), pre)


def rgb_pixels(image: Picture) -> np.ndarray:
    """A decoded RGB image as contiguous uint8 HWC (an array is passed through): what the GPU
    pipeline takes up to resize there."""
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))


def normalize(pixels: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """uint8 HWC -> float32 ``(x - mean) / std`` in ``pre.layout`` (the CUDA kernel's last step)."""
    x = (pixels.astype(np.float32) - np.float32(pre.mean)) / np.float32(pre.std)
    return np.ascontiguousarray(x.transpose(2, 0, 1)) if pre.layout == "NCHW" else x


def _filter(x: np.ndarray, kind: str) -> np.ndarray:
    x = np.abs(x)
    if kind == "bilinear":
        return np.where(x < 1.0, 1.0 - x, 0.0)
    a = -0.5  # Pillow's bicubic
    return np.where(x < 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1,
                    np.where(x < 2.0, (((x - 5) * x + 8) * x - 4) * a, 0.0))


@lru_cache(maxsize=512)
def coefficients(in_size: int, in0: float, in1: float, out_size: int,
                 kind: str = "bicubic") -> tuple[np.ndarray, np.ndarray]:
    """Pillow's resampling weights for one axis.

    Returns:
        ``bounds`` int32 [out_size, 2] (first input pixel, count) and ``weights`` int32
        [out_size, ksize] in fixed point, zero past each count.
    """
    if kind not in _SUPPORT:
        raise ValueError(f"GPU resampling supports {', '.join(_SUPPORT)}, not {kind!r}")
    scale = (in1 - in0) / out_size
    filterscale = max(scale, 1.0)
    support = _SUPPORT[kind] * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = in0 + (np.arange(out_size) + 0.5) * scale
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)      # C's (int) truncates
    xmax = np.minimum((center + support + 0.5).astype(np.int64), in_size) - xmin
    taps = np.arange(ksize)
    w = _filter((taps[None, :] + xmin[:, None] - center[:, None] + 0.5) * (1.0 / filterscale), kind)
    w = np.where(taps[None, :] < xmax[:, None], w, 0.0)
    total = np.zeros(out_size)
    for j in range(ksize):  # summed in Pillow's order: the rounding below depends on it
        total += w[:, j]
    w = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)
    scaled = w * (1 << PRECISION_BITS)
    fixed = np.where(w < 0, -0.5 + scaled, 0.5 + scaled).astype(np.int32)  # truncation, as C's (int)
    bounds = np.stack([xmin, xmax], axis=1).astype(np.int32)
    return bounds, np.ascontiguousarray(fixed)


def identity(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients of a pass Pillow skips (same size, whole box): each output is its input."""
    bounds = np.stack([np.arange(size), np.ones(size, dtype=np.int64)], axis=1).astype(np.int32)
    return bounds, np.full((size, 1), 1 << PRECISION_BITS, dtype=np.int32)


@dataclass(frozen=True)
class Pass:
    """One pass of a resize: ``axis`` 1 resamples along each row (horizontal), 0 along each column.

    A horizontal pass reads input rows ``[first, last)`` (the ones the vertical pass after it needs).
    """

    axis: int
    bounds: np.ndarray
    weights: np.ndarray
    first: int = 0
    last: int = 0


def plan(width: int, height: int, pre: Preprocessing) -> list[Pass]:
    """The passes of Pillow's resize of a ``width`` x ``height`` image to ``pre`` (crop box included),
    in Pillow's order (vertical first when the height shrinks more than twice as much as the width);
    never empty: a resize that changes nothing is one identity pass."""
    x0, y0, x1, y1 = crop_box(width, height, pre.crop)
    size = pre.size
    need_h = size != width or x0 != 0 or x1 != size
    need_v = size != height or y0 != 0 or y1 != size
    horizontal_first = not (height - size > 0 and height - size > (width - size) * 2)
    vertical = coefficients(height, y0, y1, size, pre.resize) if need_v else None
    horizontal = coefficients(width, x0, x1, size, pre.resize) if need_h else None
    passes: list[Pass] = []
    if horizontal is not None and horizontal_first:
        first, last = 0, height
        if vertical is not None:
            vb, vw = vertical
            first, last = int(vb[0, 0]), int(vb[-1, 0] + vb[-1, 1])
            vb = vb.copy()
            vb[:, 0] -= first
            vertical = (vb, vw)
        passes.append(Pass(1, *horizontal, first, last))
    if vertical is not None:
        passes.append(Pass(0, *vertical))
    if horizontal is not None and not horizontal_first:
        passes.append(Pass(1, *horizontal, 0, size))
    return passes or [Pass(0, *identity(size))]


def _pass(pixels: np.ndarray, bounds: np.ndarray, weights: np.ndarray, axis: int) -> np.ndarray:
    """One fixed-point pass along ``axis`` (1: columns of each row, 0: rows of each column)."""
    acc = np.full(pixels.shape[:axis] + (len(bounds),) + pixels.shape[axis + 1:], 1 << (PRECISION_BITS - 1),
                  dtype=np.int64)
    limit = pixels.shape[axis] - 1
    for j in range(weights.shape[1]):
        idx = np.minimum(bounds[:, 0] + j, limit)  # weights are zero past each count
        taken = np.take(pixels, idx, axis=axis).astype(np.int64)
        shape = [1] * pixels.ndim
        shape[axis] = len(bounds)
        acc += taken * weights[:, j].reshape(shape)
    return np.clip(acc >> PRECISION_BITS, 0, 255).astype(np.uint8)


def resize_reference(pixels: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """The numpy twin of the CUDA kernels: uint8 HWC in, Pillow's resized uint8 HWC out."""
    for step in plan(pixels.shape[1], pixels.shape[0], pre):
        source = pixels[step.first:step.last] if step.axis == 1 else pixels
        pixels = _pass(source, step.bounds, step.weights, step.axis)
    return pixels
