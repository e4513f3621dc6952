"""gemm against a float64 numpy reference, every dtype, many shapes, through the real stack."""
from __future__ import annotations

import numpy as np
import pytest

import accel
from shim.backends.cpu import gemm_reference

SHAPES = [(1, 1, 1), (1, 7, 1), (64, 64, 64), (257, 3, 5), (3, 300, 2), (200, 16, 1), (1, 16, 300), (96, 128, 80)]
TOLERANCE = {np.float16: 2e-2, np.float32: 1e-5, np.float64: 1e-12}


def reference(a, b, c, alpha, beta):
    out = alpha * (a.astype(np.float64) @ b.astype(np.float64))
    if c is not None:
        out += beta * c.astype(np.float64)
    return out


def rel_err(got, want) -> float:
    return float(np.abs(got.astype(np.float64) - want).max() / max(np.abs(want).max(), 1e-30))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_gemm_matches_float64_reference(inproc_client, dtype, m, k, n):
    rng = np.random.default_rng(m * 1000 + k * 10 + n)
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    got = inproc_client.gemm(a, b)
    assert got.dtype == dtype and got.shape == (m, n)
    assert rel_err(got, reference(a, b, None, 1.0, 0.0)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_gemm_alpha_beta_c(inproc_client, dtype):
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((33, 17)).astype(dtype), rng.standard_normal((17, 9)).astype(dtype)
    c = rng.standard_normal((33, 9)).astype(dtype)
    got = inproc_client.gemm(a, b, c, alpha=-0.5, beta=2.0)
    assert rel_err(got, reference(a, b, c, -0.5, 2.0)) <= TOLERANCE[dtype]
    # beta defaults to 0: C is ignored
    assert rel_err(inproc_client.gemm(a, b, c, alpha=3.0), reference(a, b, None, 3.0, 0.0)) <= TOLERANCE[dtype]


def test_gemm_json_and_binary_agree(service, inproc_client):
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((20, 30)), rng.standard_normal((30, 10))
    json_client = accel.Client("http://in-process", transport=inproc_client._transport, binary=False)
    np.testing.assert_array_equal(json_client.gemm(a, b), inproc_client.gemm(a, b))


def test_cpu_backend_fp16_accumulates_in_fp32():
    # 4096 ones summed: an FP16 accumulator would stall at 2048
    a = np.ones((1, 4096), dtype=np.float16)
    b = np.ones((4096, 1), dtype=np.float16)
    assert gemm_reference(a, b, None, 1.0, 0.0)[0, 0] == 4096


@pytest.mark.parametrize("dtype,precision", [(np.float16, "default"), (np.float32, "default"), (np.float32, "tf32"),
                                             (np.float64, "default")])
@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (-0.5, 2.0)])
def test_cpu_gemm_into_out_computes_the_same_values(dtype, precision, alpha, beta):
    """``out=`` (the shared-memory destination) changes where the result goes, never its values: the
    same bits as without it, into an aligned array, a misaligned one, and over the input C itself."""
    from shim.backends.cpu import CpuBackend

    rng = np.random.default_rng(11)
    a, b = rng.standard_normal((45, 70)).astype(dtype), rng.standard_normal((70, 33)).astype(dtype)
    c = rng.standard_normal((45, 33)).astype(dtype)
    want = CpuBackend().gemm(a, b, c, alpha, beta, precision)
    assert np.array_equal(want, gemm_reference(a, b, c, alpha, beta, precision))
    aligned = np.full((45, 33), np.nan, dtype)
    raw = bytearray(aligned.nbytes + 1)
    misaligned = np.frombuffer(memoryview(raw)[1:], dtype).reshape(45, 33)
    assert not misaligned.flags.aligned
    in_place = c.copy()  # C = alpha A @ B + beta C, written over C while C is still being read
    for out in (aligned, misaligned, in_place):
        got = CpuBackend().gemm(a, b, in_place if out is in_place else c, alpha, beta, precision, out=out)
        assert got is out
        np.testing.assert_array_equal(out, want)
