"""The device side's one thread that reads every link (``LinkReader`` inside ``LinkServer``): many
links at once, each in its order, and whatever goes wrong with one link drops that link alone."""
from __future__ import annotations

import os
import pickle
import socket
import struct
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection
from typing import Any

import numpy as np
import pytest

from accel.errors import NotReady
from shim.workers.arena import Arena
from shim.workers.channel import READ_AHEAD, Channel
from shim.workers.link import Deferred, LinkClient, LinkServer
from shim.workers.link_reader import LinkReader


def _threads(name: str) -> int:
    return sum(thread.name == name for thread in threading.enumerate())


def _call(client: LinkClient, method: str, *args: Any) -> Any:
    """``client.call`` that cannot hang the suite."""
    return client.call_later(method, *args).result(10)


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
    before = set(threading.enumerate())
    arenas = [Arena(1 << 20) for _ in range(8)]
    clients = [LinkClient(server.address, key, arena=arena) for arena in arenas]
    try:
        assert _until(lambda: _threads("link-handshake") == 0 and _threads("link-deadline") == 0)
        started = [t.name for t in set(threading.enumerate()) - before if t.is_alive()]
        assert sorted(started) == ["link-reader"] * len(clients)  # the clients' own: none per link on the device side
        for link, client in enumerate(clients):
            for index in range(200):
                client.notify("order", link, index)
        rng = np.random.default_rng(0)
        arrays = [rng.standard_normal(int(rng.integers(1, 5000))).astype(np.float32) for _ in range(64)]
        with ThreadPoolExecutor(32) as pool:
            replies = list(pool.map(lambda i: _call(clients[i % 8], "echo", i, arrays[i]), range(64)))
        for i, (index, array) in enumerate(replies):
            assert index == i
            np.testing.assert_array_equal(array, arrays[i])
        for link, client in enumerate(clients):
            assert _call(client, "seen", link) == list(range(200))  # a link's calls start in its order
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
            replies = list(pool.map(lambda i: _call(clients[i % 4], "echo", arrays[i])[0], range(12)))
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
        assert _call(bad, "echo", 1) == (1,)
        bad._chan.send("not a call")  # noqa: SLF001 - what a broken worker could send
        with pytest.raises(NotReady, match="device process is gone"):
            for _ in range(100):  # until the device's reader has dropped it
                _call(bad, "echo", 2)
                time.sleep(0.02)
        assert "dropped a request worker's link" in caplog.text
        assert _call(good, "echo", 3) == (3,)
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
        assert _call(client, "echo", "meanwhile") == ("meanwhile",)
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


def test_a_peer_that_never_answers_the_keys_challenge_holds_up_nobody_and_goes_after_the_handshake_time(
        tmp_path, caplog) -> None:
    """The key's challenge runs on the link's handshake thread, not the acceptor's: while a peer
    that connected says nothing, a worker connecting after it is answered, and the silent one is
    still in its handshake; it is dropped once the handshake has taken ``handshake_s`` (its socket
    closed, the reason logged)."""
    key, limit = os.urandom(16), 3.0
    server = LinkServer(str(tmp_path / "link.sock"), key, {"echo": lambda *a: a}, threads=4, handshake_s=limit)
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.settimeout(limit + 5)
    pool = ThreadPoolExecutor(1)  # connecting must not hang the suite should it be held up
    clients: list[LinkClient] = []
    try:
        mute.connect(server.address)
        connected = time.monotonic()
        assert _until(lambda: len(server._conns) == 1)  # noqa: SLF001 - accepted, in its handshake
        clients.append(pool.submit(LinkClient, server.address, key).result(limit / 2))
        assert _call(clients[0], "echo", "meanwhile") == ("meanwhile",)
        assert len(server._conns) == 2  # noqa: SLF001 - the silent one still in its handshake
        received = b""
        while chunk := mute.recv(4096):  # the challenge, then the end of the link
            received += chunk
        waited = time.monotonic() - connected
        assert received, "the server sent no challenge"
        assert 0.8 * limit < waited < limit + 3, waited
        assert _until(lambda: len(server._conns) == 1)  # noqa: SLF001 - the client's alone
        assert f"refused a request worker connection: TimeoutError: no handshake within {limit} s" in caplog.text
        assert _call(clients[0], "echo", "after") == ("after",)
    finally:
        mute.close()
        for client in clients:
            client.close()
        server.close()
        pool.shutdown(wait=False)


def test_a_peer_that_trickles_bytes_is_dropped_at_the_handshake_time_all_told(tmp_path, caplog) -> None:
    """The limit is on the whole handshake, not on each read: a byte every 0.1 s keeps no link open."""
    server = LinkServer(str(tmp_path / "link.sock"), os.urandom(16), {}, threads=2, handshake_s=0.5)
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        peer.connect(server.address)
        started = time.monotonic()
        with pytest.raises(OSError):
            peer.sendall(struct.pack("!i", 200))  # an answer of 200 bytes, sent one at a time
            while time.monotonic() - started < 5:
                peer.sendall(b"x")  # until the server closes the link
                time.sleep(0.1)
        assert time.monotonic() - started < 2
        assert _until(lambda: not server._conns)  # noqa: SLF001
        assert "no handshake within 0.5 s" in caplog.text
    finally:
        peer.close()
        server.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the SystemExit, re-raised
def test_a_handshake_ended_by_any_exception_drops_its_link_and_one_after_the_deadline_keeps_its_cause(
        tmp_path, caplog, monkeypatch) -> None:
    """Whatever ends a handshake, a BaseException too (a pin that exits), its link is dropped (the
    worker sees the link end, not a wait for ever); a failure of its own after the deadline passed
    is logged as itself, not as the timeout (helper-71)."""
    def exits(address: int, size: int) -> None:
        raise SystemExit("the pin gave up")

    def slow_and_wrong(chan, pin, unpin) -> None:  # the arena's step, failing its own way after the deadline
        time.sleep(0.6)
        raise LookupError("the arena's step failed after the deadline")

    for pin, handshake_s in ((exits, 30.0), (None, 0.3)):
        if pin is None:
            monkeypatch.setattr(Channel, "accept_arena", slow_and_wrong)
        key = os.urandom(16)
        server = LinkServer(str(tmp_path / f"{handshake_s}.sock"), key, {"echo": lambda *a: a}, threads=2,
                            pin=pin or exits, unpin=lambda address: None, handshake_s=handshake_s)
        arena = Arena(1 << 20, pinned=True)
        pool = ThreadPoolExecutor(1)
        try:
            connecting = pool.submit(LinkClient, server.address, key, arena=arena)
            assert wait_all([connecting], 5).done, "the worker still waits for its handshake"
            assert isinstance(connecting.exception(), (EOFError, OSError)), connecting.exception()
            assert _until(lambda: not server._conns)  # noqa: SLF001 - the link dropped
        finally:
            pool.shutdown(wait=False)
            server.close()
            arena.close()
    assert "in its handshake: LookupError: the arena's step failed after the deadline" in caplog.text


def test_a_handshake_time_of_zero_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="handshake_s"):
        LinkServer(str(tmp_path / "link.sock"), b"k", {}, threads=1, handshake_s=0)


def test_a_peer_without_the_key_is_refused_on_its_own_thread_and_the_others_are_served(served, caplog) -> None:
    server, key = served
    with pytest.raises(AuthenticationError):
        Client(server.address, family="AF_UNIX", authkey=b"not the key")
    pool = ThreadPoolExecutor(1)  # connecting must not hang the suite should the acceptor be gone
    try:
        client = pool.submit(LinkClient, server.address, key).result(5)
    finally:
        pool.shutdown(wait=False)
    try:
        assert _call(client, "echo", 1) == (1,)
        assert _until(lambda: any("refused a request worker connection" in r.getMessage() for r in caplog.records))
        refused = [r for r in caplog.records if "refused a request worker connection" in r.getMessage()]
        assert refused[0].threadName == "link-handshake"
        assert _until(lambda: len(server._conns) == 1)  # noqa: SLF001 - the refused one closed
    finally:
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
            assert not reading[0].is_alive()  # joined
            for wait in waits:
                with pytest.raises(NotReady, match="device process is gone"):
                    wait.result(5)
        assert not server._conns  # noqa: SLF001
    finally:
        release.set()
        for client in clients:
            client.close()


def _pair() -> tuple[socket.socket, Channel]:
    """A raw socket and the channel on its other end."""
    raw, other = socket.socketpair()
    chan = Channel(Connection(os.dup(other.fileno())))
    other.close()
    return raw, chan


def _wire(message: Any) -> bytes:
    data = pickle.dumps(message, protocol=5)
    return struct.pack("!IQ", 0, len(data)) + data


def test_a_message_that_cannot_be_read_after_good_ones_drops_its_link_at_once() -> None:
    """Good messages and a bad one in one write: the good ones are handed on, then the link is
    dropped then and there (not once its worker sends something more, which it may never do)."""
    got, gone = [], []
    reader = LinkReader(lambda chan, message: got.append(message), lambda chan: (gone.append(chan), chan.close()))
    raw, chan = _pair()
    try:
        reader.add(chan)
        raw.sendall(_wire((1, "a", ())) + _wire((2, "b", ())) + struct.pack("!IQ", 0, 5) + b"\x80\x05bad")
        assert _until(lambda: gone == [chan], 2)
        assert got == [(1, "a", ()), (2, "b", ())]
    finally:
        reader.close()
        raw.close()


def test_closing_the_reader_hands_every_link_to_on_gone_once() -> None:
    """Links whose peers are still there, read and not yet read: at close each goes to ``on_gone``
    once, on the reading thread, which has ended when ``close`` returns."""
    got, gone = [], []
    reader = LinkReader(lambda chan, message: got.append(message), lambda chan: (gone.append(chan), chan.close()))
    pairs = [_pair() for _ in range(5)]
    try:
        for index, (raw, chan) in enumerate(pairs):
            reader.add(chan)
            raw.sendall(_wire((index, "m", ())))
        assert _until(lambda: len(got) == 5)
        reader.close()
        assert sorted(map(id, gone)) == sorted(id(chan) for _, chan in pairs)
        assert not any(t.name == "link-read-all" and t.is_alive() for t in threading.enumerate())
        late_raw, late = _pair()
        reader.add(late)  # after close: handed back at once
        assert gone[-1] is late
        late_raw.close()
    finally:
        reader.close()
        for raw, _ in pairs:
            raw.close()


def test_a_reader_that_fails_drops_its_links_and_says_so(tmp_path, monkeypatch) -> None:
    """Should the reading thread itself fail, every link is closed (its callers told the device
    process is gone) and the server's ``on_fail`` is called: nothing reads the links any more."""
    key, failed = os.urandom(16), threading.Event()
    server = LinkServer(str(tmp_path / "link.sock"), key, {"echo": lambda *a: a}, threads=2, on_fail=failed.set)
    client = LinkClient(server.address, key)
    try:
        assert _call(client, "echo", 1) == (1,)

        def broken(timeout: float | None = None) -> list:
            raise OSError("the selector broke")

        monkeypatch.setattr(server._reader._selector, "select", broken)  # noqa: SLF001
        server._reader._wake()  # noqa: SLF001 - its next wait fails
        assert failed.wait(5)
        with pytest.raises(NotReady, match="device process is gone"):
            for _ in range(100):
                _call(client, "echo", 2)
                time.sleep(0.02)
        assert _until(lambda: not server._conns)  # noqa: SLF001
    finally:
        client.close()
        server.close()


@pytest.fixture()
def slow_unpin(tmp_path):
    """A server whose unpin waits for ``release`` (as CUDA's may), ``unpinned`` set once it is done;
    and a pinned worker's arena and key to connect with."""
    key, release, unpinned = os.urandom(16), threading.Event(), threading.Event()

    def unpin(address: int) -> None:
        release.wait(10)
        unpinned.set()

    server = LinkServer(str(tmp_path / "link.sock"), key, {"echo": lambda *a: a}, threads=2,
                        pin=lambda address, nbytes: None, unpin=unpin)
    arena = Arena(4 << 20, keep=1 << 20, pinned=True)
    yield server, key, arena, release, unpinned
    release.set()
    arena.close()
    server.close()


def test_a_gone_workers_arena_is_unpinned_off_the_reading_thread(slow_unpin) -> None:
    """Unpinning a gone worker's arena may wait (for CUDA's locks): the other links are read and
    answered meanwhile, and the unpin comes all the same."""
    server, key, arena, release, unpinned = slow_unpin
    going, staying = LinkClient(server.address, key, arena=arena), LinkClient(server.address, key)
    try:
        assert _call(going, "echo", 1) == (1,)
        going.close()  # the device drops its link and unpins its arena, which waits for ``release``
        time.sleep(0.2)
        assert staying.call_later("echo", 2).result(3) == (2,)  # not behind the unpin (up to 10 s)
        release.set()
        assert unpinned.wait(5)
    finally:
        staying.close()


def test_closing_the_server_waits_for_the_unpins_on_their_way(slow_unpin) -> None:
    """A gone worker's arena being unpinned as the server closes: ``close`` waits for it (the process
    and its CUDA context may go right after)."""
    server, key, arena, release, unpinned = slow_unpin
    going = LinkClient(server.address, key, arena=arena)
    assert _call(going, "echo", 1) == (1,)
    going.close()
    assert _until(lambda: _threads("arena-unpin") == 1)
    closing = threading.Thread(target=server.close)
    closing.start()
    time.sleep(0.3)
    assert closing.is_alive()  # waiting for the unpin
    release.set()
    closing.join(5)
    assert not closing.is_alive() and unpinned.is_set()
