"""The python3-http handler contract of the template's index.py, through Flask's test client, with a
real accel client on the live shim; and SIGTERM draining of a real ``python index.py``."""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import flask
import pytest
import requests
from werkzeug.exceptions import abort

import accel
from accel.transport import HTTPTransport
from shim.up.build import shrinkwrap
from shim.up.stack import load_stack
from tests.conftest import free_port


class RecordingTransport:
    """The real HTTP transport, remembering the headers of every call (to see what reaches the shim)."""

    def __init__(self, url: str) -> None:
        self.inner = HTTPTransport(url)
        self.headers: list[dict[str, str]] = []

    def request(self, method, path, body, headers, timeout):
        self.headers.append(dict(headers))
        return self.inner.request(method, path, body, headers, timeout)

    def close(self) -> None:
        self.inner.close()


class Handler:
    """One handler for every case: the path says which return form or failure to produce."""

    def __init__(self) -> None:
        self.clients: list[int] = []

    def handle(self, event, context):
        self.clients.append(id(context.accel))
        case = event.path.strip("/")
        if case == "none":
            return None
        if case == "dict":
            return {"statusCode": 201, "body": {"k": "v"}, "headers": {"X-A": "1"}}
        if case == "text":
            return {"body": "plain"}
        if case == "bytes":
            return {"body": b"\x00\xff", "headers": {"Content-Type": "application/octet-stream"}}
        if case == "list":
            return {"statusCode": 202, "body": [1, 2], "headers": [("X-B", "2")]}
        if case == "empty":
            return {"statusCode": 204}
        if case == "flask":
            return flask.Response("made by flask", status=207, headers={"X-C": "3"}, mimetype="text/x-flask")
        if case == "tuple":
            return "a tuple", 203
        if case == "str":
            return "a string"
        if case == "boom":
            raise RuntimeError("the handler broke")
        if case == "invalid":
            raise accel.InvalidInput("that input is wrong")
        if case == "refused":
            raise accel.Unauthorized("no valid bearer token (the token file /run/secrets/t is empty)")
        if case == "abort":
            abort(418)
        if case == "gemm":
            c = context.accel.gemm([[1.0, 2.0]], [[3.0], [4.0]])
            return {"body": {"c": c.tolist(), "call_id": context.call_id}}
        return {"body": {"method": event.method, "path": event.path, "query": event.query.to_dict(flat=False),
                         "custom": event.headers.get("X-Custom"), "body": event.body.decode(),
                         "call_id": context.call_id, "hostname": context.hostname}}


@pytest.fixture()
def transport(live_shim) -> RecordingTransport:
    return RecordingTransport(live_shim.tcp_url)


@pytest.fixture()
def handler() -> Handler:
    return Handler()


@pytest.fixture()
def app_client(index, handler, transport):
    return index.create_app(handler, accel.Client("http://shim", transport=transport)).test_client()


@pytest.mark.parametrize("path, status, body, headers", [
    ("/none", 200, b"", {}),
    ("/dict", 201, b'{"k":"v"}', {"X-A": "1", "Content-Type": "application/json"}),
    ("/text", 200, b"plain", {}),
    ("/bytes", 200, b"\x00\xff", {"Content-Type": "application/octet-stream"}),
    ("/list", 202, b"[1,2]", {"X-B": "2", "Content-Type": "application/json"}),
    ("/empty", 204, b"", {}),
    ("/flask", 207, b"made by flask", {"X-C": "3", "Content-Type": "text/x-flask; charset=utf-8"}),
    ("/tuple", 203, b"a tuple", {}),
    ("/str", 200, b"a string", {}),
])
def test_every_return_form(app_client, path, status, body, headers):
    r = app_client.post(path)
    assert r.status_code == status
    assert r.get_data().replace(b"\n", b"") == body
    for key, value in headers.items():
        assert r.headers[key] == value
    assert r.headers["X-Call-Id"]


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_event_has_method_path_query_headers_body(app_client, method):
    r = app_client.open("/some/path?x=1&x=2&y=", method=method, data=b"payload",
                        headers={"X-Custom": "yes", "X-Call-Id": "call-1"})
    assert r.status_code == 200
    assert r.get_json() == {"method": method, "path": "/some/path", "query": {"x": ["1", "2"], "y": [""]},
                            "custom": "yes", "body": "payload", "call_id": "call-1",
                            "hostname": r.get_json()["hostname"]}
    assert r.headers["X-Call-Id"] == "call-1"


def test_a_handler_exception_is_a_json_500_with_the_call_id(app_client):
    r = app_client.post("/boom", headers={"X-Call-Id": "call-2"})
    assert r.status_code == 500 and r.is_json
    assert r.get_json() == {"error": "RuntimeError: the handler broke", "call_id": "call-2"}
    assert r.headers["X-Call-Id"] == "call-2"


def test_without_a_call_id_one_is_made_and_returned(app_client):
    r = app_client.post("/boom")
    call_id = r.get_json()["call_id"]
    assert uuid.UUID(call_id) and r.headers["X-Call-Id"] == call_id


def test_accel_errors_keep_their_status_http_errors_theirs(app_client):
    r = app_client.post("/invalid", headers={"X-Call-Id": "call-3"})
    assert r.status_code == 400 and r.get_json() == {"error": "that input is wrong", "call_id": "call-3"}
    r = app_client.post("/abort")
    assert r.status_code == 418 and r.is_json and "error" in r.get_json()


def test_the_shim_refusing_the_functions_token_is_a_502_not_the_callers_401(app_client):
    r = app_client.post("/refused", headers={"X-Call-Id": "call-6"})
    assert r.status_code == 502 and "this function's credentials" in r.get_json()["error"]
    assert "/run/secrets/t" in r.get_json()["error"] and "WWW-Authenticate" not in r.headers


def test_method_not_allowed_is_json(app_client):
    r = app_client.open("/", method="TRACE")
    assert r.status_code == 405 and r.is_json


def test_call_id_reaches_the_shim_and_the_client_is_shared(app_client, handler, transport):
    first = app_client.post("/gemm", headers={"X-Call-Id": "call-4"})
    second = app_client.post("/gemm", headers={"X-Call-Id": "call-5"})
    assert first.get_json() == {"c": [[11.0]], "call_id": "call-4"}
    infer_calls = [h for h in transport.headers if "X-Call-Id" in h]
    assert [h["X-Call-Id"] for h in infer_calls] == ["call-4", "call-5"]
    assert second.status_code == 200 and len(set(handler.clients)) == 1


def test_shim_unreachable_is_503(index, handler):
    client = accel.Client(f"http://127.0.0.1:{free_port()}", timeout=0.3)
    r = index.create_app(handler, client).test_client().post("/gemm")
    assert r.status_code == 503 and "cannot reach the shim" in r.get_json()["error"]


def test_listen_port(index):
    assert index.listen_port({}) == 5000
    assert index.listen_port({"upstream_url": "http://127.0.0.1:5001"}) == 5001
    assert index.listen_port({"upstream_url": "http://127.0.0.1:5001", "http_port": "6000"}) == 6000


SLOW_HANDLER = '''import time

def handle(event, context):
    time.sleep(float(event.query.get("sleep", 0)))
    return {"body": {"slept": event.query.get("sleep")}}
'''


def test_sigterm_drains_the_request_in_flight_then_exits(tmp_path: Path, make_project, live_shim):
    stack = load_stack(make_project(tmp_path / "project", {"slow": SLOW_HANDLER}))
    context = shrinkwrap(stack.functions["slow"], tmp_path / "build")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "index.py"], cwd=context, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={"http_port": str(port), "ACCEL_SHIM_URL": live_shim.unix_url,
                                                           "PATH": "/usr/bin:/bin"})
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 20
        while True:
            try:
                assert requests.get(url, timeout=2).status_code == 200
                break
            except requests.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
                time.sleep(0.05)
        answers = []
        slow = threading.Thread(target=lambda: answers.append(requests.get(url, params={"sleep": "1.0"}, timeout=10)))
        slow.start()
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        with pytest.raises(requests.ConnectionError):  # no longer accepting
            requests.get(url, timeout=2)
        slow.join()
        assert answers[0].status_code == 200 and answers[0].json() == {"slept": "1.0"}
        assert proc.wait(10) == 0
        assert b"SIGTERM: draining" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
