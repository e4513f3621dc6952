"""Request workers (``accelshim serve --workers N``): N processes in front of the device process.

The link alone (errors, out-of-order replies, a device that goes away), then a live shim with two
workers on the CPU backend: the same answers as a single process, the state that lives in the
device process (metrics, statistics, shared memory, KaaS buffers), tokens, a worker killed under
load, and SIGTERM.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import pytest

import accel
from accel.errors import InvalidInput, NotReady, Unauthorized
from shim.auth import hash_token
from shim.faults import DeviceLost
from shim.workers.link import Deferred, LinkClient, LinkClosed, LinkServer

from .conftest import CAT_LABELS, LiveShim, encode


# --- the link --------------------------------------------------------------------------------
@pytest.fixture()
def link(tmp_path):
    release = threading.Event()

    def slow(x: int) -> int:
        release.wait(10)
        return x * 10

    def fail(kind: str) -> None:
        if kind == "input":
            raise InvalidInput("bad tensor 'A'")
        if kind == "lost":
            raise DeviceLost("CUDA error 700")
        raise KeyError("a bug")

    recorded: list[tuple] = []
    handlers = {"echo": lambda *a: a, "slow": slow, "fail": fail, "record": lambda *a: recorded.append(a)}
    key = os.urandom(16)
    server = LinkServer(str(tmp_path / "link.sock"), key, handlers, threads=8)
    closed = threading.Event()
    client = LinkClient(server.address, key, on_close=closed.set)
    yield client, server, release, recorded, closed
    release.set()
    client.close()
    server.close()


def test_link_returns_results_and_arrays(link):
    client, *_ = link
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    got = client.call("echo", a, {"k": [1, 2]})
    np.testing.assert_array_equal(got[0], a)
    assert got[1] == {"k": [1, 2]}


def test_link_answers_out_of_order(link):
    client, _server, release, *_ = link
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(client.call, "slow", 4)
        time.sleep(0.1)
        assert client.call("echo", 1) == (1,)  # not stuck behind the slow call
        assert not slow.done()
        release.set()
        assert slow.result(5) == 40


def test_link_call_later_is_answered_on_the_readers_thread(link):
    client, _server, release, *_ = link
    slow = client.call_later("slow", 4)
    answered_on: list[str] = []
    called = threading.Event()  # callbacks run after the Future's waiters are woken

    def note(_done: Future) -> None:
        answered_on.append(threading.current_thread().name)
        called.set()

    slow.add_done_callback(note)
    assert client.call_later("echo", 1).result(5) == (1,)  # not behind the slow one
    assert not slow.done()
    release.set()
    assert slow.result(5) == 40
    assert called.wait(5)
    assert answered_on == ["link-reader"]  # set where the reply came in: no thread woken to hand it on
    assert isinstance(client.call_later("fail", "input").exception(5), InvalidInput)
    assert isinstance(client.call_later("fail", "lost").exception(5), DeviceLost)
    with pytest.raises(Exception, match="pickle"):
        client.call_later("echo", threading.Lock())  # cannot be sent: raised, and not left waiting
    assert not client._waiting  # noqa: SLF001


def test_a_call_that_comes_in_as_the_device_side_closes_is_told_to_retry(link):
    client, server, *_ = link
    server._pool.shutdown(wait=False)  # noqa: SLF001 - where close() leaves the pool as readers finish
    with pytest.raises(NotReady, match="stopping"):
        client.call("echo", 1)


def test_link_carries_errors_by_class(link):
    client, *_ = link
    with pytest.raises(InvalidInput, match="bad tensor 'A'"):
        client.call("fail", "input")
    with pytest.raises(DeviceLost, match="CUDA error 700"):
        client.call("fail", "lost")
    with pytest.raises(accel.errors.InternalError, match="KeyError"):
        client.call("fail", "bug")
    with pytest.raises(accel.errors.InternalError, match="no method 'nope'"):
        client.call("nope")


def test_link_notify_and_a_refused_key(link, tmp_path):
    client, server, _release, recorded, _closed = link
    client.notify("record", "classify", 200)
    client.call("echo")  # after the notification on the same connection
    assert recorded == [("classify", 200)]
    from multiprocessing import AuthenticationError

    with pytest.raises(AuthenticationError):
        LinkClient(server.address, b"wrong key")
    assert client.call("echo", 2) == (2,)  # the server goes on


def test_link_closing_fails_waiting_calls_with_503(link):
    client, server, _release, _recorded, closed = link
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(client.call, "slow", 1)
        time.sleep(0.1)
        server.close()
        with pytest.raises(NotReady):
            waiting.result(5)
    assert closed.wait(5)
    with pytest.raises(LinkClosed):
        client.call("echo")


def test_deferred_calls_hold_no_thread_and_are_answered_as_their_futures_end(tmp_path):
    """A Deferred handler starts its call on the reader thread and returns a Future: more calls can
    wait than the pool has threads, the pool still answers other calls, and each reply (result or
    error, whichever thread sets it) reaches its own caller."""
    pending: dict[int, Future] = {}

    def later(x: int) -> Future:
        if x < 0:
            raise InvalidInput(f"negative {x}")  # refused at once
        pending[x] = Future()
        return pending[x]

    key = os.urandom(16)
    server = LinkServer(str(tmp_path / "link.sock"), key, {"later": Deferred(later), "echo": lambda *a: a}, threads=2)
    client = LinkClient(server.address, key)
    try:
        with ThreadPoolExecutor(7) as pool:
            calls = {x: pool.submit(client.call, "later", x) for x in range(6)}
            deadline = time.monotonic() + 5
            while len(pending) < 6 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert sorted(pending) == list(range(6))  # six waiting on a pool of two threads
            assert client.call("echo", 1) == (1,)
            with pytest.raises(InvalidInput, match="negative -1"):
                client.call("later", -1)
            for x in (5, 0, 3, 1):  # out of order, from other threads
                threading.Thread(target=pending[x].set_result, args=(np.full(3, x),)).start()
            pending[2].set_exception(DeviceLost("CUDA error 700"))
            pending[4].set_result(lambda: None)  # cannot be pickled: an error, not a hang
            for x in (0, 1, 3, 5):
                np.testing.assert_array_equal(calls[x].result(5), np.full(3, x))
            with pytest.raises(DeviceLost, match="CUDA error 700"):
                calls[2].result(5)
            with pytest.raises(accel.errors.InternalError, match="pickle|lambda"):
                calls[4].result(5)
    finally:
        client.close()
        server.close()


def test_a_reply_never_waits_for_a_worker_that_is_slow_to_read():
    """A deferred reply is posted by the thread that completes its Future (a batcher's): it returns at
    once even when the peer reads nothing, the link's writer sending the rest (and any message posted
    meanwhile); a thread that may wait (a pool thread's reply) waits its turn. Once the peer reads,
    every message arrives whole. To a peer that is gone a post is dropped, a send raises."""
    import socket
    from multiprocessing.connection import Connection

    from shim.workers.channel import Channel

    a, b = socket.socketpair()
    sender, reader = Channel(Connection(os.dup(a.fileno()))), Channel(Connection(os.dup(b.fileno())))
    a.close(), b.close()
    big = np.arange(1 << 20, dtype=np.uint32)  # 4 MiB: more than the socket's buffers hold
    start = time.monotonic()
    sender.send((1, True, big), wait=False)
    sender.send((2, True, b"small"), wait=False)
    assert time.monotonic() - start < 1.0  # nothing waited for the reader
    waiting = threading.Thread(target=sender.send, args=((3, True, b"waits"),), daemon=True)
    waiting.start()
    got: dict[int, tuple] = {}

    def read() -> None:
        for _ in range(3):
            message = reader.recv()
            got[message[0]] = message

    reading = threading.Thread(target=read, daemon=True)
    reading.start()
    reading.join(10)
    waiting.join(10)
    assert not reading.is_alive() and not waiting.is_alive(), "a message never arrived"
    assert np.array_equal(got[1][2], big) and got[2] == (2, True, b"small") and got[3] == (3, True, b"waits")
    reader.close()
    sender.send((4, True, big), wait=False)  # dropped: nobody reads any more
    with pytest.raises(OSError):
        sender.send((5, True, b"x"))
    sender.close()


def test_a_workers_logits_wait_for_the_warm_up_off_the_reader_and_then_go_straight_to_the_batcher(models_dir, chelsea):
    """``logits`` from a worker that come while the device process warms up wait for it on a thread
    of their own (the Future is not done yet); once warm, they go into the batcher at once. Both
    give the logits of the op itself, and nothing stays counted in flight."""
    from PIL import Image

    from shim.config import Settings
    from shim.kernels.resample import pillow_preprocess
    from shim.service import build_service
    from shim.workers.device import DeviceEndpoint

    device = build_service(Settings(device="cpu", models_dir=models_dir))
    logits = DeviceEndpoint(device, workers=1).handlers()["logits"]
    assert isinstance(logits, Deferred)
    op = device.registry.lookup("classify")
    items = [pillow_preprocess(Image.fromarray(chelsea), op.config.preprocessing)]
    early = logits.fn(op.config.name, items)
    time.sleep(0.2)
    assert not early.done()  # waiting for the warm-up, and not on the caller's thread
    device.load()
    try:
        want = op.logits(items)
        np.testing.assert_allclose(early.result(30), want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(logits.fn(op.config.name, items).result(30), want, rtol=1e-5, atol=1e-5)
        with pytest.raises(LookupError, match="no classify op serves model 'nope'"):
            logits.fn("nope", items)
        assert device.metrics.inflight._value.get() == 0
    finally:
        device.registry.close()
    unbatched = build_service(Settings(device="cpu", models_dir=models_dir, batching=False))
    assert callable(DeviceEndpoint(unbatched, workers=1).handlers()["logits"])  # no batcher: a pool thread's


# --- a live shim with two workers --------------------------------------------------------------
TOKEN = "workers-test-token"


@pytest.fixture(scope="module")
def shim(models_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("workers")
    tokens = tmp / "tokens"
    tokens.write_text(f"alice: {hash_token(TOKEN)}\n")
    live = LiveShim(models_dir, tmp, "--workers", "2", "--tokens", str(tokens))
    try:
        live.wait_ready(90)
        yield live
    finally:
        live.stop()


def _client(url: str) -> accel.Client:
    return accel.Client(url, timeout=60, token=TOKEN)


def _workers(live: LiveShim) -> list[int]:
    """The pids of the shim's request workers (children running ``-m shim.workers``)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            continue
        if ppid == live.proc.pid and b"shim.workers" in cmd:
            out.append(int(pid))
    return sorted(out)


def test_workers_answer_as_a_single_process(shim, inproc_client, chelsea, coffee):
    cat, cup = encode(chelsea, "JPEG", quality=90), encode(coffee, "PNG")
    client = _client(shim.unix_url)
    assert len(_workers(shim)) == 2
    for image in (cat, cup):
        here, there = inproc_client.classify(image, top_k=5), client.classify(image, top_k=5)
        assert [p.label for p in there] == [p.label for p in here]
        np.testing.assert_allclose([p.score for p in there], [p.score for p in here], rtol=1e-5)
    assert client.classify(cat)[0].label in CAT_LABELS
    assert client.classify(cup)[0].label == "espresso"
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((70, 40), dtype=np.float32), rng.standard_normal((40, 30), dtype=np.float32)
    np.testing.assert_allclose(client.gemm(a, b), a @ b, rtol=1e-5, atol=1e-5)
    x = rng.standard_normal((3, 3, 224, 224), dtype=np.float32)  # the raw model, through its batcher
    out = client.infer("efficientnet-lite0", {"input": x})
    ref = inproc_client.infer("efficientnet-lite0", {"input": x})
    name = next(iter(ref))
    np.testing.assert_allclose(out[name], ref[name], rtol=1e-4, atol=1e-4)
    assert client.metadata("classify")["backend"] == "cpu"  # metadata: from the device process


def test_concurrent_raw_model_calls_through_the_workers_each_get_their_own_rows(shim, inproc_client):
    """12 callers at once, 1-4 rows each, into the raw model through the workers (each worker's
    batcher starts its batches over the link and answers them as the device replies): every caller
    gets the rows the single process gives its own input."""
    rng = np.random.default_rng(21)
    inputs = [rng.standard_normal((n, 3, 224, 224), dtype=np.float32) for n in (1, 3, 2, 1, 4, 1, 2, 1, 3, 1, 1, 2)]

    def call(x):
        return _client(shim.unix_url).infer("efficientnet-lite0", {"input": x})

    with ThreadPoolExecutor(len(inputs)) as pool:
        results = list(pool.map(call, inputs))
    for x, got in zip(inputs, results):
        want = inproc_client.infer("efficientnet-lite0", {"input": x})
        assert set(got) == set(want)
        for name, value in want.items():
            assert got[name].shape == value.shape
            np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-4)


def test_bad_input_is_a_clear_400_and_the_worker_goes_on(shim, chelsea):
    client = _client(shim.tcp_url)
    with pytest.raises(InvalidInput, match="not an image"):
        client.classify(b"not an image at all")
    with pytest.raises(InvalidInput, match="columns must equal"):
        client.gemm(np.ones((3, 4), np.float32), np.ones((5, 2), np.float32))
    assert client.classify(encode(chelsea, "JPEG"))[0].label in CAT_LABELS


def test_tokens_are_checked_by_workers_and_device(shim):
    anonymous = accel.Client(shim.unix_url, timeout=10, token="")
    with pytest.raises(Unauthorized):
        anonymous.gemm(np.ones((2, 2), np.float32), np.ones((2, 2), np.float32))  # a worker answers
    with pytest.raises(Unauthorized):
        anonymous.metadata("gemm")  # forwarded: the device process answers
    assert anonymous.live()


def test_metrics_and_statistics_count_what_workers_served(shim, chelsea):
    client = _client(shim.tcp_url)
    jpeg = encode(chelsea, "JPEG")

    def success_count() -> int:
        raw = client._call("GET", "/v2/models/classify/stats").body  # noqa: SLF001
        return int(json.loads(raw)["model_stats"][0]["inference_stats"]["success"]["count"])

    def settled() -> int:
        """The count once the reports still on their way from earlier tests are in (workers send
        them in bundles, one per 20 ms)."""
        last, deadline = success_count(), time.monotonic() + 5
        while time.monotonic() < deadline:
            time.sleep(0.1)
            now = success_count()
            if now == last:
                return now
            last = now
        return last

    start = settled()
    with ThreadPoolExecutor(8) as pool:
        labels = list(pool.map(lambda _: _client(shim.unix_url).classify(jpeg)[0].label, range(24)))
    assert set(labels) <= CAT_LABELS
    deadline = time.monotonic() + 5  # the workers' reports are one-way messages
    while success_count() < start + 24 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert success_count() == start + 24
    metrics = client._call("GET", "/metrics").body.decode()  # noqa: SLF001
    assert 'accelshim_requests_total{op="classify",status="200"}' in metrics
    assert 'accelshim_batch_size_count{op="classify"}' in metrics


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of Prometheus sample ``name`` with exactly ``labels`` in ``text`` (0 when absent)."""
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if key.split("{")[0] == name and "{" in key:
            pairs = dict(part.split("=", 1) for part in key[key.index("{") + 1:-1].split(","))
            if {k: v.strip('"') for k, v in pairs.items()} == labels:
                return float(value)
    return 0.0


def test_the_tenant_metrics_count_what_workers_served_and_refused(shim, chelsea):
    """Requests a worker answers itself (and refuses) count in the tenant metrics of the shim's
    /metrics, the device process's: the workers relay their guards' counts there."""
    client = _client(shim.tcp_url)
    jpeg = encode(chelsea, "JPEG")

    def scrape() -> str:
        return client._call("GET", "/metrics").body.decode()  # noqa: SLF001

    def settled() -> str:  # the relayed counts of earlier requests are in (one bundle per 20 ms)
        last, deadline = scrape(), time.monotonic() + 5
        while time.monotonic() < deadline:
            time.sleep(0.1)
            now = scrape()
            if _sample(now, "accelshim_tenant_requests_total", tenant="alice", status="200") == \
                    _sample(last, "accelshim_tenant_requests_total", tenant="alice", status="200"):
                return now
            last = now
        return last

    before = settled()
    with ThreadPoolExecutor(4) as pool:
        assert set(pool.map(lambda _: _client(shim.unix_url).classify(jpeg)[0].label, range(12))) <= CAT_LABELS
    for _ in range(3):
        assert client.metadata("gemm")["name"] == "gemm"  # forwarded: counted once, by the device process
    anonymous = accel.Client(shim.unix_url, timeout=10, token="")
    for _ in range(3):
        with pytest.raises(Unauthorized):
            anonymous.gemm(np.ones((2, 2), np.float32), np.ones((2, 2), np.float32))  # refused by a worker
    deadline = time.monotonic() + 5
    want = _sample(before, "accelshim_tenant_requests_total", tenant="alice", status="200") + 12 + 3
    while time.monotonic() < deadline:
        after = scrape()
        if _sample(after, "accelshim_tenant_requests_total", tenant="alice", status="200") >= want and \
                _sample(after, "accelshim_tenant_rejected_total", tenant="_unauthenticated", reason="unauthorized") \
                >= _sample(before, "accelshim_tenant_rejected_total", tenant="_unauthenticated",
                           reason="unauthorized") + 3:
            break
        time.sleep(0.05)
    assert _sample(after, "accelshim_tenant_requests_total", tenant="alice", status="200") == want
    assert (_sample(after, "accelshim_tenant_rejected_total", tenant="_unauthenticated", reason="unauthorized")
            == _sample(before, "accelshim_tenant_rejected_total", tenant="_unauthenticated", reason="unauthorized") + 3)
    grew = (_sample(after, "accelshim_tenant_request_bytes_total", tenant="alice")
            - _sample(before, "accelshim_tenant_request_bytes_total", tenant="alice"))
    assert 12 * len(jpeg) <= grew <= 12 * (len(jpeg) + 1024)  # the bodies of the 12, each counted once


def test_relayed_tenant_metrics_add_up_in_the_device_processs_own():
    """What a worker's guard and admission count (``RelayedTenantMetrics``) is added to the device
    process's tenant metrics as it arrives; the worker's gauges stay its own."""
    from prometheus_client import CollectorRegistry

    from shim.tenant_metrics import RelayedTenantMetrics, TenantMetrics, apply

    device_registry, worker_registry = CollectorRegistry(), CollectorRegistry()
    device = TenantMetrics(device_registry)
    events: list = []
    worker = RelayedTenantMetrics(TenantMetrics(worker_registry), events.append)
    device.requests.labels("bob", "200").inc()  # the device's own
    worker.requests.labels("bob", "200").inc()
    worker.requests.labels("bob", "429").inc()
    worker.request_bytes.labels("bob").inc(1234)
    worker.rejected.labels("bob", "queue_full").inc()
    worker.queue_wait.labels("bob").observe(0.25)
    worker.inflight.labels("bob").set(3)
    apply(device, events)
    apply(device, [("no_such_metric", ("bob",), 1.0)])  # a newer worker's: ignored
    apply(device, [("requests", ("bob",), 1.0), ("request_bytes", ("bob",), 1.0)])  # one label short: skipped
    get = device_registry.get_sample_value
    assert get("accelshim_tenant_requests_total", {"tenant": "bob", "status": "200"}) == 2
    assert get("accelshim_tenant_requests_total", {"tenant": "bob", "status": "429"}) == 1
    assert get("accelshim_tenant_request_bytes_total", {"tenant": "bob"}) == 1235  # the event after the bad one
    assert get("accelshim_tenant_rejected_total", {"tenant": "bob", "reason": "queue_full"}) == 1
    assert get("accelshim_tenant_queue_wait_seconds_count", {"tenant": "bob"}) == 1
    assert get("accelshim_tenant_queue_wait_seconds_sum", {"tenant": "bob"}) == 0.25
    assert get("accelshim_tenant_inflight_requests", {"tenant": "bob"}) is None  # not relayed
    assert worker_registry.get_sample_value("accelshim_tenant_inflight_requests", {"tenant": "bob"}) == 3


def test_shared_memory_and_kaas_buffers_live_in_the_device_process(shim):
    rng = np.random.default_rng(5)
    with _client(shim.unix_url) as one, accel.SharedMemory("wk-gemm", 1 << 20) as region:
        a = region.array((50, 40), np.float32)
        b = region.array((40, 20), np.float32)
        a[:], b[:] = rng.standard_normal(a.shape), rng.standard_normal(b.shape)
        for _ in range(4):  # each call may land on either worker: the region is known to all
            c = one.gemm(a, b, shm=region)
            np.testing.assert_allclose(c, a @ b, rtol=1e-5, atol=1e-5)
            assert region.offset_of(c) is not None
        one.unregister_shm()
        del a, b, c
    data = np.arange(10, dtype=np.float64)
    _client(shim.tcp_url).put_buffer("wk-buf", data)
    for _ in range(3):
        np.testing.assert_array_equal(_client(shim.unix_url).get_buffer("wk-buf", np.float64), data)


def test_large_bodies_cross_the_link_both_ways_whole(shim):
    """What a worker forwards (a KaaS buffer of 24 MiB up, then down; a gzip-compressed infer) reaches
    the device process's app and comes back byte for byte."""
    import gzip
    import json

    import requests

    data = np.random.default_rng(8).standard_normal(3 << 20)  # 24 MiB of float64
    _client(shim.unix_url).put_buffer("wk-big", data)
    for _ in range(2):
        np.testing.assert_array_equal(_client(shim.unix_url).get_buffer("wk-big", np.float64), data)
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [3], "data": [1.5, 2.5, -3]}]})
    answer = requests.post(f"{shim.tcp_url}/v2/models/noop/infer", data=gzip.compress(body.encode()), timeout=30,
                           headers={"Content-Encoding": "gzip", "Authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["outputs"][0]["data"] == [1.5, 2.5, -3]


def test_the_connection_board_sends_new_connections_to_the_least_loaded_worker(tmp_path):
    from shim.workers.balance import ConnectionBoard, WorkerGate

    board = ConnectionBoard(3)
    assert board.counts() == [None, None, None]  # no worker yet: none holds the fewest
    assert board.may_accept(0, 0) and board.may_accept(1, 0)
    assert board.may_accept(0, 1) is False  # slot 1 holds fewer
    assert board.may_accept(1, 1)  # ties accept together
    worker_view = ConnectionBoard(3, board.fd)  # what a worker maps from the inherited fd
    assert worker_view.counts() == [1, 1, None]
    assert worker_view.may_accept(2, 0) and board.may_accept(0, 1) is False
    board.gone(2)  # that worker exited: its slot no longer holds the others back
    assert board.may_accept(0, 1)
    (gauge,) = board.collect()
    assert {tuple(s.labels.values()): s.value for s in gauge.samples} == {("0",): 1, ("1",): 1}
    warm = [False]
    gate = WorkerGate(board, 2, lambda: warm[0])
    gate.note(0)
    assert board.counts()[2] is None and gate.may_accept(0) is False  # not warm: absent, takes nothing
    warm[0] = True
    gate.note(0)
    assert board.counts()[2] == 0 and gate.may_accept(0)


def test_new_connections_are_not_held_back_by_the_balancing(shim):
    """A worker that leaves a connection to a less loaded one never makes it wait long: with the
    connections unevenly held, fresh connections are still answered at once."""
    import socket

    held = _open_connections(shim, 5)
    waits = []
    try:
        for i in range(30):  # two of three stay open: the counts grow, one worker ahead at times
            started = time.perf_counter()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(shim.sock))
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: shim\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            waits.append(time.perf_counter() - started)
            if i % 3:
                held.append(sock)
            else:
                sock.close()
    finally:
        for sock in held:
            sock.close()
    assert sorted(waits)[len(waits) // 2] < 0.1, waits  # a deferral lasts 5 ms at most
    assert sorted(waits)[-2] < 1.0, waits  # a loaded machine may pause one or two longer


def _open_connections(shim, count: int) -> list:
    """``count`` connections that stay open, each served one request (so its worker counted it)."""
    import socket

    sockets = []
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(shim.sock))
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: shim\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        sockets.append(sock)
    return sockets


def _connections_per_worker(shim) -> list[float]:
    with _client(shim.tcp_url) as client:
        text = client._call("GET", "/metrics").body.decode()  # noqa: SLF001
    return [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("accelshim_worker_connections{")]


def test_a_restarted_worker_takes_new_connections_until_it_holds_as_many(shim):
    """Functions keep their connections; the worker that holds the fewest takes the next one. After
    a worker is killed, its replacement starts with none and takes the new connections until it
    has caught up with the other (left alone, the kernel would split them about evenly)."""
    held = _open_connections(shim, 12)
    try:
        before = _connections_per_worker(shim)
        # within 2, or 3 where a loaded machine kept the worker with fewer from accepting within its 5 ms
        assert len(before) == 2 and max(before) - min(before) <= 3, before
        victim = _workers(shim)[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (victim in _workers(shim) or len(_workers(shim)) < 2
                                               or not _client(shim.tcp_url).ready()):
            time.sleep(0.1)
        while time.monotonic() < deadline and len(_connections_per_worker(shim)) < 2:
            time.sleep(0.1)  # the replacement shows on the board once it is warm
        counts = _connections_per_worker(shim)
        assert len(counts) == 2 and max(counts) >= 5, counts  # the survivor keeps its share
        held += _open_connections(shim, int(max(counts) - min(counts)) + 4)
        after = _connections_per_worker(shim)
        assert max(after) - min(after) <= 3, (counts, after)  # left to the kernel: about the gap of before
    finally:
        for sock in held:
            sock.close()


def test_a_killed_worker_is_replaced_and_requests_go_on(shim, chelsea):
    jpeg = encode(chelsea, "JPEG")
    victim, survivor = _workers(shim)
    os.kill(victim, signal.SIGKILL)
    for _ in range(10):  # new connections reach the worker that is left
        assert _client(shim.unix_url).classify(jpeg)[0].label in CAT_LABELS
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (len(_workers(shim)) < 2 or not _client(shim.tcp_url).ready()):
        time.sleep(0.1)
    now = _workers(shim)
    assert len(now) == 2 and survivor in now and victim not in now
    assert _client(shim.tcp_url).classify(jpeg)[0].label in CAT_LABELS


def test_sigterm_stops_device_and_workers(models_dir, tmp_path, chelsea):
    live = LiveShim(models_dir, tmp_path, "--workers", "2")
    try:
        live.wait_ready(90)
        workers = _workers(live)
        assert len(workers) == 2
        client = accel.Client(live.unix_url, timeout=60)
        results: list[str] = []
        images = [encode(chelsea, "PNG")] * 16
        slow = threading.Thread(target=lambda: results.append(client.classify(images)[0][0].label))
        slow.start()
        time.sleep(0.2)  # in flight when the signal comes: it is finished, not dropped
        assert live.stop() == 0
        slow.join(30)
        assert results and results[0] in CAT_LABELS
        assert not live.sock.exists()
        for pid in workers:
            assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    finally:
        live.stop()


def test_workers_flag_is_checked():
    from shim.config import Settings

    with pytest.raises(ValueError, match="workers must be positive"):
        Settings(workers=0).validate()


@pytest.mark.gpu
def test_workers_in_front_of_the_gpu_match_the_cpu_twin(models_dir, tmp_path, inproc_client, chelsea, coffee):
    """On the GPU machine: two workers in front of a CUDA device process (GPU resize, ORT CUDA
    provider, cross-worker batches) answer as the CPU shim does, under concurrent callers."""
    pytest.importorskip("cupy")
    live = LiveShim(models_dir, tmp_path, "--workers", "2", "--device", "cuda")
    try:
        live.wait_ready(180)
        assert accel.Client(live.tcp_url).metadata("classify")["backend"] == "cuda"
        images = [encode(chelsea, "JPEG", quality=90), encode(coffee, "JPEG", quality=90)]
        want = [inproc_client.classify(image, top_k=3) for image in images]

        def check(i: int) -> None:
            got = accel.Client(live.unix_url, timeout=60).classify(images[i % 2], top_k=3)
            assert [p.label for p in got] == [p.label for p in want[i % 2]]
            np.testing.assert_allclose([p.score for p in got], [p.score for p in want[i % 2]], atol=1e-3)

        with ThreadPoolExecutor(32) as pool:
            list(pool.map(check, range(128)))
        rng = np.random.default_rng(7)
        a, b = rng.standard_normal((256, 128), dtype=np.float32), rng.standard_normal((128, 64), dtype=np.float32)
        got = accel.Client(live.unix_url).gemm(a, b)
        ref = a.astype(np.float64) @ b
        assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-5
    finally:
        assert live.stop() == 0


@contextmanager
def _front_with_device_logits(models_dir, tmp_path, logits, servers: list | None = None):
    """A request worker whose device process answers ``logits`` with ``logits(model, items, inner)``
    (a Future; ``inner`` is the real handler), the rest as it is; its link's server end goes into
    ``servers`` when given."""
    from shim.config import Settings
    from shim.service import build_service
    from shim.workers.device import DeviceEndpoint
    from shim.workers.front import WorkerConfig, build_front

    settings = Settings(device="cpu", models_dir=models_dir)
    device = build_service(settings)
    device.load()
    handlers = DeviceEndpoint(device, workers=1).handlers()
    inner = handlers["logits"]
    assert isinstance(inner, Deferred)
    handlers["logits"] = Deferred(lambda model, items: logits(model, items, inner.fn))
    key = os.urandom(16)
    server = LinkServer(str(tmp_path / "link.sock"), key, handlers, threads=8)
    if servers is not None:
        servers.append(server)
    front = build_front(WorkerConfig(settings, server.address, key, [],
                                     device.backend.name, device.backend.describe()))
    try:
        front.load()
        yield front
    finally:
        assert front.link is not None
        front.link.close()  # the worker hears that its device process is gone: a log line, nothing more here
        front.registry.close()
        server.close()
        device.registry.close()


def _classify_at_once(front, jpeg: bytes, n: int) -> list[str]:
    from .conftest import WSGITransport

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: accel.Client("http://worker", transport=WSGITransport(front.app),
                                                     retries=0).classify(jpeg)[0].label, range(n)))


def test_a_worker_sends_the_images_it_decodes_together_in_one_device_call(models_dir, tmp_path, chelsea):
    """Worker-side batching: requests that a worker serves at once reach the device process as one
    ``logits`` call (the device's batchers then mix the calls of all workers), each answered right."""
    calls: list[int] = []

    def logits(model: str, items: list, inner) -> Future:
        calls.append(len(items))
        time.sleep(0.3)  # the device's reader is busy: the calls that follow queue behind this one
        return inner(model, items)

    with _front_with_device_logits(models_dir, tmp_path, logits) as front:
        calls.clear()  # the worker's warm-up went through too
        labels = _classify_at_once(front, encode(chelsea, "JPEG"), 8)
    assert set(labels) <= CAT_LABELS
    assert sum(calls) == 8 and len(calls) < 8, calls


def test_a_worker_has_several_device_calls_on_their_way_at_once(models_dir, tmp_path, chelsea):
    """A worker's batch does not wait for the one before it to come back: while a call is out, the
    requests decoded meanwhile go in calls of their own, up to ``WORKER_CALLS_IN_FLIGHT`` at once.
    The device holds the first call until the others are answered (or 10 s pass: with one call in
    flight they would wait behind it)."""
    from shim.workers.front import WORKER_CALLS_IN_FLIGHT

    lock, state = threading.Lock(), {"armed": False, "calls": 0, "out": 0, "most": 0, "images": 0}
    release = threading.Event()

    def logits(model: str, items: list, inner) -> Future:
        with lock:
            state["calls"] += 1
            first = state["armed"] and state["calls"] == 1  # the worker's warm-up goes through unheld
            state["out"] += 1
            state["most"] = max(state["most"], state["out"])
            state["images"] += len(items)
        answered: Future = Future()

        def later() -> None:  # the device answers later (its reader goes on meanwhile)
            release.wait(10) if first else time.sleep(0.05)
            with lock:
                state["out"] -= 1
            inner(model, items).add_done_callback(lambda done: answered.set_result(done.result()))

        threading.Thread(target=later, daemon=True).start()
        return answered

    jpeg = encode(chelsea, "JPEG")
    with _front_with_device_logits(models_dir, tmp_path, logits) as front:
        state.update(armed=True, calls=0, most=0, images=0)  # not the warm-up's
        with ThreadPoolExecutor(1) as first_request:
            alone = first_request.submit(_classify_at_once, front, jpeg, 1)
            deadline = time.monotonic() + 10
            while state["out"] < 1:  # the first call is out, held
                assert time.monotonic() < deadline, "the first call never reached the device"
                time.sleep(0.005)
            started = time.monotonic()
            labels = _classify_at_once(front, jpeg, 6)
            waited = time.monotonic() - started
            release.set()
            labels += alone.result(30)
    assert set(labels) <= CAT_LABELS and state["images"] == 7
    assert 2 <= state["most"] <= WORKER_CALLS_IN_FLIGHT, state
    assert waited < 9, "the later requests waited for the first call"


def test_forwarded_requests_skip_the_workers_flask_app(models_dir, tmp_path, chelsea):
    """What a worker does not serve itself goes to the device process before the worker's Flask app
    sees it: no request context, routing or guard there (the device process's app runs those)."""
    from flask import request

    from .conftest import WSGITransport

    with _front_with_device_logits(models_dir, tmp_path, lambda model, items, inner: inner(model, items)) as front:
        seen: list[str] = []
        front.app.after_request(lambda response: seen.append(request.path) or response)
        client = accel.Client("http://worker", transport=WSGITransport(front.app), retries=0)
        assert client.metadata("gemm")["name"] == "gemm"  # forwarded: the device process answers
        assert client.classify(encode(chelsea, "JPEG"))[0].label in CAT_LABELS  # served here
        transport = WSGITransport(front.app)
        get = transport.request("GET", "http://worker/v2/models/gemm", None, {}, 10)
        head = transport.request("HEAD", "http://worker/v2/models/gemm", None, {}, 10)
        assert head.status == 200 and head.body == b"" and head.header("content-length") == str(len(get.body))
        odd = transport.request("POST", "http://worker/v2/models/noop/infer", b"{}",  # a Latin-1 superscript two
                                {"Inference-Header-Content-Length": "\xb2"}, 10)
        assert odd.status == 400 and "non-negative integer" in json.loads(odd.body)["error"]
    assert seen == ["/v2/models/classify/infer", "/v2/models/noop/infer"]


def test_a_forward_that_fails_counts_under_the_callers_tenant(models_dir, tmp_path):
    """The worker's guard runs before a failed forward is answered: its 503 counts under the
    caller's tenant, not as an unauthenticated request."""
    from shim.auth import DEFAULT_TENANT

    from .conftest import WSGITransport

    servers: list = []
    with _front_with_device_logits(models_dir, tmp_path, lambda model, items, inner: inner(model, items),
                                   servers) as front:
        relayed: list = []
        front.dispatcher.relay = relayed.append  # what the worker would relay to the device process
        servers[0].close()  # the device process goes
        response = WSGITransport(front.app).request("GET", "http://worker/v2/models/gemm", None, {}, 10)
    assert response.status == 503
    assert ("requests", (DEFAULT_TENANT, "503"), 1.0) in relayed, relayed


def test_a_forward_that_fails_is_answered_by_the_workers_app_as_any_error_is(models_dir, tmp_path):
    """When the device process cannot be reached, the worker's app answers the forward's failure as
    it answers every error: 503, a JSON body, Retry-After."""
    from shim.config import Settings
    from shim.metrics import Metrics
    from shim.registry import Registry
    from shim.server import create_app
    from shim.workers.front import LinkProxy, ReportingDispatcher, install_proxy

    from .conftest import WSGITransport

    server = LinkServer(str(tmp_path / "link.sock"), b"k", {}, threads=2)
    link = LinkClient(server.address, b"k")
    metrics = Metrics()
    app = create_app(Settings(device="cpu", models_dir=models_dir),
                     ReportingDispatcher(Registry([]), metrics, link), metrics)
    install_proxy(app, LinkProxy(link))
    server.close()  # the device process goes
    link.close()
    response = WSGITransport(app).request("GET", "http://worker/v2/models/gemm", None, {}, 10)
    assert response.status == 503
    assert "device process is gone" in json.loads(response.body)["error"]
    assert response.headers.get("retry-after") == "1"


def test_an_outbox_whose_writer_cannot_start_frees_its_lock_and_ends_the_link(monkeypatch):
    """When the rest of a posted message cannot be handed to a writer (no thread can start), the
    error is raised, the socket is shut down (the peer reads the link's end, not half a message)
    and the lock is free: nothing waits on it for ever."""
    import socket

    from shim.workers import outbox

    class NoThread(threading.Thread):
        def start(self) -> None:
            raise RuntimeError("can't start new thread")

    monkeypatch.setattr(outbox.threading, "Thread", NoThread)
    a, b = socket.socketpair()
    box = outbox.Outbox(a)
    with pytest.raises(RuntimeError, match="can't start"):
        box.post([bytes(8 << 20)])  # more than the socket takes at once
    assert not box._busy
    with pytest.raises(OSError):
        box.send([b"after"])  # shut down: no more messages on a link that broke mid-message
    b.settimeout(5)
    while b.recv(1 << 20):  # what went out, then the end of the link
        pass
    a.close(), b.close()


def test_a_workers_bundle_carries_each_counter_summed_and_every_observation():
    """Counter increments relayed between two bundles go as one event per counter (the device process
    adds them once), observations each."""
    from shim.metrics import Metrics
    from shim.registry import Registry
    from shim.workers.front import ReportingDispatcher

    class Link:  # the device process's end, as the dispatcher sees it
        def __init__(self) -> None:
            self.sent: list = []

        def notify(self, method: str, *args) -> None:
            self.sent.append((method, args))

    link = Link()
    dispatcher = ReportingDispatcher(Registry([]), Metrics(), link, interval=60)  # flushed by hand below
    for _ in range(5):
        dispatcher.relay(("requests", ("bob", "200"), 1.0))
        dispatcher.relay(("request_bytes", ("bob",), 100.0))
    dispatcher.relay(("requests", ("eve", "401"), 1.0))
    dispatcher.relay(("queue_wait", ("bob",), 0.5))
    dispatcher.relay(("queue_wait", ("bob",), 0.25))
    assert dispatcher.flush()
    (method, (records, events)), = link.sent
    assert method == "records" and records == []
    assert sorted(events) == sorted([("requests", ("bob", "200"), 5.0), ("request_bytes", ("bob",), 500.0),
                                     ("requests", ("eve", "401"), 1.0), ("queue_wait", ("bob",), 0.5),
                                     ("queue_wait", ("bob",), 0.25)])
    assert dispatcher.flush() and len(link.sent) == 1  # nothing new: nothing sent


def test_a_worker_that_drains_the_whole_time_still_sends_its_last_bundle(tmp_path, monkeypatch):
    """SIGTERM: a request worker drains for up to DRAIN_SECONDS, waits up to TASKS_SHUTDOWN_S for its
    request threads, then sends its last bundle of records and exits; the pool kills a worker only
    EXIT_GRACE_S after all that, so one that used the whole time is not killed in the middle of its
    last send. Stand-in workers (the drain made 1.5 s, the threads' wait 1.5 s, the grace 1 s) use
    both whole, take 0.2 s more to 'send', and note it: a pool that left any of the three out of its
    deadline would kill them first."""
    import subprocess
    import sys

    from shim.config import Settings
    from shim.workers import pool as pool_module
    from shim.workers.front import WorkerConfig

    monkeypatch.setattr(pool_module, "DRAIN_SECONDS", 1.5)
    monkeypatch.setattr(pool_module, "TASKS_SHUTDOWN_S", 1.5)
    monkeypatch.setattr(pool_module, "EXIT_GRACE_S", 1.0)
    script = ("import signal, sys, time\n"
              "signal.signal(signal.SIGTERM, lambda *_: (time.sleep(1.5), time.sleep(1.5), time.sleep(0.2),"
              " open(sys.argv[1], 'w').write('sent'), sys.exit(0)))\n"
              "print('up', flush=True)\n"
              "while True: time.sleep(1)\n")
    marks = [tmp_path / f"sent-{slot}" for slot in range(2)]

    def spawn(self, slot):
        proc = subprocess.Popen([sys.executable, "-c", script, str(marks[slot])], stdout=subprocess.PIPE)
        assert proc.stdout.readline() == b"up\n"  # its SIGTERM handler is in place
        return proc

    monkeypatch.setattr(pool_module.WorkerPool, "_spawn", spawn)
    pool = pool_module.WorkerPool(2, WorkerConfig(Settings(), "unused", b"k", [], "cpu", {}), on_exit=lambda pid: None)
    pool.start()
    procs = list(pool._procs)
    try:
        started = time.monotonic()
        pool.stop()
        assert time.monotonic() - started < 4.0  # they exited by themselves, before the grace ran out
        assert [p.returncode for p in procs] == [0, 0]  # not killed
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert all(mark.read_text() == "sent" for mark in marks)
