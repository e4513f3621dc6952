"""Hostile input: names that try to be paths, shapes whose sizes overflow, decompression bombs and
malformed binary framing all get a 4xx that names the problem, and never a 500, a big allocation
or a file touched."""
from __future__ import annotations

import json
import time
import tracemalloc
import zlib

import pytest

from accel.codec import HEADER_LENGTH
from accel.datatypes import MAX_ELEMENTS, MAX_RANK
from shim.names import check_name


def infer(http, op: str, body: bytes, **headers: str):
    return http.post(f"/v2/models/{op}/infer", data=body, headers={"Content-Type": "application/json", **headers})


def tensor(shape: list[int], datatype: str = "FP32", **fields) -> bytes:
    return json.dumps({"inputs": [{"name": "A", "datatype": datatype, "shape": shape, **fields}]}).encode()


@pytest.mark.parametrize("path", [
    "/v2/models/..%2F..%2Fetc%2Fpasswd/infer", "/v2/models/%2E%2E/infer", "/v2/models/.hidden/infer",
    "/v2/models/a..b/infer", "/v2/models/" + "x" * 129 + "/infer", "/v2/models/nul%00byte/infer",
    "/v2/models/new%0Aline/infer", "/v2/models/sp%20ace/infer", "/v2/models/%C3%A9t%C3%A9/infer",
])
def test_op_names_that_try_to_be_paths_are_400(http, path):
    reply = http.post(path, data=b'{"inputs": []}')
    assert reply.status_code in (400, 404), (path, reply.status_code)  # 404: the router saw a '/'
    assert "error" in reply.get_json()


@pytest.mark.parametrize("name", ["noop", "efficientnet-lite0", "a.b_c-1", "x" * 128])
def test_good_names_pass(name):
    assert check_name(name) == name


@pytest.mark.parametrize("op,body,names", [
    ("noop", tensor([1 << 40, 1 << 40], data=[]), "spans over"),
    ("gemm", tensor([0, 1 << 62], parameters={"binary_data_size": 0}), "spans over"),
    ("gemm", tensor([0, (1 << 63) - 1], parameters={"binary_data_size": 0}), "spans over"),
    ("noop", tensor([1] * (MAX_RANK + 1), data=[1.0]), f"over the limit of {MAX_RANK}"),
    ("noop", tensor([1 << 70], data=[]), "spans over"),
    ("noop", tensor([3, 1 << 39], "BYTES", data=[]), "spans over"),
])
def test_shapes_whose_sizes_overflow_are_400_before_allocating(http, op, body, names):
    start = time.perf_counter()
    reply = infer(http, op, body)
    assert reply.status_code == 400 and names in reply.get_json()["error"], reply.data[:300]
    assert time.perf_counter() - start < 1.0


def test_the_largest_allowed_span_with_a_zero_dimension_is_fine(http):
    reply = infer(http, "noop", json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [0, MAX_ELEMENTS],
                                                        "data": []}]}).encode())
    assert reply.status_code == 200 and reply.get_json()["outputs"][0]["shape"] == [0, MAX_ELEMENTS]


@pytest.mark.parametrize("encoding,wbits", [("gzip", 31), ("deflate", 15)])
def test_decompression_bombs_are_413_without_inflating_them(http, service, encoding, wbits):
    limit = service.settings.max_body_bytes
    packer = zlib.compressobj(9, zlib.DEFLATED, wbits)
    chunk = b"\0" * (1 << 20)
    bomb = b"".join(packer.compress(chunk) for _ in range(4 * limit >> 20)) + packer.flush()  # 4x the limit
    assert len(bomb) < limit // 100
    tracemalloc.start()
    try:
        reply = infer(http, "noop", bomb, **{"Content-Encoding": encoding})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert reply.status_code == 413 and "inflated body is over the limit" in reply.get_json()["error"]
    assert peak < 1.2 * limit, peak  # inflated up to the limit, not the 4x (memory: no machine's load moves it)


@pytest.mark.parametrize("header,body,names", [
    ("99999999999999999999999999", b'{"inputs": []}', "but the body has only"),
    ("+5", b'{"inputs": []}', "non-negative integer"),
    ("0x10", b'{"inputs": []}', "non-negative integer"),
    ("2", "{\u00e9}".encode(), "malformed JSON"),  # the header ends inside a UTF-8 character
    ("14", b'{"inputs": []}\xff', "binary data"),
])
def test_malformed_binary_framing_is_400(http, header, body, names):
    reply = infer(http, "noop", body, **{HEADER_LENGTH: header})
    assert reply.status_code == 400 and names in reply.get_json()["error"], reply.data[:300]


@pytest.mark.parametrize("size", [1 << 64, -1, 2.5, True, "8"])
def test_absurd_binary_data_sizes_are_400(http, size):
    head = json.dumps({"inputs": [{"name": "x", "datatype": "UINT8", "shape": [8],
                                   "parameters": {"binary_data_size": size}}]}).encode()
    reply = infer(http, "noop", head + b"\0" * 8, **{HEADER_LENGTH: str(len(head))})
    assert reply.status_code == 400 and "binary_data_size" in reply.get_json()["error"], reply.data[:300]
