"""The accel client's timeout comes from of-watchdog's ``exec_timeout`` less a margin, so that a slow shim
gets the client's JSON error (with the call id) before the watchdog cuts the call with a bare 504."""
from __future__ import annotations

import logging
import socket
import time
from typing import Iterator

import pytest
import requests

import accel
from tests.template.conftest import TEMPLATE

EXAMPLE_HANDLER = (TEMPLATE / "function" / "handler.py").read_text()


@pytest.fixture()
def hung_shim() -> Iterator[str]:
    """A loopback "shim" that takes connections into its backlog and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


def test_a_hung_shim_gets_the_clients_json_error_before_exec_timeout(start_index, hung_shim):
    fn = start_index(EXAMPLE_HANDLER, mode="http", exec_timeout="2s", ACCEL_SHIM_URL=hung_shim).wait_listening()
    started = time.monotonic()
    r = requests.post(fn.url + "/", data=b"hello", headers={"X-Call-Id": "call-7"}, timeout=10)
    took = time.monotonic() - started
    assert took < 2.0, f"{took:.2f}s: the watchdog would have answered its own 504 at 2 s"  # 1.5 s + the path
    assert r.status_code == 503 and r.headers["Content-Type"] == "application/json"
    body = r.json()
    assert body["call_id"] == "call-7" and "cannot reach the shim" in body["error"]
    assert "timeout 1.5s" in fn.log


@pytest.mark.parametrize("environment, timeout", [
    ({"exec_timeout": "30s"}, 27.0),    # 10%
    ({"exec_timeout": "10"}, 9.0),      # whole seconds, as the watchdog reads them
    ({"exec_timeout": "2s"}, 1.5),      # at least 0.5 s of margin
    ({"exec_timeout": "1h"}, 3595.0),   # at most 5 s
    ({"exec_timeout": "800ms"}, 0.4),   # never below half of it
    ({"exec_timeout": "1m", "ACCEL_TIMEOUT": "45"}, 45.0),       # the explicit override wins
    ({"exec_timeout": "1m", "ACCEL_TIMEOUT": "2.5"}, 2.5),
    ({"exec_timeout": "1m", "ACCEL_TIMEOUT": "1m30s"}, 90.0),
    ({}, None),                          # unset: the client's own default
    ({"exec_timeout": ""}, None),
    ({"exec_timeout": "0"}, None),      # 0: the watchdog sets no limit
])
def test_client_timeout_from_exec_timeout(index, environment, timeout):
    assert index.client_timeout(environment) == timeout


@pytest.mark.parametrize("environment, fallback, warning", [
    ({"exec_timeout": "thirty"}, None, "exec_timeout='thirty' is not a duration"),
    ({"exec_timeout": "1.5"}, None, "exec_timeout='1.5' is not a duration"),  # no unit: not one to the watchdog
    ({"exec_timeout": "20s", "ACCEL_TIMEOUT": "soon"}, 18.0, "ACCEL_TIMEOUT='soon' is not a positive duration"),
    ({"exec_timeout": "20s", "ACCEL_TIMEOUT": "-3"}, 18.0, "ACCEL_TIMEOUT='-3' is not a positive duration"),
    ({"ACCEL_TIMEOUT": "inf"}, None, "ACCEL_TIMEOUT='inf' is not a positive duration"),
])
def test_invalid_values_are_logged_and_ignored(index, caplog, environment, fallback, warning):
    with caplog.at_level(logging.WARNING, logger="function"):
        assert index.client_timeout(environment) == fallback
    assert warning in caplog.text


def test_the_clients_default_stays_when_exec_timeout_is_unset(start_index):
    fn = start_index(EXAMPLE_HANDLER).wait_listening()
    default = accel.Client("http://127.0.0.1:1").timeout
    assert f"timeout {default:.1f}s\n" in fn.log and "exec_timeout" not in fn.log


def test_a_requests_x_timeout_ends_its_accel_calls_before_the_watchdog_does(start_index, hung_shim):
    """of-watchdog lets a request lower exec_timeout for itself (``X-Timeout``, a Go duration no longer
    than exec_timeout); the calls the handler makes for it end in time as well: the caller gets the
    JSON error, not the watchdog's bare 504 at 1 s, nor a wait of the client's 27 s."""
    fn = start_index(EXAMPLE_HANDLER, mode="http", exec_timeout="30s", ACCEL_SHIM_URL=hung_shim).wait_listening()
    started = time.monotonic()
    r = requests.post(fn.url + "/", data=b"hello", headers={"X-Call-Id": "call-8", "X-Timeout": "1s"}, timeout=40)
    took = time.monotonic() - started
    assert took < 1.0, f"{took:.2f}s: the watchdog would have answered its own 504 at 1 s"
    assert r.status_code in (503, 504) and r.json()["call_id"] == "call-8", r.text


@pytest.mark.parametrize("header, exec_timeout, seconds", [
    ("2s", 30.0, 1.5),          # less the margin, as the client's timeout
    ("500ms", 30.0, 0.25),      # never below half
    ("1m", 30.0, None),         # longer than exec_timeout: the watchdog ignores it
    ("30s", 30.0, 27.0),        # as long: taken
    ("5", 30.0, None),          # no unit: not a Go duration
    ("soon", 30.0, None),
    ("0s", 30.0, None),         # <= 0: the watchdog sets no limit for the request
    ("-1s", 30.0, None),
    ("2s", None, None),         # not behind the watchdog
    ("2s", 0.0, None),          # exec_timeout 0: the watchdog takes no X-Timeout above it
    (None, 30.0, None),
])
def test_request_timeout_from_x_timeout(index, header, exec_timeout, seconds):
    assert index.request_timeout(header, exec_timeout) == seconds
