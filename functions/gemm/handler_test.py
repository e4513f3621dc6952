"""Tests of gemm: ``python -m pytest function`` in the built function folder.

The products need a shim (set ACCEL_SHIM_URL); without one they are skipped.
"""
import io
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest

import accel

from .handler import handle


def _event(body, content_type="application/json", method="POST", **query):
    return SimpleNamespace(method=method, body=body, headers={"Content-Type": content_type}, query=query, path="/")


def _npz(**arrays):
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


@pytest.fixture()
def context():
    url = os.environ.get("ACCEL_SHIM_URL")
    if not url or not accel.Client(url, timeout=5.0).ready():
        pytest.skip("no ready shim at $ACCEL_SHIM_URL")
    return SimpleNamespace(accel=accel.Client(url, timeout=30.0), call_id="test", hostname="test")


# --- no shim needed: rejected before any call -------------------------------------------
def test_get_is_405():
    assert handle(_event(b"", method="GET"), None)["statusCode"] == 405


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'{"a": [[1]]}', b'{"a": [[1, 2], [3]], "b": [[1]]}',
                                  b'{"a": [1, 2], "b": [[1]]}', b'{"a": [[1]], "b": [[1]], "dtype": "int8"}'])
def test_malformed_json_is_invalid_input(body):
    with pytest.raises(accel.InvalidInput):
        handle(_event(body), None)


def test_npz_without_b_is_invalid_input():
    with pytest.raises(accel.InvalidInput, match="a and b"):
        handle(_event(_npz(a=np.eye(2)), "application/x-npz"), None)


# --- through the shim -------------------------------------------------------------------
def test_json_product(context):
    a, b = [[1, 2], [3, 4], [5, 6]], [[1, 0, 2], [0, 1, 3]]
    result = handle(_event(json.dumps({"a": a, "b": b}).encode()), context)
    assert result["statusCode"] == 200
    np.testing.assert_allclose(result["body"]["c"], np.array(a) @ np.array(b))


def test_json_alpha_beta_c_float64(context):
    rng = np.random.default_rng(0)
    a, b, c = rng.standard_normal((4, 5)), rng.standard_normal((5, 3)), rng.standard_normal((4, 3))
    doc = {"a": a.tolist(), "b": b.tolist(), "c": c.tolist(), "alpha": 2.0, "beta": -1.0, "dtype": "float64"}
    result = handle(_event(json.dumps(doc).encode()), context)
    np.testing.assert_allclose(result["body"]["c"], 2.0 * a @ b - c, rtol=1e-12)


def test_npz_gives_npy(context):
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((16, 8), dtype=np.float32), rng.standard_normal((8, 4), dtype=np.float32)
    result = handle(_event(_npz(a=a, b=b), "application/x-npz", alpha="0.5"), context)
    assert result["headers"]["Content-Type"] == "application/x-npy"
    c = np.load(io.BytesIO(result["body"]), allow_pickle=False)
    assert c.dtype == np.float32 and c.shape == (16, 4)
    np.testing.assert_allclose(c, 0.5 * a @ b, rtol=1e-5, atol=1e-5)


def test_shapes_that_do_not_fit_are_invalid_input(context):
    with pytest.raises(accel.InvalidInput, match="rows"):
        handle(_event(json.dumps({"a": [[1, 2]], "b": [[1, 2]]}).encode()), context)
