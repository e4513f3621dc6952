"""KaaS graphs on the CPU runner against numpy: Jacobi, sgemm chains, elementwise chains, libraries."""
from __future__ import annotations

import numpy as np
import pytest

from accel.errors import InternalError, InvalidInput
from shim.kaas import KaasService
from tests.kaas_util import (buf, jacobi_request, jacobi_system, kernel, new_kaas, rel_err, sgemm_kernel,
                             write_library)


@pytest.fixture()
def kaas() -> KaasService:
    return new_kaas("cpu")


def get(kaas: KaasService, key: str) -> np.ndarray:
    return np.frombuffer(kaas.get_buffer(key), np.float32)


def test_jacobi_converges_to_the_solution(kaas):
    n = 96
    a, b = jacobi_system(n)
    kaas.put_buffer("A", a.tobytes())
    kaas.put_buffer("b", b.tobytes())
    kaas.put_buffer("x", np.zeros(n, np.float32).tobytes())
    result = kaas.run(jacobi_request(n, 100)).as_json()
    assert result["launches"] == 100 and result["outputs"] == [{"name": "x", "key": "x", "size": n * 4}]
    x = get(kaas, "x")
    assert rel_err(x, np.linalg.solve(a.astype(np.float64), b.astype(np.float64))) < 1e-5
    # the residual kernel, in a second request that finds A resident
    lit = [("i", n)]
    res = kaas.run({"kernels": [kernel("jacobi", "residual", [(buf("A", n * n * 4, const=True), "i"), (buf("b"), "i"),
                                                              (buf("x"), "i"), (buf("r", n * 4), "o")], lit, 4)]})
    assert res.cache["hits"] == 3 and res.cache["misses"] == 0
    np.testing.assert_allclose(get(kaas, "r"), b - a @ x, atol=1e-5)
    assert np.linalg.norm(get(kaas, "r")) < 1e-4 * np.linalg.norm(b)


def test_jacobi_split_over_requests_equals_one_request(kaas):
    n = 40
    a, b = jacobi_system(n, seed=3)
    for key in ("x1", "x2"):
        kaas.put_buffer(key, np.zeros(n, np.float32).tobytes())
    kaas.put_buffer("A", a.tobytes())
    kaas.put_buffer("b", b.tobytes())
    kaas.run(jacobi_request(n, 20, x_key="x1"))
    for _ in range(2):
        kaas.run(jacobi_request(n, 10, x_key="x2"))
    assert kaas.get_buffer("x1") == kaas.get_buffer("x2")
    steps = np.zeros(n, np.float32)
    for _ in range(20):
        steps = (b - (a @ steps - np.diagonal(a) * steps)) / np.diagonal(a)
    np.testing.assert_allclose(get(kaas, "x1"), steps, rtol=1e-5, atol=1e-6)


def test_sgemm_chain_with_an_ephemeral_intermediate(kaas):
    rng = np.random.default_rng(1)
    m, k, n, p = 37, 50, 29, 41  # not multiples of the 16x16 tile
    a, b, c = (rng.standard_normal(s, dtype=np.float32) for s in ((m, k), (k, n), (n, p)))
    for key, v in (("a", a), ("b", b), ("c", c)):
        kaas.put_buffer(key, v.tobytes())
    ab = buf("ab", m * n * 4, ephemeral=True)
    result = kaas.run({"kernels": [
        sgemm_kernel(m, n, k, buf("a"), buf("b"), ab),
        sgemm_kernel(m, p, n, ab, buf("c"), buf("d", m * p * 4)),
    ]})
    assert [o["key"] for o in result.outputs] == ["d"]
    want = (a.astype(np.float64) @ b) @ c
    assert rel_err(get(kaas, "d").reshape(m, p), want) < 1e-5
    assert "ab" not in {info.key for info in kaas.list_buffers()}


def test_elementwise_chain(kaas):
    rng = np.random.default_rng(2)
    n = 1000
    x, y, w = (rng.standard_normal(n, dtype=np.float32) for _ in range(3))
    for key, v in (("x", x), ("y", y), ("w", w)):
        kaas.put_buffer(key, v.tobytes())
    size = n * 4
    lit = [("Q", n)]
    t1, t2 = buf("t1", size, ephemeral=True), buf("t2", size, ephemeral=True)
    kaas.run({"kernels": [
        kernel("elementwise", "scale", [(buf("x"), "i"), (t1, "o")], lit + [("f", 2.5)]),
        kernel("elementwise", "add", [(t1, "i"), (buf("y"), "i"), (t2, "o")], lit),
        kernel("elementwise", "relu", [(t2, "i"), (t1, "o")], lit),
        kernel("elementwise", "mul", [(t1, "i"), (buf("w"), "i"), (buf("z", size), "o")], lit),
        kernel("elementwise", "fill", [(buf("ones", size), "o")], [("Q", n), ("f", 1.0)]),
    ]})
    want = np.maximum(np.float32(2.5) * x + y, 0) * w
    np.testing.assert_array_equal(get(kaas, "z"), want)
    np.testing.assert_array_equal(get(kaas, "ones"), np.ones(n, np.float32))


def test_axpy_in_place_n_iter_times(kaas):
    n = 257
    x, y = np.arange(n, dtype=np.float32), np.ones(n, np.float32)
    kaas.put_buffer("x", x.tobytes())
    kaas.put_buffer("y", y.tobytes())
    kaas.run({"kernels": [kernel("elementwise", "axpy", [(buf("x"), "i"), (buf("y"), "io")], [("Q", n), ("f", 0.5)])],
              "nIter": 8})
    np.testing.assert_array_equal(get(kaas, "y"), y + 4.0 * x)


def test_offsets_select_and_splice_windows(kaas):
    n = 64
    both = np.concatenate([np.full(n, 1, np.float32), np.arange(n, dtype=np.float32)])
    kaas.put_buffer("both", both.tobytes())
    kaas.put_buffer("out", np.zeros(3 * n, np.float32).tobytes())
    second = buf("second", n * 4, key="both", offset=n * 4)
    middle = buf("middle", n * 4, key="out", offset=n * 4)
    kaas.run({"kernels": [kernel("elementwise", "scale", [(second, "i"), (middle, "o")], [("Q", n), ("f", -2.0)])]})
    out = get(kaas, "out")
    np.testing.assert_array_equal(out[n:2 * n], -2.0 * np.arange(n, dtype=np.float32))
    assert not out[:n].any() and not out[2 * n:].any()
    assert kaas.get_buffer("both") == both.tobytes()


def test_the_libraries_list_kernels_and_signatures(kaas):
    libs = {lib["name"]: lib for lib in kaas.describe_libraries()["libraries"]}
    assert set(libs) == {"blas", "jacobi", "elementwise"}
    sgemm = next(k for k in libs["blas"]["kernels"] if k["name"] == "sgemm")
    assert [a["count"] for a in sgemm["arguments"]] == ["M*K", "K*N", "M*N"]
    assert [lit["type"] for lit in sgemm["literals"]] == ["i", "i", "i"] and sgemm["blockDim"] == [16, 16, 1]
    assert {k["name"] for k in libs["elementwise"]["kernels"]} >= {"axpy", "scale", "relu", "add", "mul"}
    assert {k["name"] for k in libs["jacobi"]["kernels"]} == {"jacobi_step", "residual"}


NEGATE_CU = 'extern "C" __global__ void negate(int n, const double* x, double* y) {}\n'
NEGATE_PY = '''
from shim.kaas.signature import Arg, Kernel

def negate(n, x, y):
    y[:] = -x

def explode(n, x, y):
    raise FloatingPointError("boom")

KERNELS = [Kernel("negate", "n:i", [Arg("x", "i", "float64", "n"), Arg("y", "o", "float64", "n")], negate)]
'''


def test_an_operator_library_from_kernels_dir(tmp_path):
    write_library(tmp_path, "mylib", NEGATE_CU, NEGATE_PY)
    kaas = new_kaas("cpu", kernels_dir=tmp_path)
    assert "mylib" in {lib["name"] for lib in kaas.describe_libraries()["libraries"]}
    kaas.put_buffer("x", np.arange(5, dtype=np.float64).tobytes())
    kaas.run({"kernels": [kernel("mylib", "negate", [(buf("x"), "i"), (buf("y", 40), "o")], [("i", 5)])]})
    np.testing.assert_array_equal(np.frombuffer(kaas.get_buffer("y")), -np.arange(5.0))


@pytest.mark.parametrize("cu, py, message", [
    (NEGATE_CU, NEGATE_PY.replace('Kernel("negate"', 'Kernel("absent"'), "no extern"),
    (NEGATE_CU, "KERNELS = []\n", "must define KERNELS"),
    (NEGATE_CU, NEGATE_PY.replace('"n:i"', '"n:x"'), "literal"),
    (NEGATE_CU, NEGATE_PY.replace('"float64", "n")]', '"float64", "n*m")]'), "not a literal"),
    (NEGATE_CU, NEGATE_PY.replace('"float64", "n")]', '"float64", "__import__(1)")]'), "only integers"),
])
def test_malformed_operator_libraries_fail_the_start(tmp_path, cu, py, message):
    write_library(tmp_path, "bad", cu, py)
    with pytest.raises(ValueError, match=message):
        new_kaas("cpu", kernels_dir=tmp_path)


def test_an_operator_library_may_not_shadow_a_builtin(tmp_path):
    write_library(tmp_path, "blas", NEGATE_CU, NEGATE_PY)
    with pytest.raises(ValueError, match="two kernel libraries are named 'blas'"):
        new_kaas("cpu", kernels_dir=tmp_path)


def test_a_failing_kernel_fails_the_request_and_commits_nothing(tmp_path):
    write_library(tmp_path, "mylib", NEGATE_CU, NEGATE_PY.replace("negate)]", "explode)]"))
    kaas = new_kaas("cpu", kernels_dir=tmp_path)
    kaas.put_buffer("x", np.arange(5, dtype=np.float64).tobytes())
    kaas.put_buffer("y", b"\x01" * 40)
    with pytest.raises(InternalError, match="kernels\\[0\\] \\(mylib.negate\\).*boom"):
        kaas.run({"kernels": [kernel("mylib", "negate", [(buf("x"), "i"), (buf("y", 40), "o")], [("i", 5)])]})
    assert kaas.get_buffer("y") == b"\x01" * 40
    assert kaas.buffers.cache.used_bytes == 40  # x stays resident; nothing reserved is left behind
    with pytest.raises(InvalidInput):  # and the service goes on serving
        kaas.run({"kernels": [], "nIter": 1})
