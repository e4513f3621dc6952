"""The device side's one thread that reads every link (``LinkReader`` inside ``LinkServer``): many
links at once, each in its order, and whatever goes wrong with one link drops that link alone."""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Client

import numpy as np
import pytest

from accel.errors import NotReady
from shim.workers.arena import Arena
from shim.workers.channel import READ_AHEAD
from shim.workers.link import Deferred, LinkClient, LinkServer


def _threads(name: str) -> int:
    return sum(thread.name == name for thread in threading.enumerate())


def _until(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return bool(condition())


@pytest.fixture()
def served(tmp_path):
    """A server whose ``order`` handler (a Deferred: run on the reading thread) records each link's
    calls in the order it starts them; and a key to connect with."""
    started: dict[int, list[int]] = {}

    def order(link: int, index: int) -> Future:
        started.setdefault(link, []).append(index)
        done: Future = Future()
        done.set_result(index)
        return done

    key = os.urandom(16)
    handlers = {"order": Deferred(order), "echo": lambda *a: a, "seen": lambda link: list(started.get(link, []))}
    server = LinkServer(str(tmp_path / "link.sock"), key, handlers, threads=8)
    yield server, key
    server.close()


def test_one_thread_reads_many_links_each_in_its_order(served) -> None:
    """Eight workers' links, each sending from four threads at once and a run of notifications: one
    reading thread for them all (no thread per link once connected), every call answered with its
    own result, and each link's notifications started in the order they were sent."""
    server, key = served
    before = threading.active_count()
    arenas = [Arena(1 << 20) for _ in range(8)]
    clients = [LinkClient(server.address, key, arena=arena) for arena in arenas]
    try:
        assert _until(lambda: _threads("link-handshake") == 0)
        assert threading.active_count() - before == len(clients)  # the clients' readers: none on the device side
        for link, client in enumerate(clients):
            for index in range(200):
                client.notify("order", link, index)
        rng = np.random.default_rng(0)
        arrays = [rng.standard_normal(int(rng.integers(1, 5000))).astype(np.float32) for _ in range(64)]
        with ThreadPoolExecutor(32) as pool:
            replies = list(pool.map(lambda i: clients[i % 8].call("echo", i, arrays[i]), range(64)))
        for i, (index, array) in enumerate(replies):
            assert index == i
            np.testing.assert_array_equal(array, arrays[i])
        for link, client in enumerate(clients):
            assert client.call("seen", link) == list(range(200))  # a link's calls start in its order
    finally:
        for client in clients:
            client.close()
        for arena in arenas:
            arena.close()


def test_messages_larger_than_the_read_ahead_come_whole_on_every_link(served) -> None:
    """Arrays that do not go through an arena travel on the socket, several times the read-ahead:
    from many links at once each comes back whole and its own."""
    server, key = served
    clients = [LinkClient(server.address, key) for _ in range(4)]
    try:
        rng = np.random.default_rng(1)
        arrays = [rng.integers(0, 1 << 30, size=(3 * READ_AHEAD) // 4 + 977 * i, dtype=np.int64) for i in range(12)]
        with ThreadPoolExecutor(12) as pool:
            replies = list(pool.map(lambda i: clients[i % 4].call("echo", arrays[i])[0], range(12)))
        for reply, array in zip(replies, arrays):
            np.testing.assert_array_equal(reply, array)
    finally:
        for client in clients:
            client.close()


def test_a_link_that_sends_what_cannot_be_a_call_is_dropped_alone(served, caplog) -> None:
    """A message that is not a call (it cannot be started) closes that worker's link, its callers
    told the device process is gone; the other links go on being read."""
    server, key = served
    bad, good = LinkClient(server.address, key), LinkClient(server.address, key)
    try:
        assert bad.call("echo", 1) == (1,)
        bad._chan.send("not a call")  # noqa: SLF001 - what a broken worker could send
        with pytest.raises(NotReady, match="device process is gone"):
            for _ in range(100):  # until the device's reader has dropped it
                bad.call("echo", 2)
                time.sleep(0.02)
        assert "dropped a request worker's link" in caplog.text
        assert good.call("echo", 3) == (3,)
        assert _until(lambda: len(server._conns) == 1)  # noqa: SLF001 - the bad one closed on the device
    finally:
        bad.close()
        good.close()


def test_a_link_whose_handshake_never_comes_holds_up_nobody(served) -> None:
    """A peer that authenticates and then sends nothing waits on its own thread: other workers
    connect and are answered meanwhile, and closing the server ends its wait too."""
    server, key = served
    silent = Client(server.address, family="AF_UNIX", authkey=key)  # never offers its arena
    client = LinkClient(server.address, key)
    try:
        assert client.call("echo", "meanwhile") == ("meanwhile",)
        assert _threads("link-handshake") >= 1
        started = time.monotonic()
        server.close()
        assert time.monotonic() - started < 3
        assert _until(lambda: not server._conns)  # noqa: SLF001 - every link closed, the silent one too
        with pytest.raises((EOFError, OSError)):
            silent.recv_bytes()  # its socket was shut down
    finally:
        silent.close()
        client.close()


def test_closing_the_server_closes_every_link_and_ends_its_reader(tmp_path) -> None:
    """At close, calls still waiting on the device fail on their workers (503: the device process is gone), each link
    is closed, and the reading thread ends (joined, not left running)."""
    key, release = os.urandom(16), threading.Event()
    before = set(threading.enumerate())
    server = LinkServer(str(tmp_path / "link.sock"), key, {"wait": lambda: release.wait(10)}, threads=8)
    reading = [t for t in set(threading.enumerate()) - before if t.name == "link-read-all"]
    assert len(reading) == 1
    clients = [LinkClient(server.address, key) for _ in range(3)]
    try:
        with ThreadPoolExecutor(3) as pool:
            waits = [pool.submit(client.call, "wait") for client in clients]
            time.sleep(0.2)
            server.close()
            for wait in waits:
                with pytest.raises(NotReady, match="device process is gone"):
                    wait.result(5)
        assert not server._conns  # noqa: SLF001
        assert not reading[0].is_alive()
    finally:
        release.set()
        for client in clients:
            client.close()
