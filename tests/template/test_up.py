"""``accelshim up`` end to end: the repository's stack with its own shim, a new function made from
the template with a stack of its own, restarts, and a clean stop that drains the call in flight."""
from __future__ import annotations

import io
import json
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import requests

from tests.conftest import CAT_LABELS, ROOT, encode, free_port

MATMUL = '''"""A function made from the python3-accel template: a matrix product on the shim, and an echo."""
import json
import os
import time

import numpy as np


def handle(event, context):
    if event.query.get("crash"):
        os._exit(3)
    time.sleep(float(event.query.get("sleep", 0)))
    if event.method == "POST" and event.body:
        doc = json.loads(event.body)
        c = context.accel.gemm(np.asarray(doc["a"], dtype=np.float32), np.asarray(doc["b"], dtype=np.float32))
        return {"body": {"c": c.tolist()}}
    return {"body": {"method": event.method, "path": event.path, "query": event.query.to_dict(flat=False),
                     "headers": {k: v for k, v in event.headers.items() if k.startswith("X-")},
                     "call_id": context.call_id, "greeting": os.environ.get("GREETING"),
                     "shim": context.accel.url}}
'''


@pytest.fixture(scope="module")
def repo_up(module_up_factory, models_dir):
    """The repository's stack.yml, with a shim of its own."""
    return module_up_factory(ROOT / "stack.yml", "--shim-port", "0", "--device", "cpu",
                             "--models", str(models_dir)).wait_ready()


@pytest.fixture(scope="module")
def reuse_up(module_up_factory, make_project, live_shim, tmp_path_factory):
    """A new project from the template folder, on the session's shim."""
    stack = make_project(tmp_path_factory.mktemp("reuse"), {"matmul": MATMUL},
                         {"GREETING": "hi", "ACCEL_SHIM_URL": "unix:///nowhere.sock"})
    return module_up_factory(stack, "--shim-url", live_shim.unix_url).wait_ready()


# --- the example functions through the gateway ----------------------------------------------
@pytest.mark.parametrize("route", ["classify", "classify.openfaas-fn"])
def test_classify_the_cat(repo_up, chelsea, route):
    r = requests.post(f"{repo_up.url}/function/{route}", data=encode(chelsea, "JPEG", quality=90), timeout=30)
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/json"
    predictions = r.json()["predictions"]
    assert len(predictions) == 5 and predictions[0]["label"] in CAT_LABELS
    assert set(predictions[0]) == {"label", "score", "index"}


def test_classify_top_k_and_png(repo_up, chelsea):
    r = requests.post(f"{repo_up.url}/function/classify", params={"top_k": 2}, data=encode(chelsea, "PNG"), timeout=30)
    assert [p["label"] in CAT_LABELS for p in r.json()["predictions"]] == [True, True]


def test_classify_text_is_a_json_400_that_says_so(repo_up):
    r = requests.post(f"{repo_up.url}/function/classify", data=b"certainly not a picture", timeout=30)
    assert r.status_code == 400 and "not an image" in r.json()["error"]


def test_gemm_json(repo_up):
    r = requests.post(f"{repo_up.url}/function/gemm", json={"a": [[1, 2], [3, 4]], "b": [[5], [6]], "c": [[1], [1]],
                                                            "alpha": 2, "beta": 3}, timeout=30)
    assert r.status_code == 200 and r.json() == {"c": [[37.0], [81.0]]}


def test_gemm_npz_gives_npy(repo_up):
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((64, 32)).astype(np.float64), rng.standard_normal((32, 16)).astype(np.float64)
    body = io.BytesIO()
    np.savez(body, a=a, b=b)
    r = requests.post(f"{repo_up.url}/function/gemm", data=body.getvalue(), params={"beta": 0},
                      headers={"Content-Type": "application/x-npz"}, timeout=30)
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/x-npy"
    c = np.load(io.BytesIO(r.content), allow_pickle=False)
    assert c.dtype == np.float64
    np.testing.assert_allclose(c, a @ b, rtol=1e-12)


def test_gemm_bad_shapes_is_a_json_400_with_the_call_id(repo_up):
    r = requests.post(f"{repo_up.url}/function/gemm", json={"a": [[1, 2]], "b": [[1, 2]]},
                      headers={"X-Call-Id": "bad-shapes"}, timeout=30)
    assert r.status_code == 400 and r.json()["call_id"] == "bad-shapes" and "rows" in r.json()["error"]


def test_jacobi_solves_through_the_gateway(repo_up):
    r = requests.post(f"{repo_up.url}/function/jacobi", json={"a": [[4, 1], [1, 3]], "b": [1, 2], "iterations": 60},
                      timeout=30)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["x"], np.linalg.solve([[4, 1], [1, 3]], [1, 2]), rtol=1e-5)
    assert r.json()["relative_residual"] < 1e-5


def test_system_functions_has_the_openfaas_shape(repo_up):
    requests.post(f"{repo_up.url}/function/gemm", json={"a": [[1]], "b": [[2]]}, timeout=30)
    functions = {f["name"]: f for f in requests.get(f"{repo_up.url}/system/functions", timeout=5).json()}
    assert set(functions) == {"classify", "gemm", "jacobi"}
    gemm = functions["gemm"]
    for key in ("name", "image", "namespace", "replicas", "availableReplicas", "invocationCount", "envProcess",
                "labels", "annotations"):
        assert key in gemm
    assert (gemm["image"], gemm["namespace"], gemm["envProcess"]) == ("accelshim/gemm:latest", "openfaas-fn",
                                                                       "python index.py")
    assert gemm["replicas"] == gemm["availableReplicas"] == 1 and gemm["invocationCount"] >= 1
    assert gemm["limits"] == {"memory": "512Mi", "cpu": "500m"}
    assert requests.get(f"{repo_up.url}/system/functions", params={"namespace": "other"}, timeout=5).json() == []
    assert requests.get(f"{repo_up.url}/system/function/classify", timeout=5).json()["name"] == "classify"


def test_unknown_function_or_namespace_is_404(repo_up):
    assert requests.post(f"{repo_up.url}/function/nope", timeout=5).status_code == 404
    assert requests.post(f"{repo_up.url}/function/gemm.other-ns", timeout=5).status_code == 404
    assert requests.get(f"{repo_up.url}/healthz", timeout=5).text == "OK\n"


def test_logs_are_prefixed_and_the_banner_shows_urls_and_curl(repo_up):
    log = repo_up.log
    for prefix in ("shim     | ", "classify | ", "gemm     | ", "gateway  | ", "up       | "):
        assert prefix in log
    assert f"{repo_up.url}/function/classify" in log
    assert f"curl --data-binary @cat.jpg {repo_up.url}/function/classify" in log


# --- a new function made from the template ------------------------------------------------
def test_new_function_calls_gemm_on_the_shim(reuse_up):
    r = requests.post(f"{reuse_up.url}/function/matmul", json={"a": [[1, 2, 3]], "b": [[1], [1], [1]]}, timeout=30)
    assert r.status_code == 200 and r.json() == {"c": [[6.0]]}


@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE"])
def test_gateway_keeps_method_path_query_headers(reuse_up, live_shim, method):
    r = requests.request(method, f"{reuse_up.url}/function/matmul.openfaas-fn/a/b?x=1&x=2&y=z",
                         headers={"X-Custom": "kept"}, timeout=30)
    echo = r.json()
    assert (echo["method"], echo["path"], echo["query"]) == (method, "/a/b", {"x": ["1", "2"], "y": ["z"]})
    assert echo["headers"]["X-Custom"] == "kept"
    assert uuid.UUID(echo["call_id"]) and echo["headers"]["X-Call-Id"] == echo["call_id"] == r.headers["X-Call-Id"]
    assert int(echo["headers"]["X-Start-Time"]) <= time.time_ns()
    assert float(r.headers["X-Duration-Seconds"]) >= 0
    # the stack's environment reaches the function, but up points ACCEL_SHIM_URL at its shim
    assert echo["greeting"] == "hi" and echo["shim"] == live_shim.unix_url


def test_callers_call_id_is_kept(reuse_up):
    r = requests.get(f"{reuse_up.url}/function/matmul", headers={"X-Call-Id": "mine"}, timeout=30)
    assert r.json()["call_id"] == "mine" and r.headers["X-Call-Id"] == "mine"


def test_a_function_that_dies_is_restarted(reuse_up):
    r = requests.get(f"{reuse_up.url}/function/matmul", params={"crash": 1}, timeout=30)
    assert r.status_code == 502
    deadline = time.monotonic() + 20
    while True:
        r = requests.get(f"{reuse_up.url}/function/matmul", timeout=30)
        if r.status_code == 200:
            break
        assert time.monotonic() < deadline, r.text
        time.sleep(0.1)
    assert "matmul exited with 3; restarting" in reuse_up.log
    assert "matmul is ready again" in reuse_up.log


# --- stopping -----------------------------------------------------------------------------
def test_sigterm_drains_the_call_in_flight_and_stops_everything(up_factory, make_project, models_dir, tmp_path: Path,
                                                                live_processes_under):
    shim_port = free_port()
    up = up_factory(make_project(tmp_path, {"matmul": MATMUL}), "--shim-port", str(shim_port), "--device", "cpu",
                    "--models", str(models_dir)).wait_ready()
    sock = up.build_dir.parent / "run" / "accel.sock"
    assert sock.exists() and live_processes_under(up.build_dir)
    answers: list[requests.Response] = []
    slow = threading.Thread(target=lambda: answers.append(
        requests.get(f"{up.url}/function/matmul", params={"sleep": 1.0}, timeout=30)))
    slow.start()
    time.sleep(0.4)
    assert up.stop() == 0
    slow.join()
    assert answers[0].status_code == 200 and answers[0].json()["query"] == {"sleep": ["1.0"]}
    assert live_processes_under(up.build_dir) == []
    assert not sock.exists()
    for port in (up.port, shim_port):
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/", timeout=2)
    log = up.log
    assert "SIGTERM: stopping" in log and log.rstrip().endswith("stopped")
    # the gateway answers its call in flight, then the function drains, then the shim stops
    assert (log.index("gateway | GET /function/matmul 200") < log.index("INFO function: SIGTERM: draining")
            < log.index("shim.server.serving: signal SIGTERM"))


def test_the_json_example_of_the_banner_is_valid(repo_up):
    """The gemm curl line that the banner prints works as printed."""
    line = next(l for l in repo_up.log.splitlines() if "try: curl -d" in l)
    body = line.split("-d '", 1)[1].rsplit("' ", 1)[0]
    r = requests.post(f"{repo_up.url}/function/gemm", data=body, timeout=30)
    assert r.status_code == 200 and json.loads(r.text) == {"c": [[17.0], [39.0]]}
