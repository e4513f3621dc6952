"""classify with the real EfficientNet-Lite0 on scikit-image's photos, through the real stack."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tests.conftest import CAT_LABELS, encode


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF"])
def test_chelsea_is_a_cat_in_every_format(inproc_client, chelsea, fmt):
    predictions = inproc_client.classify(encode(chelsea, fmt), top_k=5)
    assert predictions[0].label in CAT_LABELS
    assert len(predictions) == 5
    scores = [p.score for p in predictions]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0 + 1e-6


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_coffee_is_espresso(inproc_client, coffee, fmt):
    top = inproc_client.classify(encode(coffee, fmt), top_k=1)
    assert [(p.label, p.index) for p in top] == [("espresso", 967)]
    assert top[0].score > 0.5


def test_batch_of_both_matches_single_calls(inproc_client, chelsea, coffee):
    cat, cup = encode(chelsea, "JPEG"), encode(coffee, "PNG")
    batch = inproc_client.classify([cat, cup, cat], top_k=3)
    assert [b[0].label in CAT_LABELS for b in batch] == [True, False, True]
    assert batch[1][0].label == "espresso"
    single = inproc_client.classify(cup, top_k=3)
    assert [p.index for p in single] == [p.index for p in batch[1]]
    assert np.allclose([p.score for p in single], [p.score for p in batch[1]], atol=1e-5)


def test_top_k_full_distribution_sums_to_one(inproc_client, coffee):
    predictions = inproc_client.classify(encode(coffee, "JPEG"), top_k=1000)
    assert len(predictions) == 1000 and len({p.index for p in predictions}) == 1000
    assert abs(sum(p.score for p in predictions) - 1.0) < 1e-4


def test_exif_rotation_is_applied(inproc_client, coffee):
    """A JPEG stored sideways with EXIF orientation 6 classifies like the upright photo."""
    sideways = np.ascontiguousarray(np.rot90(coffee))  # 90 degrees counter-clockwise
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    upright = inproc_client.classify(encode(coffee, "PNG"), top_k=1)[0]
    tagged = inproc_client.classify(encode(sideways, "PNG", exif=exif), top_k=1)[0]
    untagged = inproc_client.classify(encode(sideways, "PNG"), top_k=1)[0]
    assert tagged.index == upright.index == 967
    assert abs(tagged.score - upright.score) < 1e-4  # lossless: the same pixels after rotation
    assert abs(untagged.score - upright.score) > 1e-3  # without the tag the model sees another picture


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_other_colour_modes_are_converted(inproc_client, chelsea, mode):
    image = Image.fromarray(chelsea).convert(mode)
    fmt = "JPEG" if mode in ("L", "CMYK") else "PNG"
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    top = inproc_client.classify(buf.getvalue(), top_k=5)
    assert CAT_LABELS & {p.label for p in top}


def test_raw_model_agrees_with_classify(inproc_client, service, coffee):
    """The raw model served by name gives the logits that classify turned into probabilities."""
    from shim.kernels.resample import pillow_preprocess as preprocess
    from shim.ops.imaging import decode_image

    op = service.registry.get("classify")
    x = preprocess(decode_image(encode(coffee, "PNG"), "coffee", 10**8), op.config.preprocessing)[None]
    logits = inproc_client.infer("efficientnet-lite0", {"input": x})["logits"]
    assert logits.shape == (1, 1000) and logits.dtype == np.float32
    p = np.exp(logits[0] - logits[0].max())
    p /= p.sum()
    top = inproc_client.classify(encode(coffee, "PNG"), top_k=1)[0]
    assert int(p.argmax()) == top.index and abs(float(p.max()) - top.score) < 1e-5
