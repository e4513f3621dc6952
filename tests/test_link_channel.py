"""A link channel's framing on a socket pair: what it reads ahead, and messages cut anywhere."""
from __future__ import annotations

import os
import pickle
import socket
import struct
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import pytest

from shim.workers.channel import READ_AHEAD, TAKE_AT_MOST, Channel


class _CountingSocket:
    """A socket whose ``recv_into`` calls are counted (each one lets go of the interpreter lock)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock, self.reads = sock, 0

    def recv_into(self, buffer: Any, *args: Any) -> int:
        self.reads += 1
        return self._sock.recv_into(buffer, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    ends = [Channel(Connection(os.dup(s.fileno()))) for s in (a, b)]
    a.close()
    b.close()
    yield ends
    for end in ends:
        end.close()


def test_small_messages_sent_together_are_read_in_one_read(pair) -> None:
    sender, receiver = pair
    messages = [(i, "logits", {"rows": i, "pad": b"x" * (37 * i)}) for i in range(20)]
    for message in messages:
        sender.send(message)
    counting = _CountingSocket(receiver.sock)
    receiver.sock = counting  # type: ignore[assignment]
    assert [receiver.recv() for _ in messages] == messages
    assert counting.reads == 1  # not three per message (header, places, pickle)


def _wire_bytes(messages: list[Any]) -> bytes:
    """What a sender puts on its socket for ``messages``."""
    out, wire = socket.socketpair()  # a sender's bytes, caught on ``wire``
    sender = Channel(Connection(os.dup(out.fileno())))
    sent = bytearray()

    def catch() -> None:
        while chunk := wire.recv(1 << 20):
            sent.extend(chunk)

    catcher = threading.Thread(target=catch, daemon=True)
    catcher.start()
    for message in messages:
        sender.send(message)
    sender.close()
    out.close()
    catcher.join(10)
    wire.close()
    assert not catcher.is_alive()
    return bytes(sent)


def _steps(total: int) -> list[tuple[int, int]]:
    """``[start, end)`` of 1, 2, 3, ... 64 bytes, then 100 000 at a time, over ``total`` bytes."""
    cuts, at, step = [], 0, 1
    while at < total:
        cuts.append((at, min(total, at + step)))
        at += step
        step = step + 1 if step < 64 else 100_000
    return cuts


def _mixed_messages() -> list[Any]:
    big = np.random.default_rng(5).standard_normal(3 * READ_AHEAD // 8 + 17)  # over the read-ahead
    return [("small", 1), ("big", big), ("after", b"y" * (READ_AHEAD - 5)), ("last", np.arange(7))]


def _assert_mixed(got: list[Any], messages: list[Any]) -> None:
    assert [g[0] for g in got] == ["small", "big", "after", "last"]
    assert got[0][1] == 1 and got[2][1] == b"y" * (READ_AHEAD - 5)
    np.testing.assert_array_equal(got[1][1], messages[1][1])
    np.testing.assert_array_equal(got[3][1], np.arange(7))


def test_messages_cut_anywhere_and_large_buffers_arrive_whole() -> None:
    messages = _mixed_messages()  # the big one read straight into place
    sent = _wire_bytes(messages)
    into, peer = socket.socketpair()  # then fed to a receiver 1, 2, 3, ... bytes at a time
    receiver = Channel(Connection(os.dup(into.fileno())))

    def dribble() -> None:
        for start, end in _steps(len(sent)):
            peer.sendall(sent[start:end])

    writer = threading.Thread(target=dribble, daemon=True)
    writer.start()
    try:
        got = [receiver.recv() for _ in messages]
    finally:
        writer.join(10)
        for end in (receiver, into, peer):
            end.close()
    assert not writer.is_alive()
    _assert_mixed(got, messages)


def test_take_ready_takes_the_messages_that_came_whole_and_never_waits() -> None:
    """One thread reading many links takes what came: a message cut anywhere waits for its rest
    (one larger than the read-ahead too), and a call with nothing come returns at once."""
    messages = _mixed_messages()
    sent = _wire_bytes(messages)
    into, peer = socket.socketpair()
    receiver = Channel(Connection(os.dup(into.fileno())))
    ends = [len(_wire_bytes(messages[:index + 1])) for index in range(len(messages))]  # each message's last byte
    got: list[Any] = []
    calls: list[list[Any]] = []

    def take() -> None:
        calls.append(receiver.take_ready())

    try:
        for start, end in _steps(len(sent)):
            peer.sendall(sent[start:end])
            taker = threading.Thread(target=take, daemon=True)
            taker.start()
            taker.join(5)
            assert not taker.is_alive(), "take_ready waited for bytes that had not come"
            got += calls[-1]
            assert len(got) == sum(1 for last in ends if last <= end)  # those whole by now, no more
        assert receiver.take_ready() == []  # nothing more came: at once
        peer.close()
        with pytest.raises(EOFError):
            receiver.take_ready()
    finally:
        receiver.close()
        into.close()
    _assert_mixed(got, messages)


def test_take_ready_gives_the_messages_before_a_bad_one_then_its_error() -> None:
    into, peer = socket.socketpair()
    receiver = Channel(Connection(os.dup(into.fileno())))
    try:
        good = _wire_bytes([("good", 1), ("good", 2)])
        peer.sendall(good + struct.pack("!IQ", 0, 12) + b"not a pickle")
        assert receiver.take_ready() == [("good", 1), ("good", 2)]  # not lost with the bad one
        with pytest.raises(pickle.UnpicklingError):
            receiver.take_ready()
    finally:
        for end in (receiver, into, peer):
            end.close()


def test_take_ready_reads_no_more_after_its_share_and_loses_nothing() -> None:
    messages = [(i, "logits", b"z" * 500) for i in range(3 * TAKE_AT_MOST)]  # more than the read-ahead holds
    into, peer = socket.socketpair()
    receiver = Channel(Connection(os.dup(into.fileno())))
    peer.sendall(_wire_bytes(messages))  # all of it waiting in the socket (about 100 KiB)
    first = receiver.take_ready()
    assert TAKE_AT_MOST <= len(first) < len(messages)  # its share, then the other links' turn
    got = first
    while len(got) < len(messages):
        more = receiver.take_ready()
        assert more, "whole messages were left behind"
        got += more
    for end in (receiver, into, peer):
        end.close()
    assert got == messages


def test_take_ready_at_a_close_part_way_through_a_message_is_eof(pair) -> None:
    sender, receiver = pair
    sender.send(("whole", 1))
    sender.sock.sendall(_wire_bytes([("cut", b"x" * 100)])[:50])
    sender.close()
    assert receiver.take_ready() == [("whole", 1)]
    with pytest.raises(EOFError):
        receiver.take_ready()


def test_take_ready_gives_the_messages_that_came_before_the_close_then_eof(pair) -> None:
    sender, receiver = pair
    sender.send(("first", 1))
    sender.send(("second", 2))
    sender.close()
    assert receiver.take_ready() == [("first", 1), ("second", 2)]
    with pytest.raises(EOFError):
        receiver.take_ready()


def test_a_closed_peer_is_eof_even_partway_through_a_message(pair) -> None:
    sender, receiver = pair
    sender.send(("whole", 1))
    sender.sock.sendall(b"\x00\x00")  # the first bytes of a header, then nothing
    sender.close()
    assert receiver.recv() == ("whole", 1)
    with pytest.raises(EOFError):
        receiver.recv()


def _root(obj: Any) -> Any:
    """What an array's bytes lie in, through its bases and memoryviews."""
    while True:
        if isinstance(obj, np.ndarray) and obj.base is not None:
            obj = obj.base
        elif isinstance(obj, memoryview):
            obj = obj.obj
        else:
            return obj


def test_take_ready_builds_a_message_larger_than_the_read_ahead_where_it_was_read() -> None:
    """A message larger than the read-ahead is read into room grown for it alone, and its arrays are
    built on those bytes (no second copy of it while it is taken), aligned; the read-ahead is back to
    its size and the messages after it come as before."""
    big = np.random.default_rng(9).standard_normal(READ_AHEAD)  # 8 times the read-ahead
    messages = [("big", big, b"in band"), ("after", np.arange(5)), ("big again", big[::-1].copy(), b"")]
    sent = _wire_bytes(messages)
    into, peer = socket.socketpair()
    receiver = Channel(Connection(os.dup(into.fileno())))
    writer = threading.Thread(target=peer.sendall, args=(sent,), daemon=True)
    writer.start()
    got: list[Any] = []
    try:
        deadline = time.monotonic() + 10
        while len(got) < len(messages) and time.monotonic() < deadline:
            got += receiver.take_ready()
        writer.join(5)
    finally:
        for end in (receiver, into, peer):
            end.close()
    assert [g[0] for g in got] == ["big", "after", "big again"]
    np.testing.assert_array_equal(got[0][1], big)
    assert got[0][2] == b"in band"
    np.testing.assert_array_equal(got[1][1], np.arange(5))
    np.testing.assert_array_equal(got[2][1], big[::-1])
    for message in (got[0], got[2]):
        root = _root(message[1])
        assert isinstance(root, bytearray) and len(root) > message[1].nbytes  # the whole message's room
        assert message[1].flags.writeable
        assert message[1].flags.aligned and message[1].ctypes.data % 16 == 0  # the pickle padded before it
    assert len(receiver._ahead) == READ_AHEAD  # noqa: SLF001 - the grown room went with the message


def test_a_pickle_cut_short_is_a_bad_message_not_the_end_of_the_link() -> None:
    """Unpickling a pickle cut short raises EOFError, which readers take for a link its peer closed:
    it comes as a ValueError (logged and the link dropped as a bad message), on both paths."""
    into, peer = socket.socketpair()
    receiver = Channel(Connection(os.dup(into.fileno())))
    try:
        cut = pickle.dumps(("call", 1), protocol=5)[:2]  # cut where unpickling says "Ran out of input"
        peer.sendall(struct.pack("!IQ", 0, len(cut)) + cut)
        with pytest.raises(ValueError, match="cut short"):
            receiver.take_ready()
        peer.sendall(struct.pack("!IQ", 0, len(cut)) + cut)
        with pytest.raises(ValueError, match="cut short"):
            receiver.recv()
    finally:
        for end in (receiver, into, peer):
            end.close()
