"""classify's top-k: the best classes of each row, best first, ties to the lower index."""
from __future__ import annotations

import numpy as np
import pytest

from shim.ops.classify import PARTITION_ROWS, top_k_order, top_k_softmax


def _stable(p: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-p, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("seed", range(4))
def test_the_order_is_a_stable_descending_sorts_first_k_with_ties_or_without(seed):
    rng = np.random.default_rng(seed)
    for trial in range(500):
        rows, n = int(rng.integers(1, 4 * PARTITION_ROWS)), int(rng.integers(1, 60))  # most partition
        # small integers tie often, at the k-th value too; uniform floats almost never
        p = rng.integers(0, 4, (rows, n)).astype(np.float64) if trial % 2 else rng.random((rows, n))
        k = int(rng.integers(1, n + 1))
        assert np.array_equal(top_k_order(p, k), _stable(p, k)), (p, k)


def test_rows_with_nan_or_ties_order_as_the_stable_sort_does_beside_plain_rows():
    p = np.array([[0.1, np.nan, 0.7, 0.2], [0.25, 0.25, 0.25, 0.25], [np.nan] * 4, [0.1, 0.4, 0.2, 0.3]])
    assert np.array_equal(top_k_order(p, 2), _stable(p, 2))
    assert top_k_order(p, 2).tolist() == [[2, 3], [0, 1], [0, 1], [1, 3]]
    assert top_k_order(p, 0).shape == (4, 0)


def test_top_k_softmax_of_imagenet_sized_logits_is_the_full_softmax_cut_to_k():
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(32, 1000)).astype(np.float32)
    labels = np.array([f"class {i}".encode() for i in range(1000)], dtype=object)
    out = top_k_softmax(logits, 5, labels)
    z = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    full = z / z.sum(axis=1, keepdims=True)
    expect = _stable(full, 5)
    assert np.array_equal(out["classes"], expect)
    assert np.allclose(out["scores"], np.take_along_axis(full, expect, 1), rtol=1e-6)
    assert out["labels"][3, 0] == f"class {expect[3, 0]}".encode()
    assert (np.diff(out["scores"], axis=1) <= 0).all()
