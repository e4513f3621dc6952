"""The accel client over real sockets (TCP and unix), its retries, headers and import cost."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import accel
from accel.transport import parse_url
from tests.conftest import CAT_LABELS, encode, free_port


@pytest.fixture(params=["tcp", "unix"])
def client(request, live_shim):
    url = live_shim.tcp_url if request.param == "tcp" else live_shim.unix_url
    with accel.Client(url, timeout=20) as c:
        yield c


def test_every_call_over_both_transports(client, chelsea, coffee):
    assert client.live() and client.ready()
    assert "binary_tensor_data" in client.server_metadata()["extensions"]
    assert client.metadata("classify")["outputs"][1]["name"] == "scores"
    x = np.arange(12, dtype=np.int32).reshape(3, 4)
    out = client.noop(x=x, s=np.array([b"a", b"\x00\xff"], dtype=object))
    np.testing.assert_array_equal(out["x"], x)
    assert list(out["s"]) == [b"a", b"\x00\xff"]
    assert client.noop() == {}
    a, b = np.random.rand(50, 40), np.random.rand(40, 30)
    np.testing.assert_allclose(client.gemm(a, b), a @ b, rtol=1e-12)
    batch = client.classify([encode(chelsea, "JPEG"), encode(coffee, "JPEG")])
    assert batch[0][0].label in CAT_LABELS and batch[1][0].label == "espresso"


def test_large_tensor_round_trip(client):
    big = np.random.default_rng(0).standard_normal((512, 1024)).astype(np.float32)  # 2 MiB
    np.testing.assert_array_equal(client.noop(x=big)["x"], big)


def test_typed_errors(client):
    with pytest.raises(accel.OpNotFound):
        client.infer("no-such-op", {"x": np.zeros(1)})
    with pytest.raises(accel.InvalidInput, match="A's columns"):
        client.gemm(np.zeros((2, 3)), np.zeros((4, 2)))
    with pytest.raises(accel.InvalidInput, match="not an image"):
        client.classify(b"certainly not a picture")


def test_threads_share_one_client(client):
    errors = []

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(10):
            a, b = rng.random((8, 8)), rng.random((8, 8))
            if not np.allclose(client.gemm(a, b), a @ b):
                errors.append(seed)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_forwarded_headers_are_scoped(live_shim):
    seen = []
    client = accel.Client(live_shim.tcp_url)

    class Spy:
        def request(self, method, path, body, headers, timeout):
            seen.append(dict(headers))
            return client_transport.request(method, path, body, headers, timeout)

        def close(self):
            client_transport.close()

    client_transport = client._transport
    client._transport = Spy()
    with client.headers({"X-Call-Id": "abc"}):
        client.noop()
    client.noop()
    assert seen[0]["X-Call-Id"] == "abc" and "X-Call-Id" not in seen[1]


def test_retries_until_the_shim_comes_up(models_dir, tmp_path):
    """Connection refused and 503 (warming up) are retried with backoff within the timeout."""
    port = free_port()
    client = accel.Client(f"http://127.0.0.1:{port}", timeout=60, retries=40)
    result = {}
    caller = threading.Thread(target=lambda: result.setdefault("c", client.gemm(np.eye(2), np.eye(2))))
    caller.start()
    time.sleep(0.3)  # the client is now retrying "connection refused"
    shim = _serve_on(models_dir, port)
    try:
        caller.join(60)
        np.testing.assert_array_equal(result["c"], np.eye(2))
    finally:
        shim.terminate()
        try:
            shim.wait(10)
        except subprocess.TimeoutExpired:
            shim.kill()
            shim.wait()


def _serve_on(models_dir, port):
    return subprocess.Popen([sys.executable, "-m", "shim", "serve", "--port", str(port), "--device", "cpu",
                             "--models", str(models_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_unreachable_shim_raises_shim_unavailable(tmp_path):
    client = accel.Client(f"unix://{tmp_path}/absent.sock", timeout=0.5, retries=3)
    start = time.monotonic()
    with pytest.raises(accel.ShimUnavailable):
        client.noop()
    assert time.monotonic() - start < 2.0
    assert client.ready() is False


@pytest.mark.parametrize("url,parsed", [
    ("http://127.0.0.1:8000", ("http", "127.0.0.1", 8000)),
    ("http://localhost", ("http", "localhost", 80)),
    ("http://[::1]:9000", ("http", "::1", 9000)),
    ("unix:///run/accel.sock", ("unix", "/run/accel.sock", 0)),
])
def test_parse_url(url, parsed):
    assert parse_url(url) == parsed


@pytest.mark.parametrize("url", ["ftp://x", "http://", "http://h:99999", "unix://", "nonsense"])
def test_bad_urls(url):
    with pytest.raises(accel.InvalidInput):
        accel.Client(url)


def test_import_accel_loads_no_heavy_module():
    code = ("import sys, accel; heavy = [m for m in ('numpy', 'requests', 'flask', 'onnxruntime', 'cupy', "
            "'http.client', 'email', 'dataclasses', 'typing') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_classify_needs_no_numpy(live_shim, chelsea):
    jpeg = encode(chelsea, "JPEG")
    code = ("import sys, accel; p = accel.Client(sys.argv[1]).classify(sys.stdin.buffer.read()); "
            "print(p[0].label); print('numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, live_shim.unix_url], input=jpeg, capture_output=True,
                         check=True).stdout.decode().splitlines()
    assert out[0] in CAT_LABELS and out[1] == "False"


def test_a_deadline_block_ends_its_calls_in_time_and_nests():
    """``with client.deadline(s)``: every call in the block ends within ``s`` (or the client's timeout);
    an inner block cannot extend an outer one; a call with no time left is not sent at all."""
    import socket

    with socket.socket() as hung:  # takes connections into its backlog, never answers
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)
        client = accel.Client(f"http://127.0.0.1:{hung.getsockname()[1]}", timeout=30)
        started = time.monotonic()
        with client.deadline(0.4), pytest.raises(accel.AccelError):
            client.noop(x=np.arange(3))
        assert time.monotonic() - started < 3.0
        started = time.monotonic()
        with client.deadline(0.4), client.deadline(20), pytest.raises(accel.AccelError):
            client.noop(x=np.arange(3))
        assert time.monotonic() - started < 3.0
        with client.deadline(0), pytest.raises(accel.DeadlineExceeded, match="no time was left"):
            client.noop(x=np.arange(3))
        client.close()
