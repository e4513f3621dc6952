"""Tests of the example handler: ``python -m pytest function`` in the built function folder.

The round trips need a shim: set ACCEL_SHIM_URL (``accelshim up`` and the repository's tests do);
without one they are skipped and the rest still runs.
"""
import os
import socket
from types import SimpleNamespace

import pytest

import accel

from .handler import handle


def _event(method="POST", body=b"", headers=None):
    return SimpleNamespace(method=method, body=body, headers=headers or {}, query={}, path="/")


def _context(url):
    return SimpleNamespace(accel=accel.Client(url, timeout=5.0), call_id="test", hostname="test")


@pytest.fixture()
def shim_context():
    url = os.environ.get("ACCEL_SHIM_URL")
    if not url or not accel.Client(url, timeout=5.0).ready():
        pytest.skip("no ready shim at $ACCEL_SHIM_URL")
    return _context(url)


def test_get_reports_an_unreachable_shim_as_not_ready():
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    result = handle(_event("GET"), _context(url))
    assert result == {"statusCode": 200, "body": {"shim": url, "ready": False}}


def test_get_reports_a_ready_shim(shim_context):
    assert handle(_event("GET"), shim_context)["body"]["ready"] is True


def test_post_echoes_the_body_through_the_shim(shim_context):
    body = bytes(range(256)) * 4
    result = handle(_event(body=body, headers={"Content-Type": "application/x-test"}), shim_context)
    assert result["statusCode"] == 200
    assert result["body"] == body
    assert result["headers"]["Content-Type"] == "application/x-test"
