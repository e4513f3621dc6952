"""A request's time as of-watchdog keeps it (``X-Timeout``, else exec_timeout) bounds all of its accel
calls, probes included: ``Client.deadline`` and index.py's ``request_timeout``."""
from __future__ import annotations

import http.client
import socket
import time

import pytest

import accel
from tests.template.test_index_timeout import EXAMPLE_HANDLER, hung_shim  # noqa: F401 - fixture


@pytest.fixture()
def hung_client():
    with socket.socket() as hung:  # takes connections into its backlog, never answers
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)
        client = accel.Client(f"http://127.0.0.1:{hung.getsockname()[1]}", timeout=30)
        yield client
        client.close()


# --- 1. probes end by the deadline too ----------------------------------------------------------
def test_ready_in_a_deadline_block_ends_by_the_deadline(hung_client):
    """``deadline``: "End every call made in this with block within seconds". ``ready()`` (``_probe``)
    uses min(timeout, 5 s) and never reads the scoped deadline."""
    started = time.monotonic()
    with hung_client.deadline(0.3):
        assert hung_client.ready() is False
    took = time.monotonic() - started
    assert took < 1.0, f"ready() took {took:.2f}s in a 0.3 s deadline block"


def test_wait_ready_in_a_deadline_block_ends_by_the_deadline(hung_client):
    hung_client.timeout = 3.0  # keep the failing run short; the bug is the same at 30 s
    started = time.monotonic()
    with hung_client.deadline(0.3), pytest.raises(accel.NotReady):
        hung_client.wait_ready()
    took = time.monotonic() - started
    assert took < 1.0, f"wait_ready() took {took:.2f}s in a 0.3 s deadline block"


def test_the_template_example_get_with_x_timeout_answers_before_the_watchdog_cuts_it(start_index, hung_shim):
    """The template's own example handler answers GET with ``context.accel.ready()``: with
    ``X-Timeout: 1s`` the watchdog answers its bare 504 at 1 s while ready() waits 5 s."""
    fn = start_index(EXAMPLE_HANDLER, mode="http", exec_timeout="30s", ACCEL_SHIM_URL=hung_shim).wait_listening()
    import requests

    started = time.monotonic()
    r = requests.get(fn.url + "/", headers={"X-Call-Id": "call-9", "X-Timeout": "1s"}, timeout=40)
    took = time.monotonic() - started
    assert took < 1.0, f"{took:.2f}s: the watchdog would have answered its own 504 at 1 s ({r.status_code})"


# --- 2. X-Timeout as the watchdog reads it: header transport details ---------------------------
def test_x_timeout_sent_twice_is_taken_as_go_takes_it_the_first(index):
    """of-watchdog forwards every X-Timeout line and reads ``r.Header.Get`` (the first); waitress joins
    repeated header lines with ", ", which is no Go duration: index.py then applies none."""
    assert index.request_timeout("1s, 20s", 30.0) == 0.5


def test_x_timeout_in_microseconds_as_utf8_is_read(index):
    """Go reads the header's bytes: "1500000µs" is 1.5 s to the watchdog. WSGI hands index.py the
    bytes decoded as latin-1 ("1500000Âµs"), which ``parse_duration``'s "µs" never matches."""
    as_wsgi_gives_it = "1500000\u00b5s".encode("utf-8").decode("latin-1")
    assert index.request_timeout(as_wsgi_gives_it, 30.0) == 1.0


def test_x_timeout_sent_twice_end_to_end(start_index, hung_shim):
    fn = start_index(EXAMPLE_HANDLER, mode="http", exec_timeout="30s", ACCEL_SHIM_URL=hung_shim).wait_listening()
    conn = http.client.HTTPConnection("127.0.0.1", fn.port, timeout=40)
    started = time.monotonic()
    conn.putrequest("POST", "/")
    conn.putheader("X-Timeout", "1s")  # what the watchdog takes (the first line)
    conn.putheader("X-Timeout", "20s")
    conn.putheader("Content-Length", "5")
    conn.endheaders(b"hello")
    status = conn.getresponse().status
    took = time.monotonic() - started
    conn.close()
    assert took < 1.0, f"{took:.2f}s (status {status}): the watchdog would have answered its own 504 at 1 s"


# --- 3. without X-Timeout: the watchdog's exec_timeout, for all the calls together ------------------
TWO_CALLS = '''import accel
from accel import Tensor


def handle(event, context):
    for _ in range(2):  # e.g. a fallback call after the first failed, or two ops in sequence
        try:
            context.accel.infer_tensors("noop", [Tensor.from_bytes_list("body", [event.body])])
        except accel.ShimUnavailable:
            pass
    return {"statusCode": 200, "body": "done"}
'''


def test_a_request_without_x_timeout_still_ends_its_accel_calls_before_exec_timeout(start_index, hung_shim):
    """Without X-Timeout only the per-call client timeout applies (exec_timeout less the margin):
    two calls in one request run 2 x 1.5 s past the watchdog's 2 s: its bare 504."""
    fn = start_index(TWO_CALLS, mode="http", exec_timeout="2s", ACCEL_SHIM_URL=hung_shim).wait_listening()
    import requests

    started = time.monotonic()
    r = requests.post(fn.url + "/", data=b"hello", timeout=20)
    took = time.monotonic() - started
    assert took < 2.0, f"{took:.2f}s ({r.status_code}): the watchdog would have answered its own 504 at 2 s"
