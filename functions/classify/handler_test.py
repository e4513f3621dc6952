"""Tests of classify: ``python -m pytest function`` in the built function folder.

The classifications need a shim (set ACCEL_SHIM_URL); without one they are skipped.
"""
import os
import struct
import zlib
from types import SimpleNamespace

import pytest

import accel

from .handler import handle


def _event(body=b"", method="POST", **query):
    return SimpleNamespace(method=method, body=body, headers={}, query=query, path="/")


def _png(width=64, height=48):
    """A small RGB gradient as PNG, made with the standard library alone."""
    rows = b"".join(b"\0" + b"".join(bytes((x * 4 % 256, y * 5 % 256, 128)) for x in range(width))
                    for y in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


@pytest.fixture()
def context():
    url = os.environ.get("ACCEL_SHIM_URL")
    if not url or not accel.Client(url, timeout=5.0).ready():
        pytest.skip("no ready shim at $ACCEL_SHIM_URL")
    return SimpleNamespace(accel=accel.Client(url, timeout=30.0), call_id="test", hostname="test")


# --- no shim needed: these are answered before any call ---------------------------------
def test_get_is_405():
    result = handle(_event(method="GET"), None)
    assert result["statusCode"] == 405 and result["headers"]["Allow"] == "POST"


@pytest.mark.parametrize("top_k", ["x", "0", "1001"])
def test_bad_top_k_is_400(top_k):
    result = handle(_event(b"img", top_k=top_k), None)
    assert result["statusCode"] == 400 and "top_k" in result["body"]["error"]


def test_empty_body_is_400():
    result = handle(_event(b""), None)
    assert result["statusCode"] == 400 and "empty" in result["body"]["error"]


# --- through the shim -------------------------------------------------------------------
def test_png_gets_top_k_predictions(context):
    result = handle(_event(_png(), top_k="3"), context)
    assert result["statusCode"] == 200
    predictions = result["body"]["predictions"]
    assert len(predictions) == 3
    assert all(set(p) == {"label", "score", "index"} for p in predictions)
    scores = [p["score"] for p in predictions]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001


def test_text_body_is_400_saying_it_is_not_an_image(context):
    result = handle(_event(b"this is text, not a picture"), context)
    assert result["statusCode"] == 400
    assert "not an image" in result["body"]["error"]
