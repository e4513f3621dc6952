"""``--connection-threads`` (the default): each connection read and served on a thread of its own,
with waitress's parser, tasks and error pages: keep-alive, pipelining, chunked bodies, 100-continue,
bad requests, limits, the early 401, the drain on SIGTERM, and request workers; the protocol's edge
cases also with ``--no-connection-threads`` (waitress's event loop and task threads)."""
from __future__ import annotations

import json
import signal
import socket

import numpy as np
import pytest

import accel
from tests.conftest import LiveShim, encode
from tests.test_auth import ALICE, tokens_file
from tests.test_faults import http, in_threads, inflight, live, sleep_body, wait_for

LIMIT = 100_000
MODES = pytest.mark.parametrize("mode", ["--connection-threads", "--no-connection-threads"],
                                ids=["connection threads", "event loop"])


@pytest.fixture(scope="module", params=["--connection-threads", "--no-connection-threads"],
                ids=["connection threads", "event loop"])
def shim(tmp_path_factory, request):
    shim = live(tmp_path_factory.mktemp("threads"), request.param, "--max-body-bytes", str(LIMIT))
    yield shim
    shim.stop()


def _replies(sock: socket.socket, count: int) -> list[tuple[int, dict[str, str], bytes]]:
    """``count`` HTTP replies read off ``sock``: status, headers (lower-case names), body."""
    data, out = b"", []
    while len(out) < count:
        head, found, rest = data.partition(b"\r\n\r\n")
        if found:
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            length = int(headers.get("content-length", 0))
            if len(rest) >= length:
                out.append((int(lines[0].split()[1]), headers, rest[:length]))
                data = rest[length:]
                continue
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed after {len(out)} of {count} replies"
        data += chunk
    return out


def _noop(values: list[int]) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "datatype": "INT32", "shape": [len(values)], "data": values}]}).encode()


def _post(body: bytes, extra: str = "") -> bytes:
    return (f"POST /v2/models/noop/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


def test_requests_pipelined_on_one_kept_connection_are_answered_in_order(shim):
    with socket.create_connection(("127.0.0.1", shim.port), timeout=10) as sock:
        sock.sendall(_post(_noop([1])) + b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n" + _post(_noop([2, 3])))
        (s1, _, b1), (s2, _, _), (s3, _, b3) = _replies(sock, 3)
        assert (s1, s2, s3) == (200, 200, 200)
        assert json.loads(b1)["outputs"][0]["data"] == [1] and json.loads(b3)["outputs"][0]["data"] == [2, 3]
        sock.sendall(_post(_noop([4])))  # still open for the next
        assert json.loads(_replies(sock, 1)[0][2])["outputs"][0]["data"] == [4]
    client = accel.Client(shim.unix_url, timeout=10)
    assert [client.noop(x=np.arange(n))["x"].tolist() for n in (1, 3)] == [[0], [0, 1, 2]]


def test_a_chunked_body_after_100_continue(shim):
    body = _noop([5, 6, 7])
    with socket.create_connection(("127.0.0.1", shim.port), timeout=10) as sock:
        sock.sendall(b"POST /v2/models/noop/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 100 Continue")
        half = len(body) // 2
        for part in (body[:half], body[half:]):
            sock.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        sock.sendall(b"0\r\n\r\n")
        (status, _, reply), = _replies(sock, 1)
    assert status == 200 and json.loads(reply)["outputs"][0]["data"] == [5, 6, 7]


def test_a_malformed_request_is_a_json_400_and_the_connection_closes(shim):
    with socket.create_connection(("127.0.0.1", shim.port), timeout=10) as sock:
        sock.sendall(b"POST /v2/models/noop/infer HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n")
        (status, headers, reply), = _replies(sock, 1)
        assert status == 400 and headers["content-type"] == "application/json" and "error" in json.loads(reply)
        assert sock.recv(4096) == b""  # closed by the shim
    assert http(shim.tcp_url, "noop", json.loads(_noop([8])))[0] == 200  # and the shim goes on


def test_a_malformed_header_line_is_not_repeated_in_the_400(shim):
    """waitress quotes the whole line in its error; an Authorization line would give its token away."""
    with socket.create_connection(("127.0.0.1", shim.port), timeout=10) as sock:
        sock.sendall(b"POST /v2/models/noop/infer HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer s3cret\nline-two\r\nContent-Length: 2\r\n\r\n{}")
        (status, _, reply), = _replies(sock, 1)
    error = json.loads(reply)["error"]
    assert status == 400 and "header line" in error and "s3cret" not in error, error


def test_a_body_over_the_limit_is_413_unread(shim):
    with socket.create_connection(("127.0.0.1", shim.port), timeout=10) as sock:
        sock.sendall(b"POST /v2/models/noop/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {LIMIT + 1}\r\n\r\n".encode())  # the body never comes
        (status, _, reply), = _replies(sock, 1)
    assert status == 413 and str(LIMIT) in json.loads(reply)["error"]


@MODES
def test_sigterm_finishes_the_requests_in_flight_then_exits_0(tmp_path, mode):
    shim = live(tmp_path, mode)
    try:
        threads, out = in_threads(3, lambda: http(shim.tcp_url, "sleep", sleep_body(1.0)))
        wait_for(lambda: inflight(shim.tcp_url) == 3)
        idle = socket.create_connection(("127.0.0.1", shim.port), timeout=10)  # kept open, idle: closed at the end
        idle.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _replies(idle, 1)[0][0] == 200  # accepted and served (one left in the backlog would be reset)
        shim.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        assert [s for s, _ in out] == [200, 200, 200], out
        assert shim.proc.wait(30) == 0
        assert idle.recv(4096) == b""
        idle.close()
    finally:
        shim.stop()


@MODES
def test_a_big_body_without_a_valid_token_is_refused_once_its_headers_are_in(tmp_path, mode):
    (tmp_path / "models").mkdir()
    live_shim = LiveShim(tmp_path / "models", tmp_path, "--classify-model", "", mode,
                         "--tokens", str(tokens_file(tmp_path)))
    try:
        live_shim.wait_ready()
        with socket.create_connection(("127.0.0.1", live_shim.port), timeout=10) as sock:
            sock.sendall(b"POST /v2/models/noop/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 209715200\r\n"
                         b"Authorization: Bearer not-a-token-of-anyone\r\n\r\n" + b"\0" * 65536)
            (status, headers, reply), = _replies(sock, 1)
        assert status == 401 and "token" in json.loads(reply)["error"] and "www-authenticate" in headers
        assert accel.Client(live_shim.tcp_url, token=ALICE, timeout=10).noop(x=np.arange(2))["x"].tolist() == [0, 1]
    finally:
        live_shim.stop()


@pytest.mark.parametrize("mode", [None, "--no-connection-threads"], ids=["by default", "event loop"])
def test_request_workers_serve_on_connection_threads_unless_told_not_to(models_dir, tmp_path, chelsea, mode):
    live_shim = LiveShim(models_dir, tmp_path, "--workers", "2", *([mode] if mode else []))
    try:
        live_shim.wait_ready(90)
        clients = [accel.Client(live_shim.unix_url, timeout=60) for _ in range(4)]
        jpeg = encode(chelsea, "JPEG")
        for client in clients * 2:
            assert client.classify(jpeg)[0].label in ("tiger cat", "tabby, tabby cat", "Egyptian cat")
        with accel.Client(live_shim.tcp_url, timeout=10) as client:
            metrics = client._call("GET", "/metrics").body.decode()  # noqa: SLF001
        counts = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith("accelshim_worker_connections{")]
        assert len(counts) == 2 and sum(counts) >= 4  # the threaded connections count for the balance
    finally:
        assert live_shim.stop() == 0
    threaded_workers = [line for line in live_shim.log.read_text().splitlines()
                        if " worker-" in line and "each connection on a thread of its own" in line]
    assert len(threaded_workers) == (0 if mode else 2), threaded_workers  # both took it


def _in_process(tmp_path, on: bool, wrap=None):
    """An in-process shim (noop alone) served by ``Server`` on a unix socket, on a thread; its app's
    WSGI callable wrapped by ``wrap``; returns the server, its thread and the socket's URL."""
    import threading

    from shim.config import Settings
    from shim.server.binding import bind_sockets
    from shim.server.serving import Server
    from shim.service import build_service

    (tmp_path / "models").mkdir(exist_ok=True)
    service = build_service(Settings(device="cpu", models_dir=tmp_path / "models", classify_model="",
                                     connection_threads=on))
    if wrap is not None:
        service.app.wsgi_app = wrap(service.app.wsgi_app)
    server = Server(service, bind_sockets(None, 0, str(tmp_path / "s.sock")))
    runner = threading.Thread(target=server.run, daemon=True)
    runner.start()
    return server, runner, f"unix://{tmp_path / 's.sock'}"


def _connection_threads() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name.startswith("connection-")]


@pytest.mark.parametrize("on", [True, False], ids=["connection threads", "waitress's task threads"])
def test_each_connection_is_served_on_a_thread_of_its_own_unless_told_not_to(tmp_path, on):
    import threading
    import time

    from shim.config import Settings

    served_on: list[str] = []

    def wrap(inner):
        def noting(environ, start_response):
            served_on.append(threading.current_thread().name)
            return inner(environ, start_response)
        return noting

    server, runner, url = _in_process(tmp_path, on, wrap)
    try:
        clients = [accel.Client(url, timeout=10) for _ in range(2)]
        for client in clients * 2:
            assert client.noop(x=np.arange(2))["x"].tolist() == [0, 1]
        pool = len(server._tasks.threads)  # noqa: SLF001 - this server's task threads
        if on:  # a channel its own thread closed (its client left) is stopped without harm, as a drain may
            channels = list(server._servers[0].active_channels.values())  # noqa: SLF001
            for client in clients:
                client.close()
            deadline = time.monotonic() + 10
            while any(ch.socket is not None for ch in channels) and time.monotonic() < deadline:
                time.sleep(0.01)
            for channel in channels:
                channel.stop()
    finally:
        server.stop()
        runner.join(15)
    calls = [name for name in served_on if name != "warmup"]
    settings = Settings()
    assert pool == (1 if on else settings.threads + settings.max_queue + 2)  # the task pool: unused with threads
    if on:
        assert all(name.startswith("connection-") for name in calls) and len(set(calls)) == 2, served_on
    else:
        assert not any(name.startswith("connection-") for name in calls), served_on
    assert not runner.is_alive() and server.exit_code == 0
    assert not _connection_threads()  # each ended with the drain


def test_the_connection_limit_counts_the_threaded_connections(tmp_path, monkeypatch, caplog):
    """Connections over the limit wait in the listen backlog (no thread each) until one closes; both
    turns are logged, as waitress logs them."""
    from shim.server import serving

    caplog.set_level("WARNING", logger="shim.server.threaded")
    monkeypatch.setattr(serving, "CONNECTION_LIMIT", 3)
    server, runner, url = _in_process(tmp_path, True)
    path = url.removeprefix("unix://")
    try:
        accel.Client(url, timeout=10).wait_ready()  # ready() only probes: False while warming up
        held = []
        for _ in range(3):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(path)
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _replies(sock, 1)[0][0] == 200
            held.append(sock)
        extra = socket.socket(socket.AF_UNIX)
        extra.settimeout(10)
        extra.connect(path)  # into the backlog
        extra.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        extra.settimeout(0.5)
        with pytest.raises(TimeoutError):
            extra.recv(4096)
        assert len(_connection_threads()) == 3
        assert "reached the connection limit" in caplog.text and "dropped below" not in caplog.text
        held.pop().close()
        extra.settimeout(10)
        assert _replies(extra, 1)[0][0] == 200  # taken once one of the three closed
        assert "dropped below the connection limit" in caplog.text
        for sock in held + [extra]:
            sock.close()
    finally:
        server.stop()
        runner.join(15)


def test_a_connection_without_a_thread_gets_a_503_and_the_listener_waits_for_one_to_end(tmp_path, monkeypatch):
    """No thread for a new connection (a pids limit): it gets a JSON 503 to retry, not a reset, and
    the listener takes no more connections than are open until one of them ends."""
    import threading

    from shim.server import threaded

    server, runner, url = _in_process(tmp_path, True)
    path = url.removeprefix("unix://")
    real_start = threading.Thread.start
    refused = []

    class Thread(threading.Thread):
        def start(self) -> None:
            if self.name.startswith("connection-") and not refused:
                refused.append(self.name)
                raise RuntimeError("can't start new thread")
            real_start(self)

    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(10)
        sock.connect(path)
        return sock

    live = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    try:
        accel.Client(url, timeout=10).wait_ready()  # ready() only probes: False while warming up
        held = [connect() for _ in range(2)]
        for sock in held:
            sock.sendall(live)
            assert _replies(sock, 1)[0][0] == 200  # both accepted, each on its thread
        monkeypatch.setattr(threaded.threading, "Thread", Thread)
        with connect() as refused_sock:
            (status, headers, body), = _replies(refused_sock, 1)
            assert status == 503 and headers["retry-after"] == "1" and "retry" in json.loads(body)["error"]
            assert refused_sock.recv(4096) == b""  # then closed
        assert refused
        waiting = connect()  # in the backlog: two are open, and two is all there is room for now
        waiting.sendall(live)
        waiting.settimeout(1.0)
        with pytest.raises(TimeoutError):
            waiting.recv(4096)
        held.pop().close()  # one ends: the waiting one is taken and served
        waiting.settimeout(10)
        assert _replies(waiting, 1)[0][0] == 200
        waiting.close()
        assert accel.Client(url, timeout=10).noop(x=np.arange(1))["x"].tolist() == [0]
        held.pop().close()
    finally:
        server.stop()
        runner.join(15)


def test_the_idle_sweep_leaves_threaded_connections_to_their_timeout(tmp_path):
    """waitress's sweep would mark an idle channel to close (its thread may be reading a request
    then) while walking ``active_channels``, which connection threads change."""
    import time

    server, runner, url = _in_process(tmp_path, True)
    try:
        client = accel.Client(url, timeout=10)
        assert client.noop(x=np.arange(1))["x"].tolist() == [0]
        listener = server._servers[0]  # noqa: SLF001
        assert listener.active_channels  # the client's connection, kept
        listener.maintenance(time.time() + 10_000)  # everything idle far past the timeout
        assert not any(ch.will_close for ch in listener.active_channels.values())
        assert client.noop(x=np.arange(2))["x"].tolist() == [0, 1]  # the same connection, still served
    finally:
        server.stop()
        runner.join(15)


def test_a_response_goes_out_once_its_task_is_done_a_small_one_in_one_send(tmp_path, monkeypatch):
    """Head and body in one send (the client reads it whole at once); a large one in as many as the
    socket takes, all after the task (``test_a_client_that_does_not_read...``)."""
    import time

    from waitress import wasyncore

    sends: list[int] = []
    real_send = wasyncore.dispatcher.send

    def counting(self, data, do_close=True):
        sends.append(len(data))  # before it goes: the client may have it all before this thread runs on
        return real_send(self, data, do_close)

    monkeypatch.setattr(wasyncore.dispatcher, "send", counting)
    server, runner, url = _in_process(tmp_path, True)
    try:
        client = accel.Client(url, timeout=10)
        deadline = time.monotonic() + 30
        while not client.ready() and time.monotonic() < deadline:  # warmed up: no 503 and retry below
            time.sleep(0.05)
        sends.clear()
        assert client.noop(x=np.arange(3))["x"].tolist() == [0, 1, 2]
        assert len(sends) == 1, sends
        sends.clear()
        big = np.arange(200_000, dtype=np.float32)  # 800 kB out
        np.testing.assert_array_equal(client.noop(x=big)["x"], big)
        assert sends and sum(sends) > big.nbytes, sends[:8]
    finally:
        server.stop()
        runner.join(15)


@pytest.mark.parametrize("on", [True, False], ids=["connection threads", "waitress's task threads"])
def test_a_client_that_does_not_read_holds_its_response_not_its_request(tmp_path, on):
    """A large response to a client that stops reading waits in the out-buffers; the request's task
    ends and its body is freed meanwhile (no task blocked in a send, holding the body, the payload
    and the buffered copy at once until the client reads or times out)."""
    import time

    bodies: list = []

    def wrap(inner):
        def noting(environ, start_response):
            bodies.append(environ["wsgi.input"])
            return inner(environ, start_response)
        return noting

    server, runner, url = _in_process(tmp_path, on, wrap)
    path = url.removeprefix("unix://")
    values = list(range(700_000))  # about 5 MB of JSON each way: far more than the socket buffers hold
    body = _noop(values)
    try:
        accel.Client(url, timeout=10).wait_ready()  # ready() only probes: False while warming up
        bodies.clear()
        with socket.socket(socket.AF_UNIX) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(10)
            sock.connect(path)
            sock.sendall(_post(body))  # and never reads the answer
            deadline = time.monotonic() + 10
            while not (bodies and bodies[0].closed) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert bodies and bodies[0].closed, "the request's task is still running: blocked in a send"
            (status, _, reply), = _replies(sock, 1)  # the client reads at last: the whole answer
        assert status == 200 and json.loads(reply)["outputs"][0]["data"][-3:] == values[-3:]
    finally:
        server.stop()
        runner.join(15)


@MODES
def test_once_stopping_a_busy_kept_connection_is_told_to_close_and_the_drain_ends_with_it(tmp_path, mode):
    """A client keeping its connection busy during SIGTERM: the response after it says
    ``Connection: close``, the connection closes, no request is cut, and the shim exits long before
    the drain's deadline."""
    import threading
    import time

    shim = live(tmp_path, mode)
    replies: list = []
    body = json.dumps(sleep_body(0.05)).encode()
    request = (f"POST /v2/models/sleep/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    def busy() -> None:
        with socket.create_connection(("127.0.0.1", shim.port), timeout=10) as sock:
            for _ in range(400):  # back to back, 20 s at most
                sock.sendall(request)
                status, headers, _ = _replies(sock, 1)[0]
                replies.append((status, headers.get("connection")))
                if headers.get("connection") == "close":
                    replies.append(("then", sock.recv(4096)))
                    return

    try:
        client = threading.Thread(target=busy)
        client.start()
        wait_for(lambda: len(replies) >= 3)
        stopped = time.monotonic()
        shim.proc.send_signal(signal.SIGTERM)
        client.join(30)
        assert shim.proc.wait(30) == 0
        took = time.monotonic() - stopped
    finally:
        shim.stop()
    assert replies[-2] == (200, "close") and replies[-1] == ("then", b"")  # told, then closed
    assert all(status == 200 for status, _ in replies[:-1])
    assert took < 10, f"the drain took {took:.1f} s: the busy connection was served to its deadline"


@pytest.mark.parametrize("part", ["head", "body"])
def test_a_request_trickling_in_gets_a_408_at_its_deadline(tmp_path, monkeypatch, part):
    """A client sending a byte now and then keeps every read short of the idle timeout, but its
    request must be in within its deadline (head, or head and body), or it gets a JSON 408 and the
    connection closes; the shim goes on."""
    import threading
    import time

    from shim.server import threaded

    monkeypatch.setattr(threaded, "HEADERS_S", 1.0)
    monkeypatch.setattr(threaded, "BODY_S", 1.5)
    server, runner, url = _in_process(tmp_path, True)
    head = b"POST /v2/models/noop/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n"
    trickle = b"{" * 100 if part == "body" else b"X-Slow: " + b"a" * 100  # a byte every 0.1 s: 10 s, were it let to

    def trickling(sock: socket.socket) -> None:
        for byte in trickle:
            try:
                sock.sendall(bytes([byte]))
            except OSError:  # closed on it after the 408
                return
            time.sleep(0.1)

    try:
        accel.Client(url, timeout=10).wait_ready()  # ready() only probes: False while warming up
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(url.removeprefix("unix://"))
            started = time.monotonic()
            if part == "body":
                sock.sendall(head + b"\r\n")
            sender = threading.Thread(target=trickling, args=(sock,), daemon=True)
            sender.start()
            (status, _, body), = _replies(sock, 1)
            took = time.monotonic() - started
            assert sock.recv(4096) == b""  # then closed
        assert status == 408 and ("its head" if part == "head" else "all of it") in json.loads(body)["error"], body
        assert took < 4, f"answered after {took:.1f} s"
        assert accel.Client(url, timeout=10).noop(x=np.arange(2))["x"].tolist() == [0, 1]  # the shim goes on
    finally:
        server.stop()
        runner.join(15)


def _timeouts(monkeypatch, channel: float = 120, head: float = 30, body: float = 60) -> None:
    from shim.server import serving, threaded

    monkeypatch.setattr(serving, "CHANNEL_TIMEOUT_S", channel)
    monkeypatch.setattr(threaded, "HEADERS_S", head)
    monkeypatch.setattr(threaded, "BODY_S", body)


def _unix(url: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(10)
    sock.connect(url.removeprefix("unix://"))
    return sock


def test_a_request_gone_silent_is_closed_at_the_idle_timeout_not_its_deadline(tmp_path, monkeypatch):
    import time

    _timeouts(monkeypatch, channel=1.0, body=20)
    server, runner, url = _in_process(tmp_path, True)
    try:
        accel.Client(url, timeout=10).wait_ready()  # ready() only probes: False while warming up
        with _unix(url) as sock:
            sock.sendall(_post(_noop([1]))[:-5])  # all but the body's last bytes, then silence
            started = time.monotonic()
            try:
                assert sock.recv(4096) == b""
            except ConnectionResetError:
                pass
            took = time.monotonic() - started
        assert 0.5 < took < 5, f"closed after {took:.1f} s"
    finally:
        server.stop()
        runner.join(15)


def test_an_answer_after_a_slow_request_gets_the_whole_send_timeout(tmp_path, monkeypatch):
    """The request came in pieces close to its deadline; its large answer still has the idle timeout
    for each send, not what the deadline had left."""
    import time

    from shim.server import threaded

    _timeouts(monkeypatch, body=1.0)
    monkeypatch.setattr(threaded, "BODY_MIN_BYTES_PER_S", 1 << 40)  # 1 s for the whole request
    server, runner, url = _in_process(tmp_path, True)
    values = list(range(700_000))  # about 5 MB each way
    request = _post(_noop(values))
    try:
        accel.Client(url, timeout=10).wait_ready()  # ready() only probes: False while warming up
        with _unix(url) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            third = len(request) // 3
            for piece in (request[:third], request[third:2 * third], request[2 * third:]):
                sock.sendall(piece)
                time.sleep(0.25)
            time.sleep(1.5)  # reads nothing for longer than the request's deadline had left
            (status, _, reply), = _replies(sock, 1)
        assert status == 200 and json.loads(reply)["outputs"][0]["data"][-2:] == values[-2:]
    finally:
        server.stop()
        runner.join(15)


def test_a_blank_line_after_a_request_is_not_a_late_request(tmp_path, monkeypatch):
    import time

    _timeouts(monkeypatch, head=0.5)
    server, runner, url = _in_process(tmp_path, True)
    try:
        accel.Client(url, timeout=10).wait_ready()  # ready() only probes: False while warming up
        with _unix(url) as sock:
            sock.sendall(_post(_noop([1])) + b"\r\n")  # RFC 9112 2.2: a stray CRLF between requests
            assert _replies(sock, 1)[0][0] == 200
            time.sleep(1.0)
            sock.sendall(_post(_noop([2])))
            (status, _, reply), = _replies(sock, 1)
        assert status == 200 and json.loads(reply)["outputs"][0]["data"] == [2]
    finally:
        server.stop()
        runner.join(15)


def test_a_pipelined_request_counts_from_the_answer_before_it(tmp_path, monkeypatch):
    """The next request's first bytes came with the last one, which took longer to answer than a
    head may take: the next one's clock starts when that answer is out."""
    import time

    def slow(inner):
        def sleeping(environ, start_response):
            if environ.get("HTTP_X_SLOW"):
                time.sleep(1.0)
            return inner(environ, start_response)
        return sleeping

    _timeouts(monkeypatch, head=0.6)
    server, runner, url = _in_process(tmp_path, True, slow)
    try:
        accel.Client(url, timeout=10).wait_ready()  # ready() only probes: False while warming up
        with _unix(url) as sock:
            second = _post(_noop([2]))
            sock.sendall(_post(_noop([1]), "X-Slow: 1\r\n") + second[:10])
            assert _replies(sock, 1)[0][0] == 200
            time.sleep(0.2)
            sock.sendall(second[10:])
            (status, _, reply), = _replies(sock, 1)
        assert status == 200 and json.loads(reply)["outputs"][0]["data"] == [2]
    finally:
        server.stop()
        runner.join(15)


@pytest.mark.parametrize("on", [True, False], ids=["connection threads", "waitress's task threads"])
def test_a_refused_request_expecting_100_continue_gets_no_continue(tmp_path, on):
    """A body over the limit announced with ``Expect: 100-continue`` is refused at once, without the
    100 that would have the client send it (curl sends large bodies so)."""
    server, runner, url = _in_process(tmp_path, on)
    limit = server.service.settings.max_body_bytes
    try:
        accel.Client(url, timeout=10).wait_ready()  # ready() only probes: False while warming up
        with _unix(url) as sock:
            sock.sendall(b"POST /v2/models/noop/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {limit + 1}\r\nExpect: 100-continue\r\n\r\n".encode())
            first = sock.recv(4096)
        assert first.startswith(b"HTTP/1.1 413"), first[:40]
    finally:
        server.stop()
        runner.join(15)
