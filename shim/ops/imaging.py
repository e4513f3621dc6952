"""Image decoding (always on the CPU): encoded bytes to an upright RGB image. Plain JPEGs go
straight to a uint8 HWC array (``jpeg.decode_plain_jpeg``); everything else through Pillow."""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from accel.errors import InvalidInput, PayloadTooLarge

from ..kernels.resample import Picture
from .jpeg import decode_plain_jpeg


FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
ImageFile.LOAD_TRUNCATED_IMAGES = False


def decode_image(data: bytes, what: str, max_pixels: int) -> Picture:
    """Decode an encoded image to RGB, EXIF rotation applied, alpha composited over white: a
    plain JPEG to uint8 HWC (the bytes Pillow would give), anything else to a Pillow image.

    Raises:
        InvalidInput: not an image of an accepted format, or truncated/corrupt.
        PayloadTooLarge: more than ``max_pixels`` pixels (checked before any pixel is decoded).
    """
    if not data:
        raise InvalidInput(f"{what} is empty, not an image")
    pixels = decode_plain_jpeg(data, max_pixels)
    if pixels is not None:
        return pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise PayloadTooLarge(f"{what} is {width}x{height} = {width * height} pixels, over the "
                                      f"limit of {max_pixels}")
            image.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        if isinstance(exc, UnidentifiedImageError):
            raise InvalidInput(f"{what} is not an image in a supported format ({', '.join(FORMATS)})") from None
        raise PayloadTooLarge(f"{what}: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidInput(f"{what} is a truncated or corrupt image: {exc}") from None
    image = ImageOps.exif_transpose(image) or image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(canvas, rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


def sample_png(size: int = 64, image_format: str = "PNG") -> bytes:
    """A small synthetic RGB gradient as PNG (or ``image_format``: a baseline JPEG), for warm-up."""
    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    rgb = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], ramp[::-1][None, :]), axis=-1)
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(out, format=image_format)
    return out.getvalue()
