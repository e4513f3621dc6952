"""Every bad request gets its status (400, 404, 405, 413) and a JSON error naming what is wrong,
and the shim keeps serving afterwards: in-process, against a live ``accelshim serve``, and through
the accel client's typed exceptions."""
from __future__ import annotations

import functools
import gzip
import io
import json
import struct
from typing import Any, Callable

import numpy as np
import pytest
from PIL import Image

import accel
from tests.conftest import LiveShim, WSGITransport, encode
from tests.test_protocol import HCL, Caller, Reply, binary_message, bytes_tensor, make_caller, parse

Body = tuple[bytes, dict[str, str]]


# --- request builders ---------------------------------------------------------------------------
def js(obj: Any, **headers: str) -> Callable[[], Body]:
    return lambda: (json.dumps(obj).encode(), headers)


def raw(body: bytes, **headers: str) -> Callable[[], Body]:
    return lambda: (body, headers)


def one(**fields: Any) -> Callable[[], Body]:
    """A noop request with one input: name x, FP32, shape [2], data [1, 2], with ``fields`` changed."""
    entry = {"name": "x", "datatype": "FP32", "shape": [2], "data": [1.0, 2.0], **fields}
    return js({"inputs": [{k: v for k, v in entry.items() if v is not None}]})


def binary(entries: list[dict], blobs: list[bytes], trailing: bytes = b"") -> Callable[[], Body]:
    def build() -> Body:
        body, headers = binary_message({"inputs": entries}, blobs)
        return body + trailing, headers
    return build


def bsize(name: str, datatype: str, shape: list[int], size: int) -> dict:
    return {"name": name, "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": size}}


def mat(name: str, shape: list[int], datatype: str = "FP32", value: float = 1.0) -> dict:
    n = int(np.prod(shape))
    return {"name": name, "datatype": datatype, "shape": shape, "data": [value] * n}


def gemm(*inputs: dict, **params: Any) -> Callable[[], Body]:
    return js({"inputs": list(inputs), "parameters": params})


@functools.lru_cache(maxsize=None)
def jpeg() -> bytes:
    from skimage import data
    return encode(data.chelsea(), "JPEG")


@functools.lru_cache(maxsize=None)
def bomb_png() -> bytes:
    """A real 7000x7000 single-colour PNG (49 Mpixel, over both test shims' limits), ~50 KB."""
    out = io.BytesIO()
    Image.new("L", (7000, 7000), 200).save(out, format="PNG", compress_level=9)
    return out.getvalue()


def images(*items: Callable[[], bytes] | bytes, **params: Any) -> Callable[[], Body]:
    def build() -> Body:
        data = [i() if callable(i) else i for i in items]
        raw_ = bytes_tensor(data)
        header = {"inputs": [bsize("image", "BYTES", [len(data)], len(raw_))], "parameters": params}
        return binary_message(header, [raw_])
    return build


A22, B22 = mat("A", [2, 2]), mat("B", [2, 2])
# id, op, request builder, status, a piece of the error message that names the offending thing
CASES: list[tuple[str, str, Callable[[], Body], int, str]] = [
    ("malformed-json", "noop", raw(b'{"inputs": [{"name": "x",'), 400, "malformed JSON"),
    ("not-utf8", "noop", raw(b"\xff\xfe{}"), 400, "malformed JSON"),
    ("empty-body", "noop", raw(b""), 400, "malformed JSON"),
    ("header-not-object", "noop", js([{"inputs": []}]), 400, "inference header must be a JSON object"),
    ("inputs-not-list", "noop", js({"inputs": {"x": [1]}}), 400, "inputs must be a JSON array"),
    ("input-not-object", "noop", js({"inputs": ["x"]}), 400, "inputs[0] must be a JSON object"),
    ("missing-name", "noop", one(name=None), 400, "inputs[0]: name must be a non-empty string"),
    ("missing-datatype", "noop", one(datatype=None), 400, "input 'x': unsupported datatype None"),
    ("missing-shape", "noop", one(shape=None), 400, "input 'x': shape"),
    ("unknown-datatype", "noop", one(datatype="FP8"), 400, "'FP8'"),
    ("negative-shape", "noop", one(shape=[-2]), 400, "input 'x': shape must be a list of non-negative integers"),
    ("float-shape", "noop", one(shape=[2.0]), 400, "input 'x': shape must be a list of non-negative integers"),
    ("string-shape", "noop", one(shape="2"), 400, "input 'x': shape must be a list"),
    ("duplicate-name", "noop", js({"inputs": [mat("x", [1]), mat("x", [1])]}), 400, "'x' appears twice"),
    ("too-few-elements", "noop", one(shape=[3]), 400, "tensor 'x': shape [3] needs 3 elements but data has 2"),
    ("too-many-elements", "noop", one(shape=[1]), 400, "tensor 'x': shape [1] needs 1 elements but data has 2"),
    ("bytes-count", "noop", one(datatype="BYTES", data=["a"]), 400, "tensor 'x': shape [2] needs 2 BYTES elements"),
    ("string-in-fp32", "noop", one(data=["1.0", 2.0]), 400, "tensor 'x': data does not fit FP32"),
    ("float-in-int32", "noop", one(datatype="INT32", data=[1.5, 2]), 400, "tensor 'x': data does not fit INT32"),
    ("int8-over", "noop", one(datatype="INT8", data=[128, 0]), 400, "tensor 'x': data does not fit INT8"),
    ("uint64-negative", "noop", one(datatype="UINT64", data=[-1, 0]), 400, "tensor 'x': data does not fit UINT64"),
    ("int64-over", "noop", one(datatype="INT64", data=[2**63, 0]), 400, "tensor 'x': data does not fit INT64"),
    ("fp16-overflow", "noop", one(datatype="FP16", data=[1e6, 0.0]), 400, "tensor 'x': data does not fit FP16"),
    ("bool-in-int32", "noop", one(datatype="INT32", data=[True, 1]), 400, "tensor 'x': booleans in INT32"),
    ("int-in-bool", "noop", one(datatype="BOOL", data=[1, 0]), 400, "tensor 'x': BOOL data must be true/false"),
    ("number-in-bytes", "noop", one(datatype="BYTES", data=["a", 5]), 400, "tensor 'x': BYTES elements must be"),
    ("no-data", "noop", one(data=None), 400, "input 'x' has neither data nor binary_data_size"),
    ("data-and-binary", "noop", binary([{**mat("x", [1]), "parameters": {"binary_data_size": 4}}], [b"\0" * 4]),
     400, "input 'x' has both data and binary_data_size"),
    ("binary-size-not-int", "noop", binary([bsize("x", "FP32", [1], "4")], [b"\0" * 4]), 400,
     "input 'x': binary_data_size must be a non-negative integer"),
    ("hcl-past-body", "noop", lambda: (b'{"inputs": []}', {HCL: "99"}), 400, f"{HCL} is 99 but the body has only 14"),
    ("hcl-not-a-number", "noop", lambda: (b'{"inputs": []}', {HCL: "ten"}), 400, f"{HCL} must be a non-negative integer"),
    ("hcl-negative", "noop", lambda: (b'{"inputs": []}', {HCL: "-1"}), 400, f"{HCL} must be a non-negative integer"),
    ("binary-too-few", "noop", binary([bsize("x", "FP32", [2], 8)], [b"\0" * 4]), 400,
     "input 'x': binary_data_size 8 runs past the end of the binary data (4 bytes left)"),
    ("binary-trailing", "noop", binary([bsize("x", "FP32", [2], 8)], [b"\0" * 8], b"\0" * 3), 400,
     "the body carries 11 bytes of binary data but the inputs declare 8"),
    ("binary-size-vs-shape", "noop", binary([bsize("x", "FP32", [3], 8)], [b"\0" * 8]), 400,
     "tensor 'x': shape [3] of FP32 needs 12 bytes but 8 were given"),
    ("bytes-prefix-past-end", "noop", binary([bsize("s", "BYTES", [1], 7)], [struct.pack("<I", 100) + b"abc"]),
     400, "tensor 's': BYTES element of 100 bytes runs past the end"),
    ("bytes-prefix-cut", "noop", binary([bsize("s", "BYTES", [1], 2)], [b"\x01\x00"]), 400,
     "tensor 's': BYTES element header cut short"),
    ("gemm-int32", "gemm", gemm(mat("A", [2, 2], "INT32", 1), mat("B", [2, 2], "INT32", 1)), 400, "gemm input A is int32"),
    ("gemm-k-mismatch", "gemm", gemm(mat("A", [2, 3]), mat("B", [2, 2])), 400, "A is 2x3 and B is 2x2"),
    ("gemm-c-shape", "gemm", gemm(A22, B22, mat("C", [3, 2])), 400, "gemm: C is 3x2 but A @ B is 2x2"),
    ("gemm-1d-a", "gemm", gemm(mat("A", [4]), B22), 400, "input 'A' of op 'gemm' has shape [4]"),
    ("gemm-mixed-dtypes", "gemm", gemm(A22, mat("B", [2, 2], "FP64")), 400, "A is float32, B is float64"),
    ("gemm-empty-dim", "gemm", gemm(mat("A", [2, 0]), mat("B", [0, 2])), 400, "gemm input A has an empty dimension"),
    ("gemm-missing-b", "gemm", gemm(A22), 400, "op 'gemm' needs input 'B'"),
    ("gemm-unknown-input", "gemm", gemm(A22, B22, mat("D", [2, 2])), 400, "op 'gemm' has no input 'D'"),
    ("gemm-alpha-string", "gemm", gemm(A22, B22, alpha="2"), 400, "parameter 'alpha' must be a finite number"),
    ("gemm-beta-null", "gemm", gemm(A22, B22, beta=None), 400, "parameter 'beta' must be a finite number"),
    ("gemm-alpha-nan", "gemm", gemm(A22, B22, alpha=float("nan")), 400, "parameter 'alpha' must be a finite number"),
    ("unknown-output", "gemm", js({"inputs": [A22, B22], "outputs": [{"name": "D"}]}), 400, "op 'gemm' has no output 'D'"),
    ("output-binary-not-bool", "gemm", js({"inputs": [A22, B22], "outputs": [{"name": "C", "parameters": {"binary_data": 1}}]}),
     400, "output 'C': binary_data must be true or false"),
    ("model-wrong-shape", "efficientnet-lite0", js({"inputs": [mat("input", [1, 3, 2, 2])]}), 400,
     "input 'input' of op 'efficientnet-lite0' has shape [1, 3, 2, 2]"),
    ("classify-fp32", "classify", js({"inputs": [mat("image", [2])]}), 400, "input 'image' of op 'classify' must be BYTES, not FP32"),
    ("classify-not-image", "classify", images(b"plain text, not a picture"), 400, "image[0] is not an image"),
    ("classify-truncated-jpeg", "classify", images(jpeg, lambda: jpeg()[:len(jpeg()) // 2]), 400,
     "image[1] is a truncated or corrupt image"),
    ("classify-empty-image", "classify", images(b""), 400, "image[0] is empty"),
    ("classify-no-images", "classify", images(), 400, "classify takes 1 to"),
    ("classify-bomb", "classify", images(bomb_png), 413, "image[0] is 7000x7000 = 49000000 pixels, over the limit"),
    *[(f"top_k-{k!r}", "classify", images(jpeg, top_k=k), 400, "parameter 'top_k'") for k in (0, 1001, "5", 2.5, True)],
    ("unknown-op", "no-such-op", one(), 404, "unknown op or model 'no-such-op'"),
    ("unsupported-encoding", "noop", raw(b"{}", **{"Content-Encoding": "br"}), 400, "unsupported Content-Encoding 'br'"),
    ("corrupt-gzip", "noop", raw(b"not gzip at all", **{"Content-Encoding": "gzip"}), 400, "the gzip body cannot be inflated"),
    ("truncated-gzip", "noop", raw(gzip.compress(b'{"inputs": []}')[:-12], **{"Content-Encoding": "gzip"}), 400, "gzip"),
    # the JSON inflates whole, but the stream ends before its CRC-32/length trailer: never verified
    ("gzip-without-trailer", "noop", raw(gzip.compress(b'{"inputs": []}')[:-8], **{"Content-Encoding": "gzip"}), 400, "gzip"),
]
GOOD_NOOP = {"inputs": [{"name": "ok", "datatype": "INT32", "shape": [3], "data": [1, 2, 3]}]}


def assert_error(reply: Reply, status: int, names: str) -> None:
    assert reply.status == status, reply.body[:300]
    assert reply.headers["content-type"].startswith("application/json"), reply.body[:300]
    error = reply.json()
    assert set(error) == {"error"} and names in error["error"]


def assert_serves(shim: Caller) -> None:
    reply = shim.infer("noop", GOOD_NOOP)
    assert reply.status == 200 and reply.json()["outputs"][0]["data"] == [1, 2, 3]


@pytest.fixture(params=["inproc", "live"])
def shim(request) -> Caller:
    return make_caller(request)


@pytest.mark.parametrize("op,build,status,names", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request(shim, op, build, status, names):
    body, headers = build()
    assert_error(shim.infer(op, body, headers), status, names)
    assert_serves(shim)


@pytest.mark.parametrize("method,path", [("GET", "/v2/models/gemm/infer"), ("PUT", "/v2/models/gemm/infer"),
                                         ("POST", "/v2/health/live"), ("DELETE", "/v2/models/gemm")])
def test_wrong_method_is_405_json(shim, method, path):
    assert_error(shim.request(method, path, b"{}" if method in ("PUT", "POST") else None), 405, path)
    assert_serves(shim)


def test_unknown_endpoint_is_404_json(shim):
    assert_error(shim.get("/v2/no/such/thing"), 404, "/v2/no/such/thing")


# --- the body size limit ----------------------------------------------------------------------------
LIMIT = 100_000


@pytest.fixture(scope="module")
def small_limit_app(tmp_path_factory):
    """An in-process shim with noop and gemm alone and a 100 kB body limit."""
    from shim.config import Settings
    from shim.service import build_service

    empty = tmp_path_factory.mktemp("no-models")
    svc = build_service(Settings(device="cpu", models_dir=empty, classify_model="", max_body_bytes=LIMIT))
    svc.load()
    return svc.app


def _oversized() -> list[tuple[str, bytes, dict[str, str]]]:
    padding = json.dumps({"inputs": [], "pad": "x" * (2 * LIMIT)}).encode()
    return [("json", padding, {}),
            ("binary", *binary([bsize("x", "UINT8", [2 * LIMIT], 2 * LIMIT)], [b"\0" * 2 * LIMIT])()),
            ("gzip-inflates-over", gzip.compress(padding), {"Content-Encoding": "gzip"})]


def _check_limit(shim: Caller) -> None:
    for what, body, headers in _oversized():
        reply = shim.infer("noop", body, headers)
        assert_error(reply, 413, str(LIMIT))
        assert_serves(shim)
    # just under the limit still goes through
    body, headers = binary([bsize("x", "UINT8", [LIMIT - 200], LIMIT - 200)], [b"\7" * (LIMIT - 200)])()
    assert shim.infer("noop", body, headers).status == 200


def test_body_over_the_limit_inproc(small_limit_app):
    _check_limit(Caller(http=small_limit_app.test_client()))


@pytest.mark.parametrize("piece", [4096, 1 << 20])
def test_a_compressed_body_may_inflate_to_the_limit_and_not_a_byte_more(small_limit_app, monkeypatch, piece):
    """Inflated in pieces (``INFLATE_PIECE``) and counted as they come: exactly the limit goes
    through, whole, across pieces; one byte more is 413."""
    from shim.server import app as app_module

    monkeypatch.setattr(app_module, "INFLATE_PIECE", piece)
    shim = Caller(http=small_limit_app.test_client())
    data = (np.arange(LIMIT, dtype=np.uint64) * 2654435761 % 251).astype(np.uint8).tobytes()  # pieces differ

    def header(n: int) -> bytes:
        return json.dumps({"inputs": [{"name": "x", "datatype": "UINT8", "shape": [n],
                                       "parameters": {"binary_data_size": n}}],
                           "outputs": [{"name": "x", "parameters": {"binary_data": True}}]}).encode()

    for size, status in ((LIMIT, 200), (LIMIT + 1, 413)):
        n = size - len(header(size))
        n = size - len(header(n))  # the tensor takes what the header leaves of ``size`` bytes
        body = header(n) + data[:n]
        assert len(body) == size
        reply = shim.infer("noop", gzip.compress(body), {HCL: str(len(header(n))), "Content-Encoding": "gzip"})
        if status == 413:
            assert_error(reply, 413, "inflated body is over the limit")
        else:
            out_header, blobs = parse(reply)
            assert out_header["outputs"][0]["shape"] == [n] and blobs["x"] == data[:n]


def test_body_over_the_limit_live(tmp_path):
    empty = tmp_path / "no-models"
    empty.mkdir()
    live = LiveShim(empty, tmp_path, "--max-body-bytes", str(LIMIT), "--classify-model", "")
    try:
        live.wait_ready()
        _check_limit(Caller(url=live.tcp_url))
    finally:
        live.stop()


# --- the accel client maps each status to the same-named exception --------------------------------
CLIENT_CASES = [
    ("gemm-k-mismatch", lambda c: c.gemm(np.zeros((2, 3), np.float32), np.zeros((2, 2), np.float32)),
     accel.InvalidInput, "A's columns"),
    ("gemm-int32", lambda c: c.gemm(np.zeros((2, 2), np.int32), np.zeros((2, 2), np.int32)), accel.InvalidInput, "int32"),
    ("classify-not-image", lambda c: c.classify(b"GIF89a but not really"), accel.InvalidInput, "image[0]"),
    ("classify-truncated", lambda c: c.classify(jpeg()[:len(jpeg()) // 2]), accel.InvalidInput, "truncated"),
    ("classify-top_k", lambda c: c.classify(jpeg(), top_k=0), accel.InvalidInput, "top_k"),
    ("classify-bomb", lambda c: c.classify(bomb_png()), accel.PayloadTooLarge, "pixels"),
    ("unknown-op", lambda c: c.infer("no-such-op", {"x": np.zeros(1)}), accel.OpNotFound, "no-such-op"),
    ("model-wrong-dtype", lambda c: c.infer("efficientnet-lite0", {"input": np.zeros((1, 3, 224, 224))}),
     accel.InvalidInput, "must be FP32, not FP64"),
    ("unknown-input", lambda c: c.infer_tensors("gemm", [accel.Tensor.from_numpy("A", np.eye(2)),
                                                           accel.Tensor.from_numpy("Z", np.eye(2))]),
     accel.InvalidInput, "no input 'Z'"),
]


@pytest.mark.parametrize("call,exc,names", [c[1:] for c in CLIENT_CASES], ids=[c[0] for c in CLIENT_CASES])
def test_client_raises_same_named_exception(inproc_client, call, exc, names):
    with pytest.raises(exc) as info:
        call(inproc_client)
    assert type(info.value) is exc and info.value.status == exc.status and names in str(info.value)
    np.testing.assert_array_equal(inproc_client.gemm(np.eye(2), np.eye(2)), np.eye(2))


def test_client_payload_too_large(small_limit_app):
    client = accel.Client("http://in-process", transport=WSGITransport(small_limit_app))
    with pytest.raises(accel.PayloadTooLarge, match="limit of 100000"):
        client.noop(x=np.zeros(2 * LIMIT, np.uint8))
    np.testing.assert_array_equal(client.noop(x=np.arange(4))["x"], np.arange(4))


def test_live_shim_still_serves_after_all_that(live_shim):
    """The last word: after every bad request above, the live process is up and computes right."""
    assert live_shim.proc.poll() is None
    shim = Caller(url=live_shim.tcp_url)
    assert shim.get("/v2/health/ready").status == 200
    a, b = np.arange(6.0).reshape(2, 3), np.arange(12.0).reshape(3, 4)
    reply = shim.infer("gemm", {"inputs": [{"name": n, "datatype": "FP64", "shape": list(m.shape), "data": m.ravel().tolist()}
                                            for n, m in (("A", a), ("B", b))]})
    assert reply.status == 200
    np.testing.assert_array_equal(np.array(reply.json()["outputs"][0]["data"]).reshape(2, 4), a @ b)
    with accel.Client(live_shim.unix_url) as client:
        assert client.classify(jpeg(), top_k=1)[0].label
