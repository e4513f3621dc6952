"""The accept gate of ``Server`` (request workers' least-connections accepting): a connection the gate
leaves to others is still taken within ``ACCEPT_DEFER_S``, even by a busy process."""
from __future__ import annotations

import socket
import threading
import time

import pytest
from waitress import wasyncore

from shim.server.binding import bind_sockets
from shim.server.serving import ACCEPT_DEFER_S, Server


class Refusing:
    """A gate that never lets this server take a connection (no other process ever does either)."""

    def __init__(self) -> None:
        self.asked, self.noted = 0, []

    def note(self, connections: int) -> None:
        self.noted.append(connections)

    def may_accept(self, connections: int) -> bool:
        self.asked += 1
        return False

    def closed(self) -> None:
        pass


@pytest.fixture
def gated(service, tmp_path):
    gate = Refusing()
    sockets = bind_sockets(None, 0, str(tmp_path / "gated.sock"))
    server = Server(service, sockets, accept_gate=gate, unlink_unix=False)
    gate.listener = sockets[0]
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            # the server's own loop; its idle wakes are rarer than any wait a test makes (an idle turn
            # ends a deferral's wait, and would hide a wait that outlived its connection)
            wasyncore.loop(timeout=1.0, map=server._map, count=1)  # noqa: SLF001

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    yield tmp_path / "gated.sock", gate
    stop.set()
    thread.join(5)
    for s in server._servers:  # noqa: SLF001
        s.close()
    server._tasks.shutdown()  # noqa: SLF001


def _health(path) -> float:
    started = time.perf_counter()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    return time.perf_counter() - started


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "a CPU-bound thread beside"])
def test_a_connection_left_to_others_is_taken_after_the_deferral(gated, busy):
    path, gate = gated
    spinning = threading.Event()

    def spin() -> None:  # holds the interpreter lock between switches, as a loaded worker's requests do
        while not spinning.is_set():
            sum(range(10_000))

    _health(path)  # the server's threads start (under a busy thread, that alone takes a while)
    if busy:
        threading.Thread(target=spin, daemon=True).start()
    asked = gate.asked
    try:
        waits = [_health(path) for _ in range(5)]
    finally:
        spinning.set()
    assert gate.asked >= asked + 5  # every connection was first left to others
    assert all(w >= ACCEPT_DEFER_S * 0.9 for w in waits), waits
    assert sorted(waits)[len(waits) // 2] < 0.25, waits  # then taken: a few turns of the loop at most,
    assert max(waits) < 2.0, waits  # and never left (a loaded machine may pause one of them)
    assert gate.noted and gate.noted[-1] >= 0


def test_a_connection_another_process_took_ends_the_wait_and_the_next_one_waits_anew(gated, monkeypatch):
    """The wait belongs to one connection: once another process took it, the next connection is left
    to others again for the whole deferral, not taken at once because the old wait ran out."""
    import os

    from shim.server import serving

    defer = 0.3  # long enough for this thread to take the connection first on a loaded machine
    monkeypatch.setattr(serving, "ACCEPT_DEFER_S", defer)
    path, gate = gated
    _health(path)
    other = socket.socket(fileno=os.dup(gate.listener.fileno()))  # another worker on the same socket
    try:
        for _ in range(3):
            first = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            first.connect(str(path))
            time.sleep(0.002)  # this server has left it meanwhile
            taken, _ = other.accept()
            taken.close()
            first.close()
            time.sleep(defer * 1.2)  # later than a wait left running would have ended: another connection
            assert _health(path) >= defer * 0.9
    finally:
        other.close()


def test_a_connection_taken_between_a_turns_look_and_its_select_leaves_no_stale_wait(service, tmp_path, monkeypatch):
    """The loop's turns driven by hand: a turn sees a connection waiting (its wait begun), another
    process takes it before the select, the select then blocks until a new connection comes. That
    one is new: it is left to others for a whole deferral, not taken at once because the old
    wait ran out meanwhile."""
    import os
    import select

    from shim.server import serving

    defer = 0.2
    monkeypatch.setattr(serving, "ACCEPT_DEFER_S", defer)
    gate = Refusing()
    path = tmp_path / "turns.sock"
    sockets = bind_sockets(None, 0, str(path))
    server = Server(service, sockets, accept_gate=gate, unlink_unix=False)
    listener = server._servers[0]  # noqa: SLF001 - its turn (readable) and accept, as the loop calls them
    other = socket.socket(fileno=os.dup(sockets[0].fileno()))  # another worker on the same socket

    def waiting() -> bool:
        return bool(select.select([sockets[0]], [], [], 0)[0])

    try:
        first = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        first.connect(str(path))
        listener.readable()
        listener.handle_accept()  # left to others: its wait begins
        listener.readable()  # the next turn's look: still there
        taken, _ = other.accept()  # ... and taken by the other process before this turn's select
        time.sleep(defer * 1.5)  # the select blocks: nothing waits
        second = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        second.connect(str(path))
        listener.handle_accept()  # the select woke for the new connection
        assert waiting(), "the new connection was taken at once, on the old connection's wait"
        time.sleep(defer * 1.1)
        listener.readable()
        listener.handle_accept()  # its own deferral is over: taken now
        assert not waiting()
        for s in (first, second, taken):
            s.close()
    finally:
        other.close()
        for s in server._servers:  # noqa: SLF001
            s.close()
        server._tasks.shutdown()  # noqa: SLF001
