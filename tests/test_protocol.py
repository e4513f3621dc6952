"""Open Inference Protocol (KServe v2) conformance, in-process and against a live ``accelshim serve``.

Messages are built by hand here (json, struct, numpy), never with ``accel.codec``, so that these tests
check the wire format independently of the shim's own codec; tritonclient checks it from outside.
"""
from __future__ import annotations

import gzip
import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import CAT_LABELS, MODELS, encode

HCL = "Inference-Header-Content-Length"
#: protocol datatype -> little-endian numpy dtype, written out here independently of accel.datatypes
NP = {"BOOL": "|b1", "UINT8": "|u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "|i1",
      "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}
#: JSON values that every datatype must carry exactly, extremes included
VALUES: dict[str, list[Any]] = {
    "BOOL": [True, False, True], "UINT8": [0, 255, 7], "UINT16": [0, 65535, 7], "UINT32": [0, 2**32 - 1, 7],
    "UINT64": [0, 2**64 - 1, 7], "INT8": [-128, 127, 0], "INT16": [-2**15, 2**15 - 1, 0],
    "INT32": [-2**31, 2**31 - 1, 0], "INT64": [-2**63, 2**63 - 1, 0], "FP16": [0.5, -65504.0, 2.0**-10],
    "FP32": [1.5, -0.25, 3.4028234663852886e38], "FP64": [1e300, -2.2250738585072014e-308, 0.1],
    "BYTES": ["a", "h\u00e9llo", ""],
}
LABELS = (MODELS / "efficientnet-lite0" / "labels.txt").read_text().splitlines()


# --- two ways to reach a shim, one interface ------------------------------------------------------
@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Caller:
    """``request(method, path, body, headers)`` over Flask's test client or real HTTP (requests)."""

    def __init__(self, http=None, url: str | None = None) -> None:
        self.http, self.url = http, url
        self.session = requests.Session() if url else None

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> Reply:
        if self.http is not None:
            r = self.http.open(path, method=method, data=body, headers=headers or {})
            return Reply(r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.get_data())
        r = self.session.request(method, self.url + path, data=body, headers=headers or {}, timeout=60)
        return Reply(r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content)

    def get(self, path: str) -> Reply:
        return self.request("GET", path)

    def infer(self, op: str, body: bytes | dict, headers: dict | None = None) -> Reply:
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        return self.request("POST", f"/v2/models/{op}/infer", body, headers)


def make_caller(request) -> Caller:
    if request.param == "inproc":
        return Caller(http=request.getfixturevalue("http"))
    return Caller(url=request.getfixturevalue("live_shim").tcp_url)


@pytest.fixture(params=["inproc", "live"])
def shim(request) -> Caller:
    return make_caller(request)


# --- hand-built binary extension ------------------------------------------------------------------
def binary_message(header: dict, blobs: list[bytes]) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + b"".join(blobs), {HCL: str(len(head)), "Content-Type": "application/octet-stream"}


def bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def split_bytes(raw: bytes) -> list[bytes]:
    items, pos = [], 0
    while pos < len(raw):
        (n,) = struct.unpack_from("<I", raw, pos)
        items.append(raw[pos + 4:pos + 4 + n])
        pos += 4 + n
    assert pos == len(raw)
    return items


def parse(reply: Reply) -> tuple[dict, dict[str, bytes]]:
    """A 200 infer reply: its JSON header and the binary data of each binary output."""
    assert reply.status == 200, reply.body[:300]
    n = int(reply.headers.get(HCL.lower(), len(reply.body)))
    header, offset, blobs = json.loads(reply.body[:n]), n, {}
    for out in header["outputs"]:
        assert {"name", "datatype", "shape"} <= set(out)
        size = out.get("parameters", {}).get("binary_data_size")
        if size is not None:
            assert "data" not in out
            blobs[out["name"]] = reply.body[offset:offset + size]
            offset += size
        else:
            assert isinstance(out["data"], list)
    assert offset == len(reply.body), "bytes after the declared binary data"
    return header, blobs


def ref_gemm(a, b, c, alpha, beta) -> np.ndarray:
    return alpha * (a.astype(np.float64) @ b.astype(np.float64)) + beta * c.astype(np.float64)


# --- health and metadata --------------------------------------------------------------------------
def test_health_and_server_metadata(shim):
    for path in ("/v2/health/live", "/v2/health/ready"):
        assert shim.get(path).status == 200
    meta = shim.get("/v2").json()
    assert meta["name"] == "accelshim" and isinstance(meta["version"], str) and meta["version"]
    assert "binary_tensor_data" in meta["extensions"]


METADATA = {
    "noop": ([], []),
    "gemm": ([("A", "FP32", [-1, -1]), ("B", "FP32", [-1, -1]), ("C", "FP32", [-1, -1])], [("C", "FP32", [-1, -1])]),
    "classify": ([("image", "BYTES", [-1])],
                 [("labels", "BYTES", [-1, -1]), ("scores", "FP32", [-1, -1]), ("classes", "INT64", [-1, -1])]),
    "efficientnet-lite0": ([("input", "FP32", [-1, 3, 224, 224])], [("logits", "FP32", [-1, 1000])]),
}


@pytest.mark.parametrize("op", list(METADATA))
def test_model_metadata_and_versions(shim, op):
    meta = shim.get(f"/v2/models/{op}").json()
    assert meta["name"] == op and meta["versions"] == ["1"] and isinstance(meta["platform"], str)
    for key, want in zip(("inputs", "outputs"), METADATA[op]):
        assert [(t["name"], t["datatype"], t["shape"]) for t in meta[key]] == want
    assert shim.get(f"/v2/models/{op}/versions/1").json() == meta
    for path in (f"/v2/models/{op}/ready", f"/v2/models/{op}/versions/1/ready"):
        assert shim.get(path).status == 200
    for method, path in (("GET", ""), ("GET", "/ready"), ("POST", "/infer")):
        reply = shim.request(method, f"/v2/models/{op}/versions/2{path}", b"{}" if method == "POST" else None)
        assert reply.status == 404 and "version" in reply.json()["error"]


@pytest.mark.parametrize("method,path", [("GET", ""), ("GET", "/ready"), ("POST", "/infer")])
def test_unknown_op_is_404_json(shim, method, path):
    reply = shim.request(method, f"/v2/models/no-such-op{path}", b'{"inputs": []}' if method == "POST" else None)
    assert reply.status == 404 and reply.headers["content-type"].startswith("application/json")
    assert "no-such-op" in reply.json()["error"]


# --- JSON tensors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("datatype,tol", [("FP32", 1e-5), ("FP64", 1e-12)])
@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
@pytest.mark.parametrize("ask_outputs", [False, True], ids=["all-outputs", "outputs-list"])
def test_gemm_json(shim, datatype, tol, nested, ask_outputs):
    rng = np.random.default_rng(7)
    a, b, c = (rng.standard_normal(s).astype(NP[datatype]) for s in ((3, 4), (4, 5), (3, 5)))
    pack = (lambda m: m.tolist()) if nested else (lambda m: m.ravel().tolist())
    body = {"id": "req-42", "parameters": {"alpha": 0.5, "beta": 2.0},
            "inputs": [{"name": n, "datatype": datatype, "shape": list(m.shape), "data": pack(m)}
                       for n, m in (("A", a), ("B", b), ("C", c))]}
    if ask_outputs:
        body["outputs"] = [{"name": "C"}]
    reply = shim.infer("gemm", body)
    assert reply.headers["content-type"].startswith("application/json") and HCL.lower() not in reply.headers
    header, blobs = parse(reply)
    assert (header["model_name"], header["model_version"], header["id"]) == ("gemm", "1", "req-42") and not blobs
    (out,) = header["outputs"]
    assert (out["name"], out["datatype"], out["shape"]) == ("C", datatype, [3, 5])
    want = ref_gemm(a, b, c, 0.5, 2.0)
    np.testing.assert_allclose(np.array(out["data"]).reshape(3, 5), want, rtol=tol, atol=tol * np.abs(want).max())


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
@pytest.mark.parametrize("ask_outputs", [False, True], ids=["all-outputs", "outputs-list"])
def test_noop_every_datatype_json(shim, nested, ask_outputs):
    inputs = [{"name": f"t_{dt}", "datatype": dt, "shape": [3, 1] if nested else [3],
               "data": [[v] for v in vals] if nested else vals} for dt, vals in VALUES.items()]
    inputs.append({"name": "empty", "datatype": "FP32", "shape": [0, 4], "data": []})
    body: dict[str, Any] = {"inputs": inputs, "id": "n1"}
    names = [t["name"] for t in inputs]
    if ask_outputs:  # a subset, in another order: the reply follows the request's order
        names = names[::-2]
        body["outputs"] = [{"name": n} for n in names]
    header, _ = parse(shim.infer("noop", body))
    assert header["model_name"] == "noop" and header["id"] == "n1"
    assert [o["name"] for o in header["outputs"]] == names
    given = {t["name"]: t for t in inputs}
    for out in header["outputs"]:
        src = given[out["name"]]
        assert (out["datatype"], out["shape"]) == (src["datatype"], src["shape"])
        assert out["data"] == ([] if out["name"] == "empty" else VALUES[src["datatype"]])


def test_zero_inputs(shim):
    header, blobs = parse(shim.infer("noop", {"inputs": []}))
    assert header["outputs"] == [] and blobs == {}


# --- the binary tensor extension ------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["per-output", "request-level", "json-outputs"])
def test_gemm_binary(shim, mode):
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((6, 7)).astype("<f4"), rng.standard_normal((7, 9)).astype("<f4")
    header: dict[str, Any] = {"id": "bin", "inputs": [
        {"name": n, "datatype": "FP32", "shape": list(m.shape), "parameters": {"binary_data_size": m.nbytes}}
        for n, m in (("A", a), ("B", b))]}
    if mode == "per-output":
        header["outputs"] = [{"name": "C", "parameters": {"binary_data": True}}]
    elif mode == "request-level":
        header["parameters"] = {"binary_data_output": True}
    reply = shim.infer("gemm", *binary_message(header, [a.tobytes(), b.tobytes()]))
    out_header, blobs = parse(reply)
    (out,) = out_header["outputs"]
    assert (out["name"], out["datatype"], out["shape"], out_header["id"]) == ("C", "FP32", [6, 9], "bin")
    if mode == "json-outputs":
        assert not blobs and HCL.lower() not in reply.headers
        got = np.array(out["data"]).reshape(6, 9)
    else:
        assert out["parameters"]["binary_data_size"] == 6 * 9 * 4 == len(blobs["C"])
        assert int(reply.headers[HCL.lower()]) < len(reply.body)
        got = np.frombuffer(blobs["C"], "<f4").reshape(6, 9)
    np.testing.assert_allclose(got, a.astype(np.float64) @ b, rtol=1e-5, atol=1e-5)


def test_noop_every_datatype_binary(shim):
    rng = np.random.default_rng(1)
    arrays = {dt: rng.integers(0, 2 if dt == "BOOL" else 100, (2, 3)).astype(code) for dt, code in NP.items()}
    raws = [a.tobytes() for a in arrays.values()] + [bytes_tensor([b"\x00\xff", b"", b"abc", b"z"])]
    specs = [(f"t_{dt}", dt, [2, 3]) for dt in arrays] + [("t_BYTES", "BYTES", [2, 2])]
    header = {"parameters": {"binary_data_output": True}, "inputs": [
        {"name": n, "datatype": dt, "shape": s, "parameters": {"binary_data_size": len(r)}}
        for (n, dt, s), r in zip(specs, raws)]}
    out_header, blobs = parse(shim.infer("noop", *binary_message(header, raws)))
    assert [(o["name"], o["datatype"], o["shape"]) for o in out_header["outputs"]] == specs
    for (name, _, _), raw, out in zip(specs, raws, out_header["outputs"]):
        assert blobs[name] == raw and out["parameters"]["binary_data_size"] == len(raw)


def test_mixed_binary_and_json_outputs(shim):
    x = np.arange(6, dtype="<f4").reshape(2, 3) / 4
    s = [b"\x00\xff", b"", b"abc"]
    header = {"parameters": {"binary_data_output": True}, "inputs": [
        {"name": "x", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": x.nbytes}},
        {"name": "y", "datatype": "INT64", "shape": [2], "data": [-5, 2**40]},
        {"name": "s", "datatype": "BYTES", "shape": [3], "parameters": {"binary_data_size": len(bytes_tensor(s))}}],
        "outputs": [{"name": "s"}, {"name": "y", "parameters": {"binary_data": False}}, {"name": "x"}]}
    out_header, blobs = parse(shim.infer("noop", *binary_message(header, [x.tobytes(), bytes_tensor(s)])))
    outs = {o["name"]: o for o in out_header["outputs"]}
    assert list(outs) == ["s", "y", "x"] and set(blobs) == {"s", "x"}
    assert outs["y"]["data"] == [-5, 2**40] and "parameters" not in outs["y"]
    assert split_bytes(blobs["s"]) == s and outs["s"]["parameters"]["binary_data_size"] == len(blobs["s"])
    np.testing.assert_array_equal(np.frombuffer(blobs["x"], "<f4").reshape(2, 3), x)


@pytest.fixture(scope="module")
def images(chelsea, coffee) -> list[bytes]:
    return [encode(chelsea, "JPEG", quality=90), encode(coffee, "PNG")]


@pytest.mark.parametrize("binary_out", [True, False], ids=["binary-out", "json-out"])
def test_classify_bytes_binary(shim, images, binary_out):
    raw = bytes_tensor(images)
    header = {"parameters": {"top_k": 3, "binary_data_output": binary_out},
              "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(raw)}}]}
    out_header, blobs = parse(shim.infer("classify", *binary_message(header, [raw])))
    outs = {o["name"]: o for o in out_header["outputs"]}
    assert {n: (o["datatype"], o["shape"]) for n, o in outs.items()} == {
        "labels": ("BYTES", [2, 3]), "scores": ("FP32", [2, 3]), "classes": ("INT64", [2, 3])}
    if binary_out:
        labels = [b.decode() for b in split_bytes(blobs["labels"])]
        scores = np.frombuffer(blobs["scores"], "<f4").reshape(2, 3)
        classes = np.frombuffer(blobs["classes"], "<i8").reshape(2, 3)
    else:
        assert not blobs
        labels, scores, classes = outs["labels"]["data"], np.array(outs["scores"]["data"]).reshape(2, 3), \
            np.array(outs["classes"]["data"]).reshape(2, 3)
    assert labels[0] in CAT_LABELS and labels[3] == "espresso"
    assert labels == [LABELS[i] for i in classes.ravel()]
    assert np.all(np.diff(scores, axis=1) <= 0) and np.all(scores > 0) and np.all(scores.sum(axis=1) <= 1 + 1e-6)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
@pytest.mark.parametrize("form", ["json", "binary"])
def test_compressed_request_body(shim, encoding, form):
    a = np.arange(12, dtype="<f8").reshape(3, 4)
    b = np.ones((4, 2), dtype="<f8")
    if form == "json":
        body, headers = json.dumps({"inputs": [{"name": n, "datatype": "FP64", "shape": list(m.shape), "data": m.ravel().tolist()}
                                               for n, m in (("A", a), ("B", b))]}).encode(), {}
    else:  # Inference-Header-Content-Length counts the inflated message
        body, headers = binary_message({"inputs": [
            {"name": n, "datatype": "FP64", "shape": list(m.shape), "parameters": {"binary_data_size": m.nbytes}}
            for n, m in (("A", a), ("B", b))]}, [a.tobytes(), b.tobytes()])
    packed = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
    header, _ = parse(shim.infer("gemm", packed, {**headers, "Content-Encoding": encoding}))
    np.testing.assert_array_equal(np.array(header["outputs"][0]["data"]).reshape(3, 2), a @ b)


# --- tritonclient against the live shim -------------------------------------------------------------
@pytest.fixture()
def triton(live_shim):
    httpclient = pytest.importorskip("tritonclient.http")
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{live_shim.port}")
    yield httpclient, client
    client.close()


def test_tritonclient_health_and_metadata(triton):
    _, client = triton
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("gemm") and not client.is_model_ready("gemm", "2")
    assert not client.is_model_ready("no-such-op")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    meta = client.get_model_metadata("classify", model_version="1")
    assert meta["inputs"][0]["datatype"] == "BYTES" and [o["name"] for o in meta["outputs"]] == ["labels", "scores", "classes"]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_gemm(triton, binary):
    httpclient, client = triton
    rng = np.random.default_rng(11)
    a, b = rng.standard_normal((5, 8)).astype(np.float32), rng.standard_normal((8, 4)).astype(np.float32)
    inputs = [httpclient.InferInput(n, list(m.shape), "FP32") for n, m in (("A", a), ("B", b))]
    for t, m in zip(inputs, (a, b)):
        t.set_data_from_numpy(m, binary_data=binary)
    result = client.infer("gemm", inputs, request_id="t1", parameters={"alpha": 2.0},
                          outputs=[httpclient.InferRequestedOutput("C", binary_data=binary)])
    assert result.get_response()["id"] == "t1"
    np.testing.assert_allclose(result.as_numpy("C"), 2.0 * (a.astype(np.float64) @ b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_tritonclient_classify_jpeg(triton, images, compression):
    httpclient, client = triton
    image = httpclient.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([images[0]], dtype=np.object_), binary_data=True)
    result = client.infer("classify", [image], parameters={"top_k": 2}, request_compression_algorithm=compression)
    labels, scores = result.as_numpy("labels"), result.as_numpy("scores")
    assert labels.shape == scores.shape == (1, 2) and labels[0, 0].decode() in CAT_LABELS
    assert scores.dtype == np.float32 and 0 < scores[0, 1] <= scores[0, 0] <= 1
    assert [LABELS[i] for i in result.as_numpy("classes")[0]] == [s.decode() for s in labels[0]]


def test_tritonclient_error_is_an_inference_server_exception(triton):
    httpclient, client = triton
    x = httpclient.InferInput("x", [1], "FP32")
    x.set_data_from_numpy(np.zeros(1, np.float32))
    with pytest.raises(Exception, match="no-such-op") as info:
        client.infer("no-such-op", [x])
    assert info.value.status() == "404"


def test_advertised_extensions_are_served(triton, live_shim):
    """Each extension of GET /v2 that has endpoints answers on them (tritonclient calls them)."""
    _, client = triton
    checks = {
        "statistics": lambda: client.get_inference_statistics("gemm")["model_stats"][0]["name"] == "gemm",
        "model_repository": lambda: {"gemm", "classify"} <= {m["name"] for m in client.get_model_repository_index()},
        "model_repository_metadata": lambda: "gemm" in {m["name"] for m in Caller(url=live_shim.tcp_url).get(
            "/v2/models").json()["models"]},
    }
    extensions = client.get_server_metadata()["extensions"]
    for name in extensions:
        assert checks.get(name, lambda: True)(), name


# --- Prometheus metrics -----------------------------------------------------------------------------
def _requests_total(shim: Caller) -> dict[tuple[str, str], float]:
    reply = shim.get("/metrics")
    assert reply.status == 200 and reply.headers["content-type"].startswith("text/plain")
    return {(s.labels["op"], s.labels["status"]): s.value
            for family in text_string_to_metric_families(reply.body.decode())
            for s in family.samples if s.name == "accelshim_requests_total"}


def test_metrics_count_requests(shim):
    before = _requests_total(shim)
    good = {"inputs": [{"name": n, "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3, 4]} for n in "AB"]}
    for _ in range(3):
        assert shim.infer("gemm", good).status == 200
    bad = {"inputs": [good["inputs"][0], {"name": "B", "datatype": "FP32", "shape": [3, 1], "data": [1, 2, 3]}]}
    assert shim.infer("gemm", bad).status == 400
    assert shim.infer("no-such-op", good).status == 404
    after = _requests_total(shim)
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    assert delta[("gemm", "200")] == 3 and delta[("gemm", "400")] == 1 and delta[("_unknown", "404")] == 1


def test_statistics_count_successes_and_failures(shim):
    """GET /v2/models/{op}/stats (statistics extension) counts runs, items and failures of the op."""
    def gemm_stats() -> dict:
        reply = shim.get("/v2/models/gemm/stats")
        assert reply.status == 200
        (entry,) = reply.json()["model_stats"]
        assert entry["name"] == "gemm" and entry["version"] == "1"
        return entry

    before = gemm_stats()
    good = {"inputs": [{"name": n, "datatype": "FP32", "shape": [3, 3], "data": list(range(9))} for n in "AB"]}
    for _ in range(2):
        assert shim.infer("gemm", good).status == 200
    bad = {"inputs": [good["inputs"][0], {"name": "B", "datatype": "FP32", "shape": [2, 1], "data": [1, 2]}]}
    assert shim.infer("gemm", bad).status == 400
    after = gemm_stats()
    ok, fail = after["inference_stats"]["success"], after["inference_stats"]["fail"]
    assert ok["count"] - before["inference_stats"]["success"]["count"] == 2 and ok["ns"] > before["inference_stats"]["success"]["ns"]
    assert fail["count"] - before["inference_stats"]["fail"]["count"] == 1
    assert after["inference_count"] - before["inference_count"] == 6  # 2 requests of 3 rows
    assert after["last_inference"] >= before["last_inference"] > 0 or before["execution_count"] == 0
    assert shim.get("/v2/models/no-such-op/stats").status == 404
    names = {m["name"] for m in shim.get("/v2/models/stats").json()["model_stats"]}
    assert {"noop", "gemm", "classify"} <= names
