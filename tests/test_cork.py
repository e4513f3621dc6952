"""Writes held back while a thread answers a batch (``shim.cork``): the device's replies to one request
worker go out in one write, whole and in order, on both paths that answer a batch."""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from concurrent.futures import Future

import pytest

from shim import cork
from shim.batch_answers import Answers
from shim.batch_queue import Job
from shim.workers.link import Deferred, LinkClient, LinkServer
from shim.workers.outbox import Outbox


class CountingSocket:
    """A socket whose ``sendmsg`` calls are counted (the outbox's writes)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.writes = sock, 0

    def sendmsg(self, *args):
        self.writes += 1
        return self.sock.sendmsg(*args)

    def __getattr__(self, name):
        return getattr(self.sock, name)


def test_held_parts_go_at_the_blocks_end_writer_by_writer_in_order_however_it_ends(caplog) -> None:
    flushed: list[tuple[str, list[str]]] = []

    def flush_to(name: str):
        return lambda parts: flushed.append((name, parts))

    assert not cork.hold("a", ["x"], flush_to("a"))  # outside a block: nothing held
    with pytest.raises(RuntimeError, match="midway"):
        with cork.corked():
            assert cork.hold("a", ["1", "2"], flush_to("a"))
            with cork.corked():  # nested: one block
                assert cork.hold("b", ["3"], flush_to("b"))
                assert cork.hold("a", ["4"], flush_to("a"))
            assert flushed == []
            raise RuntimeError("midway")
    assert flushed == [("a", ["1", "2", "4"]), ("b", ["3"])]

    def broken(parts):
        raise OSError("no")

    flushed.clear()
    with caplog.at_level(logging.ERROR, logger="shim.cork"):
        with cork.corked():
            cork.hold("a", ["1"], broken)
            cork.hold("b", ["2"], flush_to("b"))
    assert flushed == [("b", ["2"])] and "could not go out" in caplog.text
    assert not cork.hold("a", ["y"], flush_to("a"))  # the block is over


def test_messages_posted_in_a_block_reach_the_peer_at_its_end_in_one_write() -> None:
    a, b = socket.socketpair()
    counting = CountingSocket(a)
    box = Outbox(counting)  # type: ignore[arg-type]
    try:
        with cork.corked():
            for i in range(5):
                box.post([b"head%d:" % i, b"body" * (i + 1)])
            b.setblocking(False)
            with pytest.raises(BlockingIOError):
                b.recv(1)  # nothing yet
            assert counting.writes == 0
        b.setblocking(True)
        want = b"".join(b"head%d:" % i + b"body" * (i + 1) for i in range(5))
        got = b""
        while len(got) < len(want):
            got += b.recv(65536)
        assert got == want and counting.writes == 1
        box.post([b"alone"])  # outside a block: at once
        assert b.recv(100) == b"alone" and counting.writes == 2
    finally:
        box.close()
        a.close()
        b.close()


@pytest.mark.parametrize("here", [True, False])
def test_a_batchs_answers_to_one_worker_go_in_one_write_each_caller_its_own(tmp_path, here) -> None:
    """Calls of two request workers (links), answered as one batch (``Answers.answer``, on the thread
    at hand or the reply thread): each worker's replies in one write, each caller its own result."""
    key = os.urandom(16)
    jobs: list[Job] = []
    arrived = threading.Semaphore(0)

    def later(x: int) -> Future:
        job = Job(x, 1, later=True)
        jobs.append(job)
        arrived.release()
        return job.future

    server = LinkServer(str(tmp_path / "link.sock"), key, {"later": Deferred(later)}, threads=4)
    answers = Answers("m")
    clients: list[LinkClient] = []
    try:
        clients = [LinkClient(server.address, key) for _ in range(2)]
        for _ in range(100):  # until the device has both links
            if len(server._conns) == 2:  # noqa: SLF001
                break
            time.sleep(0.02)
        device_ends = [CountingSocket(chan.sock) for chan in server._conns]  # noqa: SLF001
        for chan, counting in zip(server._conns, device_ends):  # noqa: SLF001
            chan._out._sock = counting  # noqa: SLF001 - each reply's writes counted
        calls = [(clients[i % 2], i) for i in range(7)]
        futures = [client.call_later("later", i) for client, i in calls]
        for _ in calls:
            assert arrived.acquire(timeout=10)
        answers.answer(jobs, [job.item * 10 for job in jobs], here=here)
        assert [f.result(10) for f in futures] == [i * 10 for i in range(7)]
        assert [w.writes for w in device_ends] == [1, 1]  # one per worker
    finally:
        answers.close()
        for client in clients:
            client.close()
        server.close()
