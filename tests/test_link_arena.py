"""The link's shared-memory arena: slots, the device's mapping of it, and calls that lend through it."""
from __future__ import annotations

import copy
import ctypes
import io
import os
import pickle
import threading
import time
import types
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from accel.errors import InternalError, InvalidInput, NotReady
from shim.backends.base import PlainJpeg
from shim.backends.nvjpeg import address
from shim.ops.imaging import decode_image
from shim.workers import arena as arena_module
from shim.workers.arena import MIN_LENT_BYTES, Arena, PeerArena
from shim.workers.link import LinkClient, LinkServer, _Pending

from tests.conftest import encode


def test_slots_are_aligned_apart_and_coalesce_when_given_back() -> None:
    arena = Arena(1 << 20)
    try:
        a = arena.lend(memoryview(b"a" * 100))
        b = arena.lend(memoryview(b"b" * 1000))
        c = arena.lend(memoryview(b"c" * 10))
        assert (a, b, c) == (0, 128, 1152)
        assert arena.free_bytes() == (1 << 20) - 1152 - 64
        arena.give_back(b, 1000)  # a hole in the middle, then its neighbours: one free run again
        assert arena.lend(memoryview(b"d" * 2000)) == 1216  # first fit: the hole is too small
        arena.give_back(1216, 2000)
        arena.give_back(a, 100)
        arena.give_back(c, 10)
        assert arena.free_bytes() == 1 << 20
        assert arena.lend(memoryview(bytes(1 << 20))) == 0  # all of it, in one piece
        assert arena.lend(memoryview(b"x")) is None  # full
    finally:
        arena.close()


def test_the_peer_reads_what_was_lent_and_nothing_outside() -> None:
    arena = Arena(1 << 20)
    peer = PeerArena(os.dup(arena.fd))
    try:
        data = np.arange(50_000, dtype=np.float32)
        offset = arena.lend(memoryview(data).cast("B"))
        assert offset is not None
        seen = np.frombuffer(peer.view(offset, data.nbytes), np.float32)
        np.testing.assert_array_equal(seen, data)
        with pytest.raises(ValueError, match="outside the arena"):
            peer.view((1 << 20) - 8, 16)
    finally:
        peer.close()
        arena.close()


def test_the_peer_refuses_an_arena_that_could_shrink() -> None:
    fd = os.memfd_create("not-sealed", os.MFD_CLOEXEC)
    os.ftruncate(fd, 1 << 16)
    with pytest.raises(ValueError, match="not sealed"):
        PeerArena(fd)


def built_on(x: np.ndarray) -> str:
    """What an array's bytes belong to: 'mmap' (the arena) or 'bytearray' (read off the socket)."""
    root = x
    while isinstance(root, np.ndarray) and root.base is not None:
        root = root.base
    return type(getattr(root, "obj", root)).__name__


def arena_mappings() -> set[str]:
    """The address ranges of this process's mappings of link arenas."""
    return {line.split()[0] for line in open("/proc/self/maps", encoding="utf-8") if "accelshim-link" in line}


@pytest.fixture()
def arena_link(tmp_path):
    key = os.urandom(16)
    seen: list[str] = []  # what each argument was built on
    release = threading.Event()

    def total(x: np.ndarray) -> tuple[float, np.ndarray]:
        seen.append(built_on(x))
        return float(x.sum(dtype=np.float64)), x[:3].copy()

    def echo(x: np.ndarray) -> np.ndarray:
        seen.append(built_on(x))
        return x

    def fail(x: np.ndarray) -> None:
        raise InvalidInput(f"no good: {x.nbytes} bytes")

    def slow(x: np.ndarray) -> int:
        release.wait(10)
        return x.nbytes

    def jpeg(item: PlainJpeg) -> tuple[bytes, bool, tuple[int, ...], str, tuple[int, ...]]:
        data = item.data  # what the device's decode takes: bytes, or a memoryview
        seen.append(built_on(data.obj) if isinstance(data, memoryview) else type(data).__name__)
        return bytes(data), ctypes.string_at(address(data), len(data)), item.shape, item.what, \
            decode_image(data, item.what, 1 << 30).shape

    handlers = {"total": total, "echo": echo, "fail": fail, "slow": slow, "jpeg": jpeg}
    server = LinkServer(str(tmp_path / "link.sock"), key, handlers, threads=32)
    arena = Arena(4 << 20)
    client = LinkClient(server.address, key, arena=arena)
    yield client, arena, seen, server, release
    release.set()
    client.close()
    server.close()
    arena.close()


def test_large_buffers_cross_in_the_arena_and_their_slots_come_back(arena_link) -> None:
    client, arena, seen, *_ = arena_link
    x = np.random.default_rng(0).random(MIN_LENT_BYTES // 4, dtype=np.float32)  # just big enough to be lent
    total, head = client.call("total", x)
    assert total == pytest.approx(float(x.sum(dtype=np.float64)))
    np.testing.assert_array_equal(head, x[:3])
    np.testing.assert_array_equal(client.call("echo", x), x)
    assert seen == ["mmap", "mmap"]  # rebuilt on the arena's bytes where they lie, not on a copy
    assert arena.free_bytes() == 4 << 20  # every slot given back once answered
    small = np.ones(100, np.float32)
    assert client.call("total", small)[0] == 100.0
    assert seen[-1] == "bytearray"  # a small buffer crossed the socket


def test_a_plain_jpegs_bytes_cross_in_the_arena_and_the_device_reads_them_where_they_lie(arena_link, chelsea) -> None:
    client, arena, seen, *_ = arena_link
    big = encode(chelsea, "JPEG", quality=90)
    small = encode(chelsea[:64, :64], "JPEG")
    assert len(small) < MIN_LENT_BYTES <= len(big)
    for data, where in ((big, "mmap"), (small, "bytearray")):  # a small one crosses the socket out of band
        shape = (*np.asarray(Image.open(io.BytesIO(data))).shape[:2], 3)
        got, at_address, got_shape, what, decoded = client.call("jpeg", PlainJpeg(data, shape, "image[3]"))
        assert seen[-1] == where
        assert (got, at_address, got_shape, what, decoded) == (data, data, shape, "image[3]", shape)
        assert arena.free_bytes() == 4 << 20


def test_a_plain_jpeg_is_unpickled_on_its_buffer_and_old_protocols_keep_bytes() -> None:
    item = PlainJpeg(b"\xff\xd8 not really \xff\xd9", (1, 2, 3), "image")
    buffers: list[pickle.PickleBuffer] = []
    pickled = pickle.dumps(item, protocol=5, buffer_callback=buffers.append)
    assert len(buffers) == 1 and item.data not in pickled  # out of band
    given = bytearray(item.data)
    got = pickle.loads(pickled, buffers=[given])
    assert type(got.data) is memoryview and got.data.obj is given and got.data.readonly  # as sent: no copy
    assert got == item
    for protocol in (4, 5):  # in band: bytes as they were, the device's memoryview too
        for sent in (item, got):
            again = pickle.loads(pickle.dumps(sent, protocol=protocol))
            assert again == item and type(again.data) is bytes
    assert copy.deepcopy(got) == item
    wide = np.frombuffer(bytearray(item.data), np.uint16).reshape(2, 4)  # a buffer of other items and shape
    flat = pickle.loads(pickled, buffers=[wide]).data
    assert (flat.ndim, flat.itemsize, len(flat), bytes(flat)) == (1, 1, 16, item.data)


def test_concurrent_calls_each_get_their_own_bytes_and_a_full_arena_falls_back(arena_link) -> None:
    client, arena, seen, *_ = arena_link
    rng = np.random.default_rng(1)
    # 16 callers of 1 MiB each through a 4 MiB arena: some are lent, the others cross the socket
    arrays = [rng.random(1 << 18, dtype=np.float32) for _ in range(16)]
    start = threading.Barrier(16)

    def call(x: np.ndarray) -> np.ndarray:
        start.wait(5)
        return client.call("echo", x)

    with ThreadPoolExecutor(16) as pool:
        for _ in range(3):
            for sent, got in zip(arrays, list(pool.map(call, arrays))):
                np.testing.assert_array_equal(got, sent)
    assert arena.free_bytes() == 4 << 20
    assert {"mmap", "bytearray"} <= set(seen)  # both ways were taken
    seen.clear()
    too_big = rng.random(2 << 20, dtype=np.float32)  # 8 MiB: never fits
    np.testing.assert_array_equal(client.call("echo", too_big), too_big)
    assert seen == ["bytearray"]


def test_slots_come_back_after_an_error_and_when_the_link_closes(arena_link) -> None:
    client, arena, _seen, server, _release = arena_link
    x = np.ones(1 << 16, np.float32)
    with pytest.raises(InvalidInput, match="262144 bytes"):
        client.call("fail", x)
    assert arena.free_bytes() == 4 << 20
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(client.call, "slow", x)
        time.sleep(0.2)
        assert arena.free_bytes() < 4 << 20  # lent while the call is on the device
        server.close()
        with pytest.raises(NotReady):
            waiting.result(5)
    assert arena.free_bytes() == 4 << 20


def test_the_slots_of_calls_answered_later_come_back(arena_link, monkeypatch) -> None:
    client, arena, seen, *_ = arena_link
    x = np.random.default_rng(2).random(1 << 16, dtype=np.float32)
    futures = [client.call_later("echo", x) for _ in range(16)]
    for future in futures:
        np.testing.assert_array_equal(future.result(5), x)
    assert "mmap" in seen  # lent through the arena
    assert arena.free_bytes() == 4 << 20
    # a caller held up between its send and noting the slots: the reply lands first; they come back all the same
    send = client._send  # noqa: SLF001

    def send_then_stall(*args):
        lent = send(*args)
        time.sleep(0.2)
        return lent

    monkeypatch.setattr(client, "_send", send_then_stall)
    future = client.call_later("echo", x)
    assert future.done()  # answered while the caller stalled
    np.testing.assert_array_equal(future.result(), x)
    assert arena.free_bytes() == 4 << 20


def test_every_waiting_call_is_answered_when_the_link_closes_even_if_its_slots_cannot_come_back(tmp_path) -> None:
    key, release = os.urandom(16), threading.Event()
    server = LinkServer(str(tmp_path / "link.sock"), key, {"slow": lambda x: release.wait(10)}, threads=4)
    arena = Arena(8 << 20, keep=0)  # nothing kept: a slot of 1 MiB coming back is given back to the system
    closed = threading.Event()
    client = LinkClient(server.address, key, on_close=closed.set, arena=arena)
    try:
        x = np.ones(1 << 18, np.float32)
        waiting = [client.call_later("slow", x) for _ in range(3)]
        time.sleep(0.2)
        arena._map.close()  # noqa: SLF001 - giving the slots back now fails (the mapping is gone)
        server.close()
        for future in waiting:
            assert isinstance(future.exception(5), NotReady)
        assert closed.wait(5)
    finally:
        release.set()
        server.close()
        os.close(arena.fd)


def test_an_error_reply_that_cannot_be_read_is_an_internal_error(arena_link) -> None:
    client, *_ = arena_link
    pending = _Pending(Future())
    client._settle(pending, False, ("error", "not a status"))  # noqa: SLF001 - a reply of the wrong shape
    assert isinstance(pending.future.exception(0), InternalError)


def test_a_gone_workers_arena_is_unmapped_by_the_device(tmp_path) -> None:
    key = os.urandom(16)
    server = LinkServer(str(tmp_path / "link.sock"), key, {"echo": lambda x: x}, threads=4)
    try:
        before = arena_mappings()
        arena = Arena(1 << 20)
        client = LinkClient(server.address, key, arena=arena)
        x = np.ones(1 << 16, np.float32)
        np.testing.assert_array_equal(client.call("echo", x), x)  # its last call lent a slot
        made = arena_mappings() - before
        assert len(made) == 2  # the worker's mapping and the device's
        client.close()
        arena.close()
        deadline = time.monotonic() + 5
        while arena_mappings() & made and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not arena_mappings() & made
    finally:
        server.close()


def test_a_burst_beyond_the_kept_bytes_goes_back_to_the_system() -> None:
    arena = Arena(4 << 20, keep=1 << 20)
    try:
        small = arena.lend(memoryview(np.ones(1 << 20, np.uint8)))
        big = arena.lend(memoryview(np.ones(2 << 20, np.uint8)))
        assert (small, big) == (0, 1 << 20)
        assert os.fstat(arena.fd).st_blocks * 512 >= 3 << 20  # both slots' pages are taken
        arena.give_back(big, 2 << 20)
        assert os.fstat(arena.fd).st_blocks * 512 <= (1 << 20) + (64 << 10)  # the burst's pages went back
        assert arena.lend(memoryview(np.full(2 << 20, 7, np.uint8))) == 1 << 20  # and the run is usable again
    finally:
        arena.close()


class _Unpicklable:
    def __reduce__(self):
        raise ValueError("not today")


def test_a_refused_arena_and_an_unpicklable_result(tmp_path, caplog) -> None:
    key = os.urandom(16)
    seen: list[str] = []
    handlers = {"echo": lambda x: (seen.append(built_on(x)), x)[1], "odd": lambda: _Unpicklable(),
                "lock": lambda: threading.Lock()}
    server = LinkServer(str(tmp_path / "link.sock"), key, handlers, threads=4)
    arena = Arena(1 << 20)
    unsealed = os.memfd_create("unsealed", os.MFD_CLOEXEC)
    os.ftruncate(unsealed, 1 << 20)
    sealed, arena.fd = arena.fd, unsealed  # an arena the device may not map
    try:
        client = LinkClient(server.address, key, arena=arena)
        x = np.arange(1 << 16, dtype=np.float32)
        np.testing.assert_array_equal(client.call("echo", x), x)
        assert seen == ["bytearray"]  # the link went on over its socket alone
        assert "without its arena" in caplog.text and "not sealed" in caplog.text
        with pytest.raises(InternalError, match="not today"):  # answered, not left waiting
            client.call("odd")
        with pytest.raises(InternalError, match="pickle"):
            client.call("lock")
        client.close()
    finally:
        arena.fd = sealed
        arena.close()
        os.close(unsealed)
        server.close()


def mapped(address: int) -> bool:
    """Whether ``address`` lies in a mapping of this process (/proc/self/maps)."""
    for line in open("/proc/self/maps", encoding="utf-8"):
        start, end = (int(x, 16) for x in line.split()[0].split("-"))
        if start <= address < end:
            return True
    return False


class PinLog:
    """The device's pin and unpin as the link calls them; whether the arena was still mapped at unpin."""

    def __init__(self, fail: bool = False) -> None:
        self.pins: list[tuple[int, int]] = []
        self.unpins: list[tuple[int, bool]] = []
        self.fail = fail

    def pin(self, address: int, nbytes: int) -> None:
        self.pins.append((address, nbytes))
        if self.fail:
            raise RuntimeError("no pinning today")

    def unpin(self, address: int) -> None:
        self.unpins.append((address, mapped(address)))


def test_a_workers_kept_bytes_are_pinned_as_it_connects_and_unpinned_after_its_last_view(tmp_path) -> None:
    """The device pins the bytes the worker never gives back (its ``keep``, whole pages); when the
    worker is gone, the pin stays while a call still holds an array built on the arena, and goes
    once the last one does, before the mapping."""
    key, kept = os.urandom(16), []
    log = PinLog()

    def keep_it(x: np.ndarray) -> int:
        kept.append(x.reshape(-1, 4)[1:])  # a view of a view, as handlers make them
        return int(x.nbytes)

    def keep_jpeg(item: PlainJpeg) -> int:
        kept.append(item.data)  # a memoryview of a read-only memoryview of an arena view, as unpickled
        return len(item.data)

    server = LinkServer(str(tmp_path / "link.sock"), key, {"keep": keep_it, "echo": lambda x: x,
                                                           "keep_jpeg": keep_jpeg}, threads=4,
                        pin=log.pin, unpin=log.unpin)
    arena, other = Arena(4 << 20, keep=(1 << 20) + 100, pinned=True), Arena(1 << 20)
    try:
        unpinned = LinkClient(server.address, key, arena=other)  # as the forwarded requests' link: no pin
        client = LinkClient(server.address, key, arena=arena)
        assert len(log.pins) == 1 and log.pins[0][1] == 1 << 20  # the kept bytes, whole pages only
        address = log.pins[0][0]
        x = np.arange(1 << 16, dtype=np.float32)
        assert client.call("keep", x) == x.nbytes
        np.testing.assert_array_equal(kept[0].reshape(-1), x[4:])  # built on the arena's bytes
        assert built_on(kept[0]) == "mmap"
        jpeg = bytes(range(256)) * (MIN_LENT_BYTES // 256 + 1)
        assert client.call("keep_jpeg", PlainJpeg(jpeg, (1, 1, 3))) == len(jpeg)
        assert built_on(kept[1].obj) == "mmap"
        np.testing.assert_array_equal(client.call("echo", x), x)
        np.testing.assert_array_equal(unpinned.call("echo", x), x)
        unpinned.close()
        client.close()
        arena.close()
        deadline = time.monotonic() + 5
        while server._conns and time.monotonic() < deadline:  # noqa: SLF001 - until the device has seen both go
            time.sleep(0.02)
        assert not server._conns  # noqa: SLF001
        assert log.unpins == [] and mapped(address)  # the kept array still reads the arena
        del kept[0]
        time.sleep(0.2)
        # and so does the JPEG's memoryview (its slot was given back at the reply: whatever lies there now)
        assert log.unpins == [] and mapped(address) and len(bytes(kept[0])) == len(jpeg)
        kept.clear()
        deadline = time.monotonic() + 5
        while not log.unpins and time.monotonic() < deadline:
            time.sleep(0.02)
        assert log.unpins == [(address, True)]  # once, while the arena was still mapped
        deadline = time.monotonic() + 5
        while mapped(address) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not mapped(address)  # and then unmapped
    finally:
        other.close()
        server.close()


def test_an_arena_whose_pin_fails_still_lends_and_is_never_unpinned(tmp_path, caplog) -> None:
    key = os.urandom(16)
    log = PinLog(fail=True)
    seen: list[str] = []
    server = LinkServer(str(tmp_path / "link.sock"), key, {"echo": lambda x: (seen.append(built_on(x)), x)[1]},
                        threads=4, pin=log.pin, unpin=log.unpin)
    arena = Arena(1 << 20, pinned=True)
    try:
        client = LinkClient(server.address, key, arena=arena)
        x = np.arange(1 << 16, dtype=np.float32)
        np.testing.assert_array_equal(client.call("echo", x), x)
        assert seen == ["mmap"] and "could not pin" in caplog.text
        client.close()
    finally:
        arena.close()
        server.close()
    assert len(log.pins) == 1 and log.unpins == []


def test_a_peer_closed_with_no_view_left_unpins_at_once() -> None:
    arena = Arena(1 << 20)
    log = PinLog()
    peer = PeerArena(os.dup(arena.fd), 64 << 10, log.pin, log.unpin)
    try:
        view = peer.view(0, 4096)
        assert log.pins == [(peer.address, 64 << 10)] and view.ctypes.data == peer.address
        del view
        assert log.unpins == []  # still open
        peer.close()
        assert log.unpins == [(peer.address, True)]
        peer.close()  # again: nothing more
        assert len(log.unpins) == 1
        with pytest.raises(ValueError, match="closed"):
            peer.view(0, 16)
    finally:
        arena.close()


class NoThread:
    """A thread that cannot start (the process is out of them)."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def start(self) -> None:
        raise RuntimeError("can't start new thread")


def test_a_view_outliving_the_close_unpins_as_it_goes_even_without_a_thread(monkeypatch) -> None:
    """The last view going after ``close`` unpins on a thread of its own; where no thread can start,
    on the thread that let it go (not pinned and mapped for good)."""
    arena = Arena(1 << 20)
    try:
        for threads in (True, False):
            log = PinLog()
            peer = PeerArena(os.dup(arena.fd), 64 << 10, log.pin, log.unpin)
            kept = memoryview(peer.view(64, 100)).toreadonly()  # as a PlainJpeg holds its bytes
            peer.close()
            assert log.unpins == [] and mapped(peer.address)
            if not threads:  # (the arena's threads only: the process's other threads may start theirs)
                monkeypatch.setattr(arena_module, "threading", types.SimpleNamespace(Thread=NoThread))
            del kept
            deadline = time.monotonic() + 5
            while not log.unpins and time.monotonic() < deadline:
                time.sleep(0.01)
            monkeypatch.undo()
            assert log.unpins == [(peer.address, True)]
    finally:
        arena.close()


def test_no_slot_straddles_the_end_of_the_kept_bytes() -> None:
    """The device may pin the kept bytes, and CUDA refuses a copy that starts in pinned memory and
    runs past it: a buffer that would cross that end goes after it, the room before it stays free."""
    arena = Arena(4 << 20, keep=(1 << 20) + 100, pinned=True)  # kept: whole pages, 1 MiB
    try:
        assert arena.keep == 1 << 20
        first = arena.lend(memoryview(bytes(600 << 10)))
        second = arena.lend(memoryview(bytes(600 << 10)))  # would cross 1 MiB: placed at it
        third = arena.lend(memoryview(bytes(300 << 10)))  # fits before it
        assert (first, second, third) == (0, 1 << 20, 600 << 10)
        for offset, nbytes in ((first, 600 << 10), (second, 600 << 10), (third, 300 << 10)):
            assert offset + nbytes <= arena.keep or offset >= arena.keep
        for offset, nbytes in ((second, 600 << 10), (first, 600 << 10), (third, 300 << 10)):
            arena.give_back(offset, nbytes)
        assert arena.free_bytes() == 4 << 20
        assert arena.lend(memoryview(bytes(3 << 20))) == 1 << 20  # the run after the kept bytes is whole again
        assert arena.lend(memoryview(bytes(1 << 20))) == 0  # and so is the one before
    finally:
        arena.close()


def test_only_an_arena_offered_for_pinning_keeps_slots_off_the_kept_end() -> None:
    """An arena that is not pinned (the forwarded requests' link) places a large buffer at its
    start; a pinned one whose size is not whole pages keeps its kept bytes to whole pages inside it."""
    plain = Arena(4 << 20, keep=1 << 20)
    odd = Arena((4 << 20) + 1000, keep=16 << 20, pinned=True)
    try:
        assert plain.lend(memoryview(bytes(3 << 20))) == 0
        assert odd.keep == 4 << 20  # what the device pins: the whole pages of the arena
        assert odd.lend(memoryview(bytes((4 << 20) - 64))) == 0
        assert odd.lend(memoryview(bytes(128))) == 4 << 20  # not across the pinned end, after it
    finally:
        plain.close()
        odd.close()
