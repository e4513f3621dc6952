"""The plain-JPEG fast path: the same bytes as Pillow's path wherever it decodes, Pillow's path (and
its errors) wherever it is not sure."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from accel.errors import InvalidInput, PayloadTooLarge
from shim.ops.imaging import decode_image
from shim.ops.jpeg import decode_plain_jpeg, plain_jpeg_shape
from tests.conftest import encode


def pillow_rgb(data: bytes) -> np.ndarray:
    """What the Pillow path computes, written out independently: upright, RGB, uint8 HWC."""
    image = Image.open(io.BytesIO(data))
    return np.asarray((ImageOps.exif_transpose(image) or image).convert("RGB"))


def exif(orientation: int) -> Image.Exif:
    tags = Image.Exif()
    tags[0x0112] = orientation
    tags[0x010F] = "accelshim test"  # Make: the orientation is not the only tag
    return tags


def plain_variants(chelsea: np.ndarray, coffee: np.ndarray) -> dict[str, bytes]:
    odd = chelsea[:297, :443]
    return {
        **{f"chelsea 4:{ss} q{q}": encode(chelsea, "JPEG", quality=q, subsampling=i)
           for i, ss in enumerate(("4:4", "2:2", "2:0")) for q in (40, 95, 100)},
        "coffee": encode(coffee, "JPEG", quality=85),
        "progressive": encode(chelsea, "JPEG", quality=90, progressive=True),
        "optimized": encode(chelsea, "JPEG", quality=90, optimize=True),
        "odd size 4:2:0": encode(np.ascontiguousarray(odd), "JPEG", quality=90),
        "grayscale": encode(np.ascontiguousarray(chelsea[..., 1]), "JPEG", quality=90),
        "EXIF orientation 1": encode(chelsea, "JPEG", quality=90, exif=exif(1)),
        "EXIF without orientation": encode(chelsea, "JPEG", quality=90, exif=Image.Exif()),
        "one pixel": encode(chelsea[:1, :1].copy(), "JPEG"),
    }


def test_plain_jpegs_take_the_fast_path_with_pillows_bytes(chelsea, coffee):
    for name, data in plain_variants(chelsea, coffee).items():
        got = decode_image(data, name, 10**8)
        assert isinstance(got, np.ndarray), f"{name}: not decoded on the fast path"
        want = pillow_rgb(data)
        assert got.dtype == np.uint8 and got.flags.c_contiguous, name
        assert np.array_equal(got, want), f"{name}: {np.abs(got.astype(int) - want).max()} off"


def test_what_the_fast_path_is_not_sure_of_goes_to_pillow(chelsea):
    sideways = np.ascontiguousarray(np.rot90(chelsea))
    mpo = io.BytesIO()
    Image.fromarray(chelsea).save(mpo, "MPO", save_all=True, append_images=[Image.fromarray(sideways)])
    cases = {
        **{f"EXIF orientation {k}": encode(sideways, "JPEG", quality=90, exif=exif(k)) for k in (3, 6, 8)},
        "XMP orientation": encode(chelsea, "JPEG", quality=90, xmp=(
            b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')),
        "CMYK": (lambda out: (Image.fromarray(chelsea).convert("CMYK").save(out, "JPEG", quality=90), out.getvalue())[1])(
            io.BytesIO()),
        "MPO": mpo.getvalue(),
        "PNG": encode(chelsea, "PNG"),
    }
    for name, data in cases.items():
        assert decode_plain_jpeg(data, 10**8) is None, name
        got = decode_image(data, name, 10**8)
        assert isinstance(got, Image.Image), name
        assert np.array_equal(np.asarray(got), pillow_rgb(data)), name
    turned = np.asarray(decode_image(cases["EXIF orientation 6"], "x", 10**8))
    assert turned.shape == chelsea.shape  # turned back upright, as Pillow's path does


def test_broken_jpegs_get_pillows_errors(chelsea):
    data = encode(chelsea, "JPEG", quality=90)
    with pytest.raises(InvalidInput, match="image is a truncated or corrupt image"):
        decode_image(data[:len(data) // 2], "image", 10**8)
    with pytest.raises(InvalidInput, match="image is a truncated or corrupt image"):
        decode_image(b"\xff\xd8\xff\xe0 a JPEG's first bytes, and then nothing", "image", 10**8)
    # libjpeg-turbo only warns about stray bytes before a marker: the fast path leaves it to Pillow
    at = data.index(b"\xff\xc4")
    stray = data[:at] + b"\x00" * 16 + data[at:]
    assert decode_plain_jpeg(stray, 10**8) is None
    assert isinstance(decode_image(stray, "image", 10**8), Image.Image)


def test_jpegs_simplejpeg_cannot_name_or_take_as_given(chelsea):
    """4:4:1 sampling (luma 1x4), which simplejpeg's header call cannot name, decodes through Pillow
    instead of failing; a bytearray or memoryview decodes as its bytes do."""
    data = bytearray(encode(chelsea, "JPEG", quality=90, subsampling=0))
    data[data.index(b"\xff\xc0") + 11] = 0x14  # the first component's sampling factors: 1x4
    got = decode_image(bytes(data), "image", 10**8)
    assert np.array_equal(np.asarray(got), pillow_rgb(bytes(data)))
    tagged = encode(chelsea, "JPEG", quality=90, exif=exif(1))
    for form in (bytearray, memoryview):
        got = decode_image(form(tagged), "image", 10**8)
        assert isinstance(got, np.ndarray) and np.array_equal(got, pillow_rgb(tagged)), form


def test_metadata_libjpeg_skips_does_not_fail_the_image(chelsea):
    """A TEM marker before the frame, which Pillow's marker parser rejects and libjpeg skips: the
    image decodes to the pixels it has without it."""
    data = encode(chelsea, "JPEG", quality=90)
    with_tem = data[:20] + b"\xff\x01" + data[20:]  # after Pillow's 18-byte JFIF APP0
    assert np.array_equal(decode_image(with_tem, "image", 10**8), pillow_rgb(data))


def test_the_pixel_limit_holds_before_decoding(chelsea):
    data = encode(chelsea, "JPEG")
    with pytest.raises(PayloadTooLarge, match=r"image is 451x300 = 135300 pixels, over the limit of 135299"):
        decode_image(data, "image", 451 * 300 - 1)
    assert isinstance(decode_image(data, "image", 451 * 300), np.ndarray)


def test_classify_reads_a_jpeg_as_the_png_of_its_pixels(inproc_client, chelsea):
    """End to end on the CPU: the JPEG (fast path) and a PNG of Pillow's decoding of it (Pillow's
    path) give the very same scores."""
    jpeg = encode(chelsea, "JPEG", quality=90)
    png = encode(pillow_rgb(jpeg), "PNG")
    assert inproc_client.classify(jpeg, top_k=5) == inproc_client.classify(png, top_k=5)


def without_segment(data: bytes, marker: bytes) -> bytes:
    """``data`` without the first segment of ``marker`` (the tables of a DQT or a DHT it defines)."""
    at = data.index(marker)
    rest = data[:at] + data[at + 2 + int.from_bytes(data[at + 2:at + 4], "big"):]
    assert rest.count(marker) == data.count(marker) - 1
    return rest


def first_scan_of_one(data: bytes) -> bytes:
    """``data`` with its first scan's header naming only the first of its components (the scan's
    data left as it is: a baseline JPEG of several scans, as far as its markers tell)."""
    at = data.index(b"\xff\xda")
    length = int.from_bytes(data[at + 2:at + 4], "big")
    payload = data[at + 4:at + 2 + length]
    header = bytes([1]) + payload[1:3] + payload[-3:]  # one component (id, tables), then Ss, Se, Ah/Al
    return data[:at + 2] + (len(header) + 2).to_bytes(2, "big") + header + data[at + 2 + length:]


def test_the_jpegs_left_for_the_gpus_engines_are_baseline_color_plain_ones(chelsea, coffee):
    """``plain_jpeg_shape`` names the shape ``decode_plain_jpeg`` gives, from the markers alone, for
    the plain JPEGs a GPU's JPEG engines decode (baseline, YCbCr, 4:4:4 / 4:2:2 / 4:2:0); the rest
    (progressive, grayscale, anything Pillow decodes) stays with the CPU."""
    variants = plain_variants(chelsea, coffee)
    for name, data in variants.items():
        shape = plain_jpeg_shape(data, 10**8)
        if name in ("progressive", "grayscale"):
            assert shape is None, name
        else:
            assert shape == decode_plain_jpeg(data, 10**8).shape, name
    assert plain_jpeg_shape(variants["coffee"], coffee.shape[0] * coffee.shape[1] - 1) is None  # over the limit
    sideways = np.ascontiguousarray(np.rot90(chelsea))
    cut = variants["coffee"][:len(variants["coffee"]) // 2]  # its markers whole, the scan cut short
    untabled = [without_segment(variants["coffee"], marker) for marker in (b"\xff\xdb", b"\xff\xc4")]  # a table less
    scans = first_scan_of_one(variants["coffee"])  # the engines decode one scan only
    for data in (encode(sideways, "JPEG", quality=90, exif=exif(6)), encode(chelsea, "PNG"), b"", cut, *untabled, scans,
                 b"\xff\xd8\xff\xe0 a JPEG's first bytes, and then nothing"):
        assert plain_jpeg_shape(data, 10**8) is None


def test_gpu_jpeg_without_a_gpu_says_so_and_serves(models_dir, caplog):
    """``--gpu-jpeg`` on a machine without a GPU: logged, and classify decodes on the CPU as before."""
    from shim.config import Settings
    from shim.service import build_service

    caplog.set_level("WARNING", logger="shim.backends")
    svc = build_service(Settings(device="cpu", models_dir=models_dir, gpu_jpeg=True))
    svc.load()
    try:
        op = svc.registry.lookup("classify")
        assert not op.decodes_jpeg and "--gpu-jpeg: no GPU" in caplog.text
        jpeg = np.array([encode(np.zeros((8, 8, 3), np.uint8), "JPEG")], dtype=object)
        assert all(isinstance(item, np.ndarray) for item in op._prepare(jpeg))  # noqa: SLF001 - decoded here
    finally:
        svc.registry.close()
