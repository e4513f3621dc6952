"""KaaS through the HTTP API (Flask test client) and through ``accel.Client`` (in-process transport)."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

import accel
from tests.conftest import WSGITransport
from tests.kaas_util import buf, jacobi_request, jacobi_system, kernel


@pytest.fixture(scope="module")
def kaas_service(tmp_path_factory):
    """A whole shim (no models: the KaaS part is what is tested) on the CPU backend."""
    from shim.config import Settings
    from shim.service import build_service

    svc = build_service(Settings(device="cpu", models_dir=tmp_path_factory.mktemp("nomodels"), classify_model="",
                                 buffer_store_bytes=1 << 20))
    svc.load()
    return svc


@pytest.fixture()
def http(kaas_service):
    return kaas_service.app.test_client()


@pytest.fixture()
def client(kaas_service):
    return accel.Client("http://in-process", transport=WSGITransport(kaas_service.app))


def test_buffers_over_http(http):
    assert http.put("/v1/buffers/h1", data=b"\x00\x01\x02").get_json() == {"key": "h1", "size": 3}
    r = http.get("/v1/buffers/h1")
    assert r.status_code == 200 and r.data == b"\x00\x01\x02" and r.content_type == "application/octet-stream"
    listing = http.get("/v1/buffers").get_json()
    assert {"key": "h1", "size": 3, "location": "store", "const": False, "dirty": False} in listing["buffers"]
    assert listing["store_capacity_bytes"] == 1 << 20
    assert http.delete("/v1/buffers/h1").get_json() == {"deleted": "h1"}
    r = http.get("/v1/buffers/h1")
    assert r.status_code == 404 and "no buffer 'h1'" in r.get_json()["error"]
    assert http.delete("/v1/buffers/h1").status_code == 404
    assert http.put("/v1/buffers/a..b", data=b"x").status_code == 400
    assert http.put("/v1/buffers/full", data=b"x" * ((1 << 20) + 1)).status_code == 507


def test_kaas_over_http_and_its_errors(http):
    assert http.post("/v1/kaas", data=b"{not json").status_code == 400
    r = http.post("/v1/kaas", data=gzip.compress(b"{}"), headers={"Content-Encoding": "gzip"})
    assert r.status_code == 400
    libs = http.get("/v1/kaas/libraries").get_json()
    assert libs["device"] == "cpu" and {lib["name"] for lib in libs["libraries"]} == {"blas", "elementwise", "jacobi"}
    request = {"kernels": [kernel("elementwise", "fill", [(buf("h2", 16), "o")], [("Q", 4), ("f", 7.0)])]}
    r = http.post("/v1/kaas", data=json.dumps(request))
    assert r.status_code == 200 and r.get_json()["outputs"] == [{"name": "h2", "key": "h2", "size": 16}]
    assert np.frombuffer(http.get("/v1/buffers/h2").data, np.float32).tolist() == [7.0] * 4
    request["kernels"][0]["library"] = "nope"
    r = http.post("/v1/kaas", data=json.dumps(request))
    assert r.status_code == 404 and "unknown kernel library 'nope'" in r.get_json()["error"]
    request["kernels"][0].update(library="elementwise", nIter=3)
    assert http.post("/v1/kaas", data=json.dumps(request)).status_code == 400


def test_jacobi_through_the_client_and_const_hits_in_metrics(client, http):
    n = 64
    a, b = jacobi_system(n, seed=5)
    client.put_buffer("cA", a)
    client.put_buffer("cb", b)
    client.put_buffer("cx", np.zeros(n, np.float32))
    before = _const_hits(http)
    request = jacobi_request(n, 60, a_key="cA", b_key="cb", x_key="cx")
    first = client.kaas(request)
    second = client.kaas(request)
    assert first["cache"] == {"hits": 0, "misses": 3}   # A, b, x uploaded
    assert second["cache"] == {"hits": 3, "misses": 0}  # all resident (x updated in place on the device)
    assert _const_hits(http) == before + 1
    x = client.get_buffer("cx", dtype=np.float32)
    assert x.shape == (n,)
    np.testing.assert_allclose(x, np.linalg.solve(a.astype(np.float64), b), rtol=1e-4, atol=1e-5)
    listing = {b["key"]: b for b in client.list_buffers()}
    assert listing["cA"]["const"] is True and listing["cA"]["location"] == "store+gpu"
    assert first["timings_ms"]["kernels"][0] == {"library": "jacobi", "kernel": "jacobi_step",
                                                 "ms": first["timings_ms"]["kernels"][0]["ms"]}


def test_client_errors_are_the_accel_exceptions(client):
    with pytest.raises(accel.OpNotFound, match="'nothing-here'"):
        client.get_buffer("nothing-here")
    with pytest.raises(accel.OpNotFound, match="key 'absent'"):
        client.kaas({"kernels": [kernel("elementwise", "copy", [(buf("x", 16, key="absent"), "i"), (buf("y", 16), "o")],
                                        [("Q", 4)])]})
    with pytest.raises(accel.InvalidInput, match="literal type"):
        client.kaas({"kernels": [kernel("elementwise", "fill", [(buf("y", 16), "o")], [("Q", 4), ("z", 1)])]})
    with pytest.raises(accel.InsufficientStorage):
        client.put_buffer("huge", b"\0" * ((1 << 20) + 1))
    with pytest.raises(accel.InvalidInput):
        client.put_buffer("a/b", b"x")
    client.put_buffer("gone", b"x")
    client.delete_buffer("gone")
    with pytest.raises(accel.OpNotFound):
        client.delete_buffer("gone")


def _const_hits(http) -> float:
    for line in http.get("/metrics").data.decode().splitlines():
        if line.startswith('accelshim_kaas_cache_hits_total{kind="const"}'):
            return float(line.split()[-1])
    raise AssertionError("no const hit counter in /metrics")
