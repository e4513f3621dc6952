"""gemm straight into the caller's shared-memory region: the product lands in the region, computed in the
region's own memory (no copy after the op), a region too small for it is a 400 before any work, and
requests without shared memory, and other ops, work as before."""
from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np
import pytest

import accel
from accel.codec import InferRequest, RequestedOutput, decode_request, encode_request
from accel.shm import SharedMemoryRef, resolver
from accel.tensor import Tensor
from shim.backends.cpu import gemm_reference
from shim.ops import Op
from tests.conftest import WSGITransport

TOLERANCE = {"float16": 1e-2, "float32": 1e-5, "float64": 1e-12}
REGION_BYTES = 1 << 20


class FirstByteOp(Op):
    """An op of the old kind (``run`` without ``destinations``): the first byte of its input, as an array."""

    name = "first_byte"
    inputs: list = []
    outputs: list = []

    def run(self, inputs: dict, parameters: Mapping[str, Any]) -> dict:
        return {"y": np.frombuffer(inputs["x"].tobytes()[:1], np.uint8).copy()}


@pytest.fixture(scope="module")
def shim(models_dir):
    from shim.config import Settings
    from shim.service import build_service

    svc = build_service(Settings(device="cpu", models_dir=models_dir, classify_model=""), extra_ops=[FirstByteOp()])
    svc.load()
    return svc


@pytest.fixture()
def region(shim):
    """(client, accel.SharedMemory registered with the shim), unregistered afterwards."""
    client = accel.Client("http://in-process", transport=WSGITransport(shim.app), retries=0)
    with accel.SharedMemory(f"direct-{os.getpid()}-{os.urandom(3).hex()}", REGION_BYTES) as shm:
        client.register_shm(shm.name, shm.key, shm.byte_size)
        yield client, shm
        client.unregister_shm(shm.name)


def put(shm: accel.SharedMemory, name: str, array: np.ndarray, offset: int) -> Tensor:
    """Input ``name`` written into ``shm`` at ``offset`` and named there (no data in the request)."""
    shm.array(array.shape, array.dtype, offset=offset)[...] = array
    ref = SharedMemoryRef(shm.name, array.nbytes, offset)
    datatype = {"float16": "FP16", "float32": "FP32", "float64": "FP64", "uint8": "UINT8"}[array.dtype.name]
    return Tensor(name, datatype, array.shape, shm.view(offset, array.nbytes), ref.parameters())


def operands(dtype: str, m: int = 48, k: int = 40, n: int = 24) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(m + k + n)
    return tuple(rng.standard_normal(shape).astype(dtype) for shape in ((m, k), (k, n), (m, n)))  # type: ignore


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got.astype(np.float64) - want) / np.linalg.norm(want))


# --- through HTTP -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("where", [65536, 65536 + 1, 32768], ids=["own-place", "misaligned", "over-input-C"])
def test_gemm_with_a_b_c_in_one_region_puts_the_product_into_the_region(region, dtype, where):
    """Into a place of its own, a misaligned one, or over the input C (C = alpha A @ B + beta C in place)."""
    client, shm = region
    a, b, c = operands(dtype)
    tensors = [put(shm, name, x, offset) for name, x, offset in zip("ABC", (a, b, c), (0, 16384, 32768))]
    ref = SharedMemoryRef(shm.name, c.nbytes, where)
    out = client.infer_tensors("gemm", tensors, {"alpha": -0.5, "beta": 2.0},
                               outputs=[RequestedOutput("C", False, ref.parameters())], resolve=resolver(shm))
    assert out["C"].parameters == ref.parameters() and out["C"].shape == c.shape
    placed = np.frombuffer(shm.view(where, c.nbytes), dtype).reshape(c.shape)
    want = -0.5 * (a.astype(np.float64) @ b.astype(np.float64)) + 2.0 * c.astype(np.float64)
    assert rel_error(placed, want) <= TOLERANCE[dtype]
    np.testing.assert_array_equal(placed, gemm_reference(a, b, c, -0.5, 2.0))  # the CPU twin's very values
    del placed


def test_response_metadata_of_a_shm_output_is_as_triton_has_it(shim, region):
    client, shm = region
    a, b, _ = operands("float32")
    body = {"inputs": [{"name": "A", "datatype": "FP32", "shape": list(a.shape), "data": a.ravel().tolist()},
                       {"name": "B", "datatype": "FP32", "shape": list(b.shape), "data": b.ravel().tolist()}],
            "outputs": [{"name": "C", "parameters": {"shared_memory_region": shm.name,
                                                     "shared_memory_byte_size": 8192, "shared_memory_offset": 64}}]}
    reply = shim.app.test_client().post("/v2/models/gemm/infer", json=body)
    assert reply.status_code == 200, reply.get_json()
    nbytes = a.shape[0] * b.shape[1] * 4
    assert reply.get_json()["outputs"] == [{"name": "C", "datatype": "FP32", "shape": [48, 24], "parameters": {
        "shared_memory_region": shm.name, "shared_memory_byte_size": nbytes, "shared_memory_offset": 64}}]
    np.testing.assert_array_equal(np.frombuffer(shm.view(64, nbytes), np.float32).reshape(48, 24),
                                  gemm_reference(a, b, None, 1.0, 0.0))


def test_an_output_region_too_small_is_a_400_before_any_work_and_the_shim_serves_on(region):
    client, shm = region
    a, b, c = operands("float32")
    tensors = [put(shm, "A", a, 0), put(shm, "B", b, 8192)]
    sentinel = np.frombuffer(shm.view(16384, 8192), np.uint8)
    sentinel[:] = 0xAB
    small = SharedMemoryRef(shm.name, c.nbytes - 4, 16384)  # one element short
    with pytest.raises(accel.InvalidInput, match=rf"output 'C' is {c.nbytes} bytes but its "
                                                 rf"shared_memory_byte_size is {c.nbytes - 4}"):
        client.infer_tensors("gemm", tensors, outputs=[RequestedOutput("C", False, small.parameters())])
    past_the_end = SharedMemoryRef(shm.name, c.nbytes, REGION_BYTES - c.nbytes + 4)
    with pytest.raises(accel.InvalidInput, match="'C'.*outside region"):
        client.infer_tensors("gemm", tensors, outputs=[RequestedOutput("C", False, past_the_end.parameters())])
    assert (sentinel == 0xAB).all()  # nothing was written
    good = SharedMemoryRef(shm.name, c.nbytes, 16384)
    client.infer_tensors("gemm", tensors, outputs=[RequestedOutput("C", False, good.parameters())],
                         resolve=resolver(shm))
    placed = sentinel.view(np.float32)[:c.size].reshape(c.shape)
    np.testing.assert_array_equal(placed, gemm_reference(a, b, None, 1.0, 0.0))
    np.testing.assert_array_equal(client.gemm(a, b), gemm_reference(a, b, None, 1.0, 0.0))  # and in the body
    del sentinel, placed


def test_gemm_without_shared_memory_is_unchanged(region):
    client, _ = region
    for dtype in ("float16", "float32", "float64"):
        a, b, c = operands(dtype, 37, 29, 11)
        got = client.gemm(a, b, c, alpha=1.5, beta=-0.25)
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got, gemm_reference(a, b, c, 1.5, -0.25))


def test_ops_without_direct_outputs_still_get_their_outputs_copied_into_regions(region):
    client, shm = region
    x = np.arange(7, 107, dtype=np.uint8)
    ref = SharedMemoryRef(shm.name, 1, 4096)
    out = client.infer_tensors("first_byte", [put(shm, "x", x, 0)],
                               outputs=[RequestedOutput("y", False, ref.parameters())], resolve=resolver(shm))
    assert out["y"].parameters == ref.parameters() and bytes(shm.view(4096, 1)) == b"\x07"
    echo = SharedMemoryRef(shm.name, x.nbytes, 8192)
    client.infer_tensors("noop", [put(shm, "x", x, 0)], outputs=[RequestedOutput("x", False, echo.parameters())],
                         resolve=resolver(shm))
    assert bytes(shm.view(8192, x.nbytes)) == x.tobytes()


# --- the request's steps, in process: what the op computed into, what was copied after ------------
def run_scoped(shim, shm: accel.SharedMemory, op: str, request: InferRequest) -> tuple[Any, list[str], int]:
    """``request`` through the route's steps (decode, destinations, dispatch, place_outputs) as the
    default tenant: (response, outputs copied by place_outputs, address of the region's first byte)."""
    from shim.server.guard import DEFAULT_TENANT
    from shim.server.shm_routes import ShmScope

    body, headers = encode_request(request)
    length = headers.get("Inference-Header-Content-Length")
    with ShmScope(shim.shm, DEFAULT_TENANT) as scope:
        decoded = decode_request(body, int(length) if length else None, scope.input)
        response = shim.dispatcher.infer(op, decoded, scope.destinations(decoded))
        copied = scope.place_outputs(decoded, response)
    (mapping,) = [r for r in shim.shm.regions() if r.name == shm.name]
    assert mapping.offset == 0  # the region starts at the mapping's first byte
    return response, copied, mapping.address


def address(buffer: Any) -> int:
    return int(np.frombuffer(buffer, np.uint8).ctypes.data)


def test_gemm_computes_in_the_regions_memory_and_nothing_is_copied_after(shim, region):
    _, shm = region
    a, b, c = operands("float32")
    where = 32768
    request = InferRequest([put(shm, "A", a, 0), put(shm, "B", b, 8192), put(shm, "C", c, 16384)],
                           [RequestedOutput("C", False, SharedMemoryRef(shm.name, c.nbytes, where).parameters())],
                           {"alpha": 2.0, "beta": 1.0})
    response, copied, base = run_scoped(shim, shm, "gemm", request)
    (result,) = response.outputs
    assert address(result.raw) == base + where  # the op's result is the region's own memory
    assert copied == []  # so place_outputs moved nothing
    assert result.parameters == SharedMemoryRef(shm.name, c.nbytes, where).parameters()
    np.testing.assert_array_equal(np.frombuffer(shm.view(where, c.nbytes), np.float32).reshape(c.shape),
                                  gemm_reference(a, b, c, 2.0, 1.0))


def test_an_op_that_cannot_compute_in_place_gets_its_output_copied(shim, region):
    _, shm = region
    x = np.arange(64, dtype=np.uint8)
    request = InferRequest([put(shm, "x", x, 0)],
                           [RequestedOutput("x", False, SharedMemoryRef(shm.name, x.nbytes, 4096).parameters())])
    response, copied, base = run_scoped(shim, shm, "noop", request)
    assert copied == ["x"] and bytes(shm.view(4096, x.nbytes)) == x.tobytes()
    same_place = InferRequest([put(shm, "x", x, 0)],
                              [RequestedOutput("x", False, SharedMemoryRef(shm.name, x.nbytes, 0).parameters())])
    assert run_scoped(shim, shm, "noop", same_place)[1] == []  # the echo already is there


def test_destinations_are_resolved_before_the_op_runs(shim, region):
    """An unknown output region is a 404 even when the inputs are wrong too: the place is checked first."""
    _, shm = region
    bad_inputs = [Tensor.from_numpy(name, np.ones(shape, np.float32)) for name, shape in (("A", (2, 3)), ("B", (2, 2)))]
    elsewhere = {"shared_memory_region": "never-registered", "shared_memory_byte_size": 16}
    with pytest.raises(accel.OpNotFound, match="never-registered"):
        run_scoped(shim, shm, "gemm", InferRequest(bad_inputs, [RequestedOutput("C", False, elsewhere)]))


# --- functions without numpy: region.tensor() in, a Tensor out ------------------------------------
def test_gemm_of_region_tensors_returns_a_tensor_lying_in_the_region(region):
    client, shm = region
    a, b, _ = operands("float32")
    ta, tb = shm.tensor("A", a.shape), shm.tensor("B", b.shape)
    ta.raw[:], tb.raw[:] = a.tobytes(), b.tobytes()  # the function fills the region with bytes it was given
    out = client.gemm(ta, tb, shm=shm)
    assert isinstance(out, Tensor) and out.datatype == "FP32" and out.shape == (48, 24)
    where = SharedMemoryRef.from_parameters(out.parameters, "C")
    assert where is not None and where.region == shm.name and where.offset >= tb.parameters["shared_memory_offset"]
    np.testing.assert_array_equal(out.numpy(), gemm_reference(a, b, None, 1.0, 0.0))
    assert bytes(out.raw) == bytes(shm.view(where.offset, where.byte_size))  # a view of the region, not a copy
    c = shm.tensor("C", (48, 24))  # the result exactly where the function asks for it
    got = client.gemm(ta, tb, shm=shm, out=c)
    assert got.parameters == c.parameters
    np.testing.assert_array_equal(np.frombuffer(c.raw, np.float32).reshape(48, 24),
                                  gemm_reference(a, b, None, 1.0, 0.0))


def test_gemm_of_tensors_in_the_body_returns_a_tensor(region):
    """Operands go as A, B, C whatever the tensors were called."""
    client, shm = region
    a, b, c = operands("float64", 5, 4, 3)
    got = client.gemm(Tensor.from_numpy("a", a), Tensor.from_numpy("x", b), Tensor.from_numpy("C", c), beta=2.0)
    assert isinstance(got, Tensor) and got.datatype == "FP64"
    np.testing.assert_array_equal(got.numpy(), gemm_reference(a, b, c, 1.0, 2.0))
    ta, tb = shm.tensor("left", a.shape, "FP64"), shm.tensor("right", b.shape, "FP64")
    ta.raw[:], tb.raw[:] = a.tobytes(), b.tobytes()
    np.testing.assert_array_equal(client.gemm(ta, tb, shm=shm).numpy(), gemm_reference(a, b, None, 1.0, 0.0))


def test_region_tensors_are_checked_and_hold_their_space(region):
    _, shm = region
    first = shm.tensor("A", (2, 3), "FP16")
    second = shm.tensor("B", (4,), "INT32")
    assert first.parameters["shared_memory_byte_size"] == 12 and "shared_memory_offset" not in first.parameters
    assert second.parameters["shared_memory_offset"] == 64  # the next aligned space
    with pytest.raises(accel.InvalidInput, match="BYTES tensors travel in the request body"):
        shm.tensor("s", (1,), "BYTES")
    with pytest.raises(accel.InvalidInput, match="unsupported datatype"):
        shm.tensor("x", (1,), "FP8")
    with pytest.raises(accel.InvalidInput, match="do not fit region"):
        shm.tensor("x", (REGION_BYTES,), "FP32")
    held = list(shm.held)
    with pytest.raises(accel.InvalidInput, match="negative dimension"):
        shm.tensor("x", (-1, -4), "FP32")
    assert shm.held == held  # a refused tensor holds no space
    other = Tensor("C", "FP32", (1,), bytes(4), {"shared_memory_region": "elsewhere", "shared_memory_byte_size": 4})
    with pytest.raises(accel.InvalidInput, match="does not lie in region"):
        accel.shm.place_request(shm, {"A": first}, {"C": other})


NO_NUMPY_FUNCTION = r"""
import array, sys
import accel
url, n = sys.argv[1], int(sys.argv[2])
client = accel.Client(url, timeout=60)
with accel.SharedMemory("nonumpy", 3 * n * n * 4 + 4096) as region:
    a, b = region.tensor("A", (n, n)), region.tensor("B", (n, n))
    a.raw[:] = array.array("f", [(i % 7) - 3.0 for i in range(n * n)]).tobytes()
    b.raw[:] = array.array("f", [(i % 5) * 0.5 for i in range(n * n)]).tobytes()
    c = client.gemm(a, b, shm=region)
    sys.stdout.write(repr((c.datatype, c.shape, bytes(c.raw).hex(), "numpy" in sys.modules)))
    client.unregister_shm(region.name)
    del a, b, c
"""


def test_a_function_without_numpy_multiplies_through_shared_memory(live_shim):
    """The cold-start path of a gemm function: no numpy is ever imported, the product is right."""
    import subprocess
    import sys

    n = 33
    proc = subprocess.run([sys.executable, "-c", NO_NUMPY_FUNCTION, live_shim.unix_url, str(n)], capture_output=True,
                          text=True, timeout=60, check=True)
    datatype, shape, hex_bytes, numpy_loaded = eval(proc.stdout)  # noqa: S307 - our own child's repr
    assert (datatype, shape, numpy_loaded) == ("FP32", (n, n), False)
    i = np.arange(n * n)
    a, b = ((i % 7) - 3.0).astype(np.float32).reshape(n, n), ((i % 5) * 0.5).astype(np.float32).reshape(n, n)
    np.testing.assert_array_equal(np.frombuffer(bytes.fromhex(hex_bytes), np.float32).reshape(n, n),
                                  gemm_reference(a, b, None, 1.0, 0.0))
