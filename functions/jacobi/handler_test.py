"""Tests of jacobi: ``python -m pytest function`` in the built function folder.

The solves need a shim (set ACCEL_SHIM_URL); without one they are skipped.
"""
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest

import accel

from .handler import A_PREFIX, handle


def _event(body, method="POST"):
    return SimpleNamespace(method=method, body=body, headers={"Content-Type": "application/json"}, query={}, path="/")


def _system(n, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.uniform(-1, 1, (n, n))
    a[np.diag_indices(n)] = np.abs(a).sum(axis=1) + 1.0
    return a, rng.uniform(-1, 1, n)


@pytest.fixture()
def context():
    url = os.environ.get("ACCEL_SHIM_URL")
    if not url or not accel.Client(url, timeout=5.0).ready():
        pytest.skip("no ready shim at $ACCEL_SHIM_URL")
    return SimpleNamespace(accel=accel.Client(url, timeout=30.0), call_id="test", hostname="test")


# --- no shim needed: rejected before any call -------------------------------------------
def test_get_is_405():
    assert handle(_event(b"", method="GET"), None)["statusCode"] == 405


@pytest.mark.parametrize("doc", [b"not json", b"[1]", b'{"a": [[1]]}', b'{"a": [[1, 2]], "b": [1]}',
                                 b'{"a": [[1, 0], [0, 1]], "b": [1, 2, 3]}', b'{"a": [[0, 1], [1, 0]], "b": [1, 2]}',
                                 b'{"a": [[1]], "b": [1], "iterations": 0}', b'{"a": [[1]], "b": [1], "iterations": 1.5}',
                                 b'{"a": [["x"]], "b": [1]}'])
def test_malformed_input_is_invalid_input(doc):
    with pytest.raises(accel.InvalidInput):
        handle(_event(doc), None)


# --- through the shim -------------------------------------------------------------------
def test_solves_a_diagonally_dominant_system(context):
    a, b = _system(50)
    result = handle(_event(json.dumps({"a": a.tolist(), "b": b.tolist(), "iterations": 101}).encode()), context)
    assert result["statusCode"] == 200
    body = result["body"]
    assert body["iterations"] == 102 and body["relative_residual"] < 1e-5
    np.testing.assert_allclose(body["x"], np.linalg.solve(a, b), rtol=1e-4, atol=1e-5)


def test_the_matrix_stays_resident_and_per_call_buffers_go(context):
    a, b = _system(20, seed=1)
    doc = json.dumps({"a": a.tolist(), "b": b.tolist(), "iterations": 60}).encode()
    first, second = (handle(_event(doc), context)["body"] for _ in range(2))
    assert first["x"] == second["x"]
    listing = context.accel.list_buffers()
    mine = [info for info in listing if info["key"].startswith(A_PREFIX)]
    assert any(info["const"] and info["size"] == 20 * 20 * 4 for info in mine)
    assert not [info for info in listing if info["key"].startswith("jacobi-") and not info["key"].startswith(A_PREFIX)]
