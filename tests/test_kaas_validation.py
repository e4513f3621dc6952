"""Every request the issue lists as invalid: a clear 4xx, nothing launched, the store unchanged."""
from __future__ import annotations

import copy
from typing import Any, Callable

import numpy as np
import pytest

from accel.errors import InsufficientStorage, InvalidInput, OpNotFound
from shim.kaas import KaasService
from tests.kaas_util import buf, jacobi_request, jacobi_system, kernel, new_kaas, sgemm_kernel

N = 32


@pytest.fixture(scope="module")
def kaas() -> KaasService:
    kaas = new_kaas("cpu", store_bytes=1 << 20)
    a, b = jacobi_system(N)
    kaas.put_buffer("A", a.tobytes())
    kaas.put_buffer("b", b.tobytes())
    kaas.put_buffer("x", np.zeros(N, np.float32).tobytes())
    kaas.put_buffer("small", b"\0" * 16)
    return kaas


def _snapshot(kaas: KaasService) -> tuple[list[Any], dict[str, bytes], float]:
    infos = kaas.list_buffers()
    launches = sum(s.value for m in kaas.metrics.launches.collect() for s in m.samples if s.name.endswith("_total"))
    return infos, {i.key: kaas.get_buffer(i.key) for i in infos}, launches


def _jacobi(edit: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    request = copy.deepcopy(jacobi_request(N, 2))
    edit(request)
    return request


def _k0(request: dict[str, Any]) -> dict[str, Any]:
    return request["kernels"][0]


def _set(path: Callable[[dict[str, Any]], dict[str, Any]], **kw: Any) -> Callable[[dict[str, Any]], None]:
    return lambda r: path(r).update(kw)


def _arg(i: int, **kw: Any) -> Callable[[dict[str, Any]], None]:
    return lambda r: [k["arguments"][i][0].update(kw) for k in r["kernels"]]


def _pop_arg(r: dict[str, Any]) -> None:
    for k in r["kernels"]:
        k["arguments"].pop()


CASES: list[tuple[str, Any, type, str]] = [
    # unknown or path-like libraries and kernels
    ("unknown library", _jacobi(_set(_k0, library="lapack")), OpNotFound, "unknown kernel library 'lapack'"),
    ("library as a path", _jacobi(_set(_k0, library="/usr/lib/libevil.so")), InvalidInput, "never paths"),
    ("unknown kernel", _jacobi(_set(_k0, kernel="gauss_seidel")), OpNotFound, "no kernel 'gauss_seidel'"),
    ("kernel not an identifier", _jacobi(_set(_k0, kernel="a.b")), InvalidInput, "C identifier"),
    # arguments against the signature
    ("too few arguments", _jacobi(_pop_arg), InvalidInput, "takes 4 buffer arguments"),
    ("an input passed as output", _jacobi(lambda r: _k0(r)["arguments"][1].__setitem__(1, "o")), InvalidInput,
     "'i' in the kernel's signature"),
    ("bad argument type", _jacobi(lambda r: _k0(r)["arguments"][1].__setitem__(1, "x")), InvalidInput,
     "one of i, o, io, t"),
    ("buffer smaller than the kernel needs", _jacobi(_arg(0, size=N * N * 4 - 4)), InvalidInput,
     "needs N\\*N = 1024 float32 = 4096 bytes"),
    ("stored input smaller than the kernel needs",
     _jacobi(lambda r: [k["arguments"][1][0].update(key="small", size=None) for k in r["kernels"]]), InvalidInput,
     "buffer 'b' has 16"),
    ("offset + size outside the object", _jacobi(_arg(1, offset=8)), InvalidInput, "outside its store object"),
    ("misaligned offset", _jacobi(_arg(1, offset=2, size=8)), InvalidInput, "not a multiple of 4"),
    ("one name, two specs", _jacobi(lambda r: r["kernels"][1]["arguments"][1].__setitem__(0, buf("b", N * 8))),
     InvalidInput,
     "one name is one buffer"),
    ("two names, one key, written", _jacobi(lambda r: r["kernels"][0]["arguments"][2][0].update(key="b")),
     InvalidInput, "'b' and 'x' both use key 'b' and one is written"),
    ("aliased output", {"kernels": [kernel("elementwise", "add", [(buf("x"), "i"), (buf("x"), "i"), (buf("x"), "o")],
                                           [("Q", N)])]}, InvalidInput, "aliasing"),
    ("const buffer written", {"kernels": [kernel("elementwise", "scale", [(buf("b"), "i"), (buf("x", const=True), "o")],
                                                 [("Q", N), ("f", 1.0)])]}, InvalidInput, "is const"),
    ("ephemeral read first", {"kernels": [kernel("elementwise", "copy", [(buf("e", 128, ephemeral=True), "i"),
                                                                         (buf("y", 128), "o")], [("Q", N)])]},
     InvalidInput, "reads it before any kernel writes it"),
    ("temporary that is also stored", {"kernels": [
        kernel("elementwise", "fill", [(buf("t", 128), "t")], [("Q", N), ("f", 1.0)]),
        kernel("elementwise", "fill", [(buf("t", 128), "o")], [("Q", N), ("f", 1.0)])]}, InvalidInput,
     "mark it ephemeral"),
    ("output without a size", {"kernels": [kernel("elementwise", "fill", [(buf("y"), "o")], [("Q", N), ("f", 1.0)])]},
     InvalidInput, "needs a size"),
    ("missing input buffer", _jacobi(_arg(1, key="nothere")), OpNotFound,
     "input buffer 'b' \\(key 'nothere'\\) is not in the buffer store"),
    # literals
    ("literal count", _jacobi(lambda r: _k0(r)["literals"].append({"type": "i", "val": 1})), InvalidInput,
     "takes 1 literals"),
    ("literal type against the signature", _jacobi(lambda r: _k0(r)["literals"][0].update(type="f", val=32.0)),
     InvalidInput, "must have type 'i'"),
    ("literal type not in i/f/d/Q", _jacobi(lambda r: _k0(r)["literals"][0].update(type="s")), InvalidInput,
     "one of i, f, d, Q"),
    ("int literal out of range", _jacobi(lambda r: _k0(r)["literals"][0].update(val=2**31)), InvalidInput,
     "integer in"),
    ("float literal not finite", {"kernels": [kernel("elementwise", "fill", [(buf("y", 128), "o")],
                                                     [("Q", N), ("f", float("nan"))])]}, InvalidInput, "finite"),
    # launch geometry against the device limits and the kernel's needs
    ("grid beyond the device", _jacobi(_set(_k0, nGrid=[1, 70000])), InvalidInput, "gridDim.y = 70000"),
    ("block of too many threads", _jacobi(_set(_k0, nBlock=[64, 32])), InvalidInput, "2048 threads"),
    ("block z beyond the device", _jacobi(_set(_k0, nBlock=[32, 1, 65])), InvalidInput, "blockDim.z = 65"),
    ("shared memory beyond the device", _jacobi(_set(_k0, sharedSize=1 << 20)), InvalidInput, "sharedSize"),
    ("jacobi block not whole warps", _jacobi(_set(_k0, nBlock=48)), InvalidInput, "multiple of 32"),
    ("sgemm block not 16x16", {"kernels": [dict(sgemm_kernel(4, 4, 4, buf("b"), buf("b2", key="x"),
                                                            buf("c", 64)), nBlock=[32, 8])]},
     InvalidInput, "needs blockDim \\[16, 16, 1\\]"),
    ("grid and gridDim both", _jacobi(_set(_k0, gridDim=2)), InvalidInput, "exactly one of nGrid or gridDim"),
    ("zero grid", _jacobi(_set(_k0, nGrid=0)), InvalidInput, "nGrid"),
    # the request itself
    ("nIter zero", _jacobi(lambda r: r.update(nIter=0)), InvalidInput, "nIter"),
    ("nIter too large", _jacobi(lambda r: r.update(nIter=10**9)), InvalidInput, "nIter"),
    ("nIter not an int", _jacobi(lambda r: r.update(nIter="3")), InvalidInput, "nIter"),
    ("no kernels", {"kernels": []}, InvalidInput, "non-empty"),
    ("unknown field", _jacobi(lambda r: r.update(nIters=3)), InvalidInput, "unknown field 'nIters'"),
    ("not an object", [1, 2], InvalidInput, "JSON object"),
    ("bad key", _jacobi(_arg(1, key="../etc/passwd")), InvalidInput, "keys must match"),
]


@pytest.mark.parametrize("request_doc, error, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_invalid_requests_are_rejected_before_anything_runs(kaas, request_doc, error, message):
    before = _snapshot(kaas)
    with pytest.raises(error, match=message) as info:
        kaas.run(request_doc)
    assert 400 <= info.value.status < 500
    assert _snapshot(kaas) == before


def test_a_valid_request_does_run_in_the_same_fixture(kaas):
    """The control: the unedited request passes, so each case above fails for its own edit."""
    before = _snapshot(kaas)
    kaas.run(jacobi_request(N, 2))
    assert _snapshot(kaas)[2] == before[2] + 2


def test_outputs_over_the_store_bound_are_507_and_nothing_runs():
    kaas = new_kaas("cpu", store_bytes=1000)
    kaas.put_buffer("x", b"\0" * 400)
    with pytest.raises(InsufficientStorage, match="store is full"):
        kaas.run({"kernels": [kernel("elementwise", "fill", [(buf("y", 800), "o")], [("Q", 200), ("f", 1.0)])]})
    assert [i.key for i in kaas.list_buffers()] == ["x"] and kaas.buffers.cache.used_bytes == 0


def test_a_request_larger_than_the_gpu_cache_is_507_and_leaves_the_store():
    kaas = new_kaas("cpu", cache_bytes=1000)
    kaas.put_buffer("x", np.ones(200, np.float32).tobytes())
    kaas.put_buffer("y", np.ones(200, np.float32).tobytes())
    with pytest.raises(InsufficientStorage, match="GPU cache cannot fit"):
        kaas.run({"kernels": [kernel("elementwise", "axpy", [(buf("x"), "i"), (buf("y"), "io")],
                                     [("Q", 200), ("f", 1.0)])]})
    assert kaas.get_buffer("y") == np.ones(200, np.float32).tobytes()
    assert kaas.buffers.cache.used_bytes <= 1000
