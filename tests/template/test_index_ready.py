"""of-watchdog's ``ready_path``: the image names a route that index.py serves itself (never the user's
handler), so that the watchdog's ``/_/ready`` fails until waitress listens."""
from __future__ import annotations

import re
import threading
import time

import pytest
import requests

import accel
from tests.conftest import free_port
from tests.template.conftest import TEMPLATE

RECORDING_HANDLER = '''import time

time.sleep(1.0)  # a slow import: the process runs, waitress does not listen yet


def handle(event, context):
    return {"statusCode": 418, "body": {"handler": event.path}}
'''


class Recorder:
    def __init__(self) -> None:
        self.paths: list[str] = []

    def handle(self, event, context):
        self.paths.append(event.path)
        return {"body": {"handler": event.path}}


def image_ready_path() -> str:
    """The ``ready_path`` that the Dockerfile gives of-watchdog."""
    found = re.search(r'^\s*ready_path="([^"]*)"', (TEMPLATE / "Dockerfile").read_text(), re.MULTILINE)
    assert found, "the Dockerfile sets no ready_path for of-watchdog"
    return found.group(1)


def watchdog_ready(upstream_url: str, ready_path: str) -> bool:
    """of-watchdog's ``/_/ready`` with ``ready_path`` set: a GET of that path upstream, ready on a 2xx;
    an upstream that refuses the connection makes the watchdog answer 500."""
    try:
        return 200 <= requests.get(upstream_url + ready_path, timeout=2).status_code < 300
    except requests.ConnectionError:
        return False


@pytest.fixture()
def recorder() -> Recorder:
    return Recorder()


def _app(index, recorder, stopping=None):
    client = accel.Client(f"http://127.0.0.1:{free_port()}", timeout=0.3)
    return index.create_app(recorder, client, stopping).test_client()


def test_the_images_ready_path_is_answered_by_index_py_not_the_handler(index, recorder):
    path = image_ready_path()
    assert path == index.READY_PATH and path.startswith("/_/")  # the watchdog's own prefix
    stopping = threading.Event()
    app = _app(index, recorder, stopping)
    r = app.get(path)
    assert r.status_code == 200 and r.get_data() == b"ready\n"
    assert app.head(path).status_code == 200
    for method in ("POST", "PUT", "DELETE"):
        r = app.open(path, method=method)
        assert r.status_code == 405 and r.is_json and r.get_json()["error"]
    stopping.set()  # SIGTERM: the pod is going away
    assert app.get(path).status_code == 503
    assert recorder.paths == []


def test_paths_beside_the_ready_path_still_reach_the_handler(index, recorder):
    app = _app(index, recorder)
    for path in ("/", "/ready", "/_/readyz", "/_/ready/more", "/_/health", "/x/_/ready"):
        assert app.get(path).get_json() == {"handler": path}
    assert recorder.paths == ["/", "/ready", "/_/readyz", "/_/ready/more", "/_/health", "/x/_/ready"]


def test_the_watchdogs_readiness_fails_until_waitress_listens(start_index):
    fn = start_index(RECORDING_HANDLER)
    path = image_ready_path()
    checks = []
    deadline = time.monotonic() + 20
    while not fn.listening():
        assert fn.proc.poll() is None and time.monotonic() < deadline, fn.log
        checks.append(watchdog_ready(fn.url, path))
        time.sleep(0.05)
    assert checks and not any(checks)  # the process was up for a second: never ready before listening
    assert watchdog_ready(fn.url, path)
    r = requests.get(fn.url + path, timeout=2)
    assert r.status_code == 200 and r.text == "ready\n"  # not the handler's 418
