"""Faults: an error fails its own request alone; a lost device makes the shim fail what is in
flight with 503 and exit 3, and ``accelshim up``'s supervisor starts a new one; SIGTERM drains;
a kill -9 under load costs the retrying clients nothing but time."""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import accel
from shim.backends import nvjpeg
from shim.faults import EXIT_DEVICE_LOST
from tests.conftest import LiveShim, WSGITransport, free_port
from tests.shim_test_ops import ENTRY, test_ops


def http(url: str, op: str, body: dict, timeout: float = 30.0) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/v2/models/{op}/infer", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def sleep_body(seconds: float) -> dict:
    return {"inputs": [{"name": "x", "datatype": "INT32", "shape": [1], "data": [7]}], "parameters": {"seconds": seconds}}


def in_threads(n: int, fn) -> tuple[list[threading.Thread], list]:
    out: list = []
    threads = [threading.Thread(target=lambda: out.append(fn())) for _ in range(n)]
    for t in threads:
        t.start()
    return threads, out


def live(tmp: Path, *extra: str, port: int | None = None) -> LiveShim:
    models = tmp / "models"
    models.mkdir(exist_ok=True)
    shim = LiveShim(models, tmp, "--classify-model", "", "--threads", "4", *extra, entry=ENTRY, port=port)
    shim.wait_ready(60)
    return shim


def inflight(url: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith("accelshim_inflight_requests "):
                return float(line.split()[1])
    return 0.0


def wait_for(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


# --- one request's error is its own --------------------------------------------------------------
@pytest.fixture(scope="module")
def with_test_ops(models_dir):
    from shim.config import Settings
    from shim.service import build_service

    svc = build_service(Settings(device="cpu", models_dir=models_dir, classify_model=""), extra_ops=test_ops())
    svc.load()
    return svc


def test_an_error_fails_its_own_request_alone(with_test_ops):
    client = accel.Client("http://x", transport=WSGITransport(with_test_ops.app))
    results: list = []

    def good() -> None:
        results.append(client.infer("efficientnet-lite0", {"input": np.zeros((1, 3, 224, 224), np.float32)})["logits"].shape)

    for _ in range(2):
        with pytest.raises(accel.InternalError, match="injected kernel failure"):
            client.infer("fail", {"x": np.arange(3)})
        # the raw model fails inside onnxruntime on an empty batch: that request alone
        with pytest.raises(accel.AccelError, match="ONNXRuntimeError") as info:
            client.infer("efficientnet-lite0", {"input": np.zeros((0, 3, 224, 224), np.float32)})
        assert info.value.status == 500
        threads = [threading.Thread(target=good) for _ in range(2)]
        for t in threads:
            t.start()
        with pytest.raises(accel.InvalidInput):
            client.gemm(np.zeros((2, 3)), np.zeros((2, 2)))
        for t in threads:
            t.join(30)
    assert results == [(1, 1000)] * 4
    assert with_test_ops.guard.monitor.fault is None  # none of that was sticky
    np.testing.assert_array_equal(client.gemm(np.eye(2), np.eye(2)), np.eye(2))


# --- a lost device ------------------------------------------------------------------------------
def test_device_lost_fails_in_flight_with_503_and_exits_3(tmp_path):
    shim = live(tmp_path)
    try:
        threads, out = in_threads(2, lambda: http(shim.tcp_url, "sleep", sleep_body(1.0)))
        wait_for(lambda: inflight(shim.tcp_url) == 2)
        status, body = http(shim.tcp_url, "lose_device", {"inputs": []})
        assert status == 503 and "CUDA context is lost" in body["error"]
        for t in threads:
            t.join(30)
        assert [s for s, _ in out] == [503, 503], out  # computed on a lost device: not answered as good
        assert all("device was lost" in b["error"] for _, b in out)
        assert shim.proc.wait(20) == EXIT_DEVICE_LOST
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", shim.port), timeout=2).close()
        assert "device lost" in shim.log.read_text()
    finally:
        shim.stop()


def test_up_supervisor_restarts_a_shim_that_lost_its_device(tmp_path):
    """``accelshim up`` supervises the shim like its functions: exit 3, then a fresh shim; the client
    retries across the gap and never sees it."""
    import sys

    from shim.up.supervisor import LogMux, ProcessSpec, Supervisor

    (tmp_path / "models").mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, *ENTRY, "serve", "--port", str(port), "--device", "cpu", "--models",
            str(tmp_path / "models"), "--classify-model", ""]
    log = io.StringIO()
    supervisor = Supervisor(LogMux(log), backoff=(0.1, 1.0))
    child = supervisor.start(ProcessSpec("shim", argv, Path.cwd(), dict(os.environ), probe=accel.Client(url).ready))
    try:
        supervisor.wait_ready(child, 60)
        supervisor.watch(interval=0.05)
        client = accel.Client(url, timeout=60)
        with pytest.raises(accel.NotReady, match="CUDA context is lost"):
            accel.Client(url, timeout=10, retries=0).infer("lose_device", {"x": np.arange(1)})
        first = child.pid
        np.testing.assert_array_equal(client.gemm(np.eye(3), np.eye(3)), np.eye(3))  # on the new shim
        assert child.restarts == 1 and child.pid != first
        assert f"shim exited with {EXIT_DEVICE_LOST}" in log.getvalue()
    finally:
        supervisor.stop_all()


# --- a failed warm-up ----------------------------------------------------------------------------
def broken_models(models_dir: Path, tmp: Path, how: str) -> Path:
    """A copy of the repository whose model cannot be loaded (``unloadable``: half its ONNX file) or
    loads and runs but has 10 labels for its 1000 classes (``labels``: the warm-up's check fails after
    the model ran on the device)."""
    folder = tmp / "models" / "efficientnet-lite0"
    shutil.copytree(models_dir / "efficientnet-lite0", folder)
    if how == "unloadable":
        onnx = folder / "model.onnx"
        onnx.write_bytes(onnx.read_bytes()[:onnx.stat().st_size // 2])
    else:
        labels = folder / json.loads((folder / "model.json").read_text())["labels"]
        labels.write_text("\n".join(labels.read_text().splitlines()[:10]) + "\n")
    return folder.parent


WHY = {"unloadable": "efficientnet-lite0", "labels": "1000 classes out of the model, 10 labels"}


@pytest.mark.parametrize("flags", [("--device", "cpu"), pytest.param(("--device", "cuda"), marks=pytest.mark.gpu),
                                   pytest.param(("--device", "cuda", "--gpu-jpeg"), marks=pytest.mark.gpu)])
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("how", ["unloadable", "labels"])
def test_a_failed_warm_up_exits_1_at_once_and_says_why(models_dir, tmp_path, how, workers, flags):
    """A model that cannot be loaded, or whose classes and labels differ in number, fails the
    warm-up: the shim exits 1 at once (the device process and its request workers), never ready,
    its log saying why. (On the H200 a device process with workers whose warm-up had failed hung in
    the interpreter's teardown.)"""
    if "--gpu-jpeg" in flags and nvjpeg.library_path() is None:
        pytest.skip("the nvidia-nvjpeg wheel is not installed")
    started = time.monotonic()
    shim = LiveShim(broken_models(models_dir, tmp_path, how), tmp_path, *flags, "--workers", str(workers))
    try:
        assert shim.proc.wait(60) == 1
        took = time.monotonic() - started
    finally:
        shim.stop()
    log = shim.log.read_text()
    assert "warm-up failed; stopping" in log and WHY[how] in log, log
    assert took < 20 and "did not stop" not in log, f"{took:.1f} s:\n{log}"  # no worker killed after 38 s
    for pid in re.findall(r"request workers \(pids ([\d ]+)\)", log)[0].split() if workers > 1 else []:
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid), 0)


# --- SIGTERM drains ------------------------------------------------------------------------------
def test_sigterm_finishes_in_flight_requests_then_exits_0(tmp_path):
    shim = live(tmp_path)
    try:
        threads, out = in_threads(3, lambda: http(shim.tcp_url, "sleep", sleep_body(1.5)))
        wait_for(lambda: inflight(shim.tcp_url) == 3)
        shim.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(OSError):  # no longer accepting
            socket.create_connection(("127.0.0.1", shim.port), timeout=2).close()
        for t in threads:
            t.join(30)
        assert [s for s, _ in out] == [200, 200, 200], out
        assert all(b["outputs"][0]["data"] == [7] for _, b in out)
        assert shim.proc.wait(20) == 0
        assert not shim.sock.exists()
    finally:
        shim.stop()


# --- kill -9 under load ---------------------------------------------------------------------------
def test_kill_9_under_load_loses_no_acknowledged_buffer(tmp_path):
    """Clients (two tenants) put buffers, read them back, run noop and gemm, over TCP and the unix
    socket, while the shim is SIGKILLed and started again on the same ``--state-dir``: every call
    succeeds (retried across the gap) or fails with an explicit error, and every put that was
    acknowledged is still there, byte for byte, afterwards."""
    from shim.auth import hash_token

    tokens = {"t0": "tenant-zero-token-0123", "t1": "tenant-one-token-45678"}
    (tmp_path / "tokens").write_text("".join(f"{t}: {hash_token(v)}\n" for t, v in tokens.items()))
    extra = ("--state-dir", str(tmp_path / "state"), "--tokens", str(tmp_path / "tokens"))
    shim = live(tmp_path, *extra)
    port = shim.port
    stop = threading.Event()
    ok, errors, unexpected = [0], [], []
    acked: dict[tuple[str, str], bytes] = {}

    def worker(i: int) -> None:
        tenant = f"t{i % 2}"
        client = accel.Client(shim.unix_url if i % 2 else shim.tcp_url, timeout=30, token=tokens[tenant])
        n = 0
        while not stop.is_set():
            n += 1
            try:
                if n % 3 == 0:
                    np.testing.assert_allclose(client.gemm(np.eye(8) * i, np.ones((8, 2))), np.ones((8, 2)) * i)
                else:
                    key, data = f"w{i}-{n}", os.urandom(64 + n % 1000)
                    client.put_buffer(key, data)
                    acked[(tenant, key)] = data
                    assert client.get_buffer(key) == data
                ok[0] += 1
            except accel.AccelError as exc:
                errors.append(exc)
            except BaseException as exc:  # noqa: BLE001 - anything else is a silent failure
                unexpected.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        before = ok[0]
        shim.proc.kill()  # SIGKILL: no drain, no goodbye
        shim.proc.wait(10)
        shim.stop()
        shim = live(tmp_path, *extra, port=port)  # a new shim on the same port, socket and state
        wait_for(lambda: ok[0] > before + 20, timeout=30)
    finally:
        stop.set()
        for t in threads:
            t.join(40)
    try:
        assert not unexpected, unexpected[:3]
        assert not errors, errors[:3]  # every call retried across the restart within its timeout
        assert before > 0 and ok[0] > before + 20
        for tenant, token in tokens.items():
            client = accel.Client(shim.tcp_url, timeout=10, token=token)
            mine = {k: v for (t, k), v in acked.items() if t == tenant}
            assert {b["key"] for b in client.list_buffers()} >= set(mine)
            for key, data in mine.items():
                assert client.get_buffer(key) == data, key
    finally:
        shim.stop()
