"""The numpy twin of the CUDA resize kernels against Pillow: byte for byte, in Pillow's pass order."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from shim.kernels.resample import crop_box, normalize, pillow_preprocess, plan, resize_reference
from shim.modelrepo import Preprocessing

SHAPES = [(300, 451), (400, 600), (224, 224), (256, 256), (97, 301), (1000, 37), (3, 5), (640, 100),
          (100, 640), (201, 143), (176, 141), (485, 340), (2000, 1500)]


def _pillow(pixels: np.ndarray, pre: Preprocessing) -> np.ndarray:
    image = Image.fromarray(pixels)
    return np.asarray(image.resize((pre.size, pre.size), Image.Resampling.BICUBIC,
                                   box=crop_box(*image.size, pre.crop)))


@pytest.mark.parametrize("crop", [0.875, 1.0, 0.5])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_resize_reference_is_pillow_exactly(shape, crop):
    pixels = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    pre = Preprocessing(crop=crop)
    assert np.array_equal(resize_reference(pixels, pre), _pillow(pixels, pre))


def test_random_sizes_and_photos(chelsea, coffee):
    rng = np.random.default_rng(7)
    images = [chelsea, coffee] + [rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                                  for h, w in rng.integers(2, 900, (40, 2))]
    pre = Preprocessing()
    for pixels in images:
        assert np.array_equal(resize_reference(pixels, pre), _pillow(pixels, pre)), pixels.shape


def test_both_pass_orders_occur():
    """Pillow runs the vertical pass first when the height shrinks much more than the width."""
    pre = Preprocessing()
    assert [p.axis for p in plan(451, 300, pre)] == [1, 0]
    assert [p.axis for p in plan(37, 1000, pre)] == [0, 1]
    assert [p.axis for p in plan(224, 224, Preprocessing(crop=1.0))] == [0]  # nothing to do: identity


def test_preprocess_is_normalized_resize(chelsea):
    pre = Preprocessing()
    x = pillow_preprocess(Image.fromarray(chelsea), pre)
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    assert np.array_equal(x, normalize(resize_reference(chelsea, pre), pre))
    assert x.min() >= -127 / 128 and x.max() <= 128 / 128
