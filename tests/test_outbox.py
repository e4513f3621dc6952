"""The link's outbox: whole messages from threads that wait and threads that must not."""
from __future__ import annotations

import random
import socket
import struct
import threading
import time
import zlib

import pytest

from shim.workers.outbox import Outbox


def _message(i: int, n: int, rng: random.Random) -> list[bytes]:
    body = bytes([i % 251]) * n
    cuts = sorted(rng.sample(range(n), min(3, n))) if n else []
    parts, last = [struct.pack("!QQI", i, n, zlib.crc32(body))], 0
    for cut in cuts:
        parts.append(body[last:cut])
        last = cut
    parts.append(body[last:])
    return parts


@pytest.mark.parametrize("trial", range(4))
def test_posts_and_sends_from_many_threads_arrive_whole_to_a_slow_reader(trial):
    """Threads that post (never waiting) and threads that send (waiting their turn) share one socket
    with a small buffer and a reader that reads in odd pieces: every message arrives once, whole,
    nothing deadlocks (a posted message's rest and a queued message both go by the writer), and at
    the end nothing holds the turn."""
    rng = random.Random(trial)
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    box, count = Outbox(a), 400
    todo, got, errors = list(range(count)), set(), []
    sizes = [0, 1, 10, 1000, 20000, 300000]
    lock = threading.Lock()

    def read_exactly(n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            if rng.random() < 0.1:
                time.sleep(rng.random() * 0.0005)  # a reader that is sometimes slow
            chunk = b.recv(min(n - len(out), rng.choice([7, 100, 5000, 65536])))
            if not chunk:
                raise EOFError
            out += chunk
        return bytes(out)

    def reader() -> None:
        try:
            for _ in range(count):
                i, n, crc = struct.unpack("!QQI", read_exactly(20))
                body = read_exactly(n)
                assert zlib.crc32(body) == crc and i not in got, f"message {i} broken or twice"
                got.add(i)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def writer(k: int) -> None:
        mine = random.Random(trial * 100 + k)
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            parts = _message(i, mine.choice(sizes), mine)
            box.post(parts) if k % 2 else box.send(parts)

    reading = threading.Thread(target=reader, daemon=True)
    writers = [threading.Thread(target=writer, args=(k,), daemon=True) for k in range(8)]
    reading.start()
    for thread in writers:
        thread.start()
    for thread in [*writers, reading]:
        thread.join(30)
    assert not errors and len(got) == count, (errors, len(got))
    box.close()
    if box._writer is not None:
        box._writer.join(5)  # it stops once it has handed back its last turn
        assert not box._writer.is_alive()
    assert not box._busy
    a.close(), b.close()


def test_a_message_that_fails_partway_ends_the_link_instead_of_running_into_the_next():
    """A send that fails after part of its message went out shuts the socket down: the peer reads
    that part and then the end of the link, never the next message glued to half of this one."""
    a, b = socket.socketpair()
    box = Outbox(a)
    with pytest.raises(TypeError):
        box.send([b"HEAD", object()])  # the second part is not a buffer
    with pytest.raises(OSError):
        box.send([b"NEXT"])
    box.post([b"LATER"])  # dropped: no error for a poster
    b.settimeout(5)
    received = b""
    while chunk := b.recv(1024):
        received += chunk
    assert received == b"HEAD" and not box._busy
    a.close(), b.close()
