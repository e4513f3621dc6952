"""One end of a link's socket: messages framed as a header, a pickle (protocol 5) and its out-of-band
buffers, which go through the sender's shared-memory ``Arena`` where they fit (the receiver reads
them where they lie, in its ``PeerArena``) and over the socket otherwise; and the handshake that
offers the arena's fd first."""
from __future__ import annotations

import logging
import os
import pickle
import socket
import struct
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from typing import Any, Callable

from .arena import MIN_LENT_BYTES, Arena, Lent, PeerArena
from .outbox import Outbox, shut_down

log = logging.getLogger(__name__)

#: bytes read ahead at once: a message's header and pickle (its buffers lie in the arena) come in
#: one read, where each part read on its own let go of the interpreter lock and waited to take it
#: back (0.2-0.3 ms each in a busy process on the H200 host)
READ_AHEAD = 1 << 16
SOCKET_ALIGN = 64  # where in a message its first buffer on the socket starts (a multiple of this)
TAKE_AT_MOST = 64  # messages after which ``take_ready`` reads no more (the rest for the next call: other links wait)


class Unencodable(Exception):
    """A message that cannot be pickled (its cause says why)."""


class Channel:
    """Messages over the socket of an authenticated ``Connection`` (which it takes over).

    A message is a header (buffer count, pickle size, then per out-of-band buffer its size and where
    it is: 0 on the socket after the pickle, else 1 + its offset in the sender's arena), the pickle,
    then the buffers that go on the socket.
    """

    def __init__(self, conn: Connection) -> None:
        self.sock = socket.socket(fileno=os.dup(conn.fileno()))
        conn.close()
        self._out = Outbox(self.sock)
        self.peer_arena: PeerArena | None = None  # the device's side: the worker's arena, once sent
        self.authenticated = False  # the server's side: the peer showed the key (``authenticate``)
        self._ahead = bytearray(READ_AHEAD)  # read off the socket, not taken yet: [_start, _end)
        self._start = self._end = 0
        self._failed: BaseException | None = None  # a message ``take_ready`` could not take, after others

    def send(self, message: Any, arena: Arena | None = None, wait: bool = True) -> Lent:
        """Send ``message``, its large buffers through ``arena`` where they fit; the slots taken (the
        caller gives them back once the peer has done with them). Without ``wait`` the calling
        thread never waits for the peer (``Outbox.post``: a gone peer is then no error)."""
        buffers: list[pickle.PickleBuffer] = []
        try:
            data = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
            try:
                raws = [b.raw() for b in buffers]
            except BufferError:  # a non-contiguous buffer: everything in band
                data, raws = pickle.dumps(message, protocol=5), []
        except Exception as exc:
            raise Unencodable(f"{type(exc).__name__}: {exc}") from exc
        lent: Lent = []
        places: list[int] = []
        try:
            for raw in raws:
                offset = arena.lend(raw) if arena is not None and raw.nbytes >= MIN_LENT_BYTES else None
                if offset is not None:
                    lent.append((offset, raw.nbytes))
                places += [raw.nbytes, 0 if offset is None else offset + 1]
            on_socket = [raw for raw, where in zip(raws, places[1::2]) if not where]
            # the pickle padded (unpickling ignores what follows it) for the first buffer on the socket to
            # start SOCKET_ALIGN bytes into the message: one built where it was read (``take_ready``) is aligned
            pad = -(12 + 16 * len(raws) + len(data)) % SOCKET_ALIGN if on_socket else 0
            header = struct.pack(f"!IQ{len(places)}Q", len(raws), len(data) + pad, *places)
            parts = [header + data + bytes(pad), *on_socket]
            if wait:
                self._out.send(parts)
            else:
                self._out.post(parts)
        except BaseException:
            if arena is not None:
                arena.give_back_all(lent)
            raise
        return lent

    def close(self) -> None:
        """Shut the socket down (a writer stuck on a peer that does not read wakes up) and close it
        (the reading side's own, once it has stopped reading)."""
        self._out.close()
        shut_down(self.sock)
        self.sock.close()

    def recv(self) -> Any:
        """The next message, waiting for it.

        Raises:
            EOFError: the link was closed.
            ValueError: a buffer outside the peer's arena, or in an arena never sent.
        """
        count, size = struct.unpack("!IQ", self._exactly(12))
        places = struct.unpack(f"!{2 * count}Q", self._exactly(16 * count)) if count else ()
        data = self._exactly(size)
        buffers = [self._in_arena(where, nbytes) if where else self._exactly(nbytes)
                   for nbytes, where in zip(places[::2], places[1::2])]
        return _unpickle(data, buffers)

    def _in_arena(self, where: int, nbytes: int) -> Any:
        """A buffer the peer lent through its arena (``where`` is 1 + its offset there)."""
        if self.peer_arena is None:
            raise ValueError("a link message names an arena that was never sent")
        return self.peer_arena.view(where - 1, nbytes)

    def _take_in_place(self) -> Any:
        """The next message, whole in a read-ahead that was grown for it alone: built on those bytes,
        which go with it (the read-ahead starts afresh), rather than copied out of them. Its buffers on
        the socket share that room (an array kept keeps all of it) and are writeable; the first starts
        aligned (``SOCKET_ALIGN``), the others where the sizes before them put them."""
        whole = memoryview(self._ahead)
        self._ahead, self._start, self._end = bytearray(READ_AHEAD), 0, 0
        count, size = struct.unpack_from("!IQ", whole)
        places = struct.unpack_from(f"!{2 * count}Q", whole, 12)
        at = 12 + 16 * count
        data, at = whole[at:at + size], at + size
        buffers = []
        for nbytes, where in zip(places[::2], places[1::2]):
            if where:
                buffers.append(self._in_arena(where, nbytes))
            else:
                buffers.append(whole[at:at + nbytes])
                at += nbytes
        return _unpickle(data, buffers)

    @property
    def failing(self) -> bool:
        """Whether ``take_ready`` holds the error of a message it could not take, for its next call."""
        return self._failed is not None

    def take_ready(self) -> list[Any]:
        """The messages whose bytes have all come, reading what the socket holds without waiting for
        more (a message still on its way stays for the next call; no more reads once ``TAKE_AT_MOST``
        were taken; the read-ahead grows to hold a message larger than ``READ_AHEAD``, and that message
        is built on those bytes, not copied): for one thread that reads many links as they become readable.

        Raises:
            EOFError: the peer closed the link (once the messages that came whole were taken).
            Exception: a message that could not be taken (``recv``'s errors), once those before it were.
        """
        if self._failed is not None:
            failed, self._failed = self._failed, None
            raise failed
        messages: list[Any] = []
        while True:
            came = self._read_what_came()
            try:
                while self._end - self._start >= self._needed():  # all its bytes read ahead: no read of the socket
                    # (a read-ahead grown for one message holds it alone, filled: built in place)
                    grown = len(self._ahead) > READ_AHEAD and self._start == 0 and self._end == len(self._ahead)
                    messages.append(self._take_in_place() if grown else self.recv())
            except Exception as exc:
                if not messages:
                    raise
                self._failed = exc  # for the next call: those taken before it go first
                return messages
            if came != "full" or len(messages) >= TAKE_AT_MOST:  # (what the socket still holds keeps
                break  # it readable: none of it is left behind)
        if came == "closed" and not messages:
            raise EOFError("the link was closed")
        return messages

    def _needed(self) -> int:
        """The bytes to read ahead before the next message can be taken (all of it), or its size told
        (its header, then its places)."""
        have = self._end - self._start
        if have < 12:
            return 12
        count, size = struct.unpack_from("!IQ", self._ahead, self._start)
        head = 12 + 16 * count
        if have < head:
            return head
        places = struct.unpack_from(f"!{2 * count}Q", self._ahead, self._start + 12)
        return head + size + sum(n for n, where in zip(places[::2], places[1::2]) if not where)

    def _read_what_came(self) -> str:
        """Read what the socket holds into the read-ahead, never waiting: "drained" (all of it),
        "full" (the read-ahead holds a whole message and has no room left) or "closed" (by the peer)."""
        while True:
            if self._start == self._end:  # (a read-ahead grown for a message went with it: ``_take_in_place``)
                self._start = self._end = 0
            have, needed = self._end - self._start, self._needed()
            if self._end == len(self._ahead) and have >= needed:
                return "full"  # a whole message in it: taken before reading on
            if self._end == len(self._ahead) or len(self._ahead) - self._start < needed:
                if len(self._ahead) < needed:  # a message larger than the read-ahead: room for it
                    grown = bytearray(needed)
                    grown[:have] = memoryview(self._ahead)[self._start:self._end]
                    self._ahead = grown
                else:  # the bytes not taken yet moved to the front
                    self._ahead[:have] = self._ahead[self._start:self._end]
                self._start, self._end = 0, have
            room = len(self._ahead) - self._end
            try:
                read = self.sock.recv_into(memoryview(self._ahead)[self._end:], room, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return "drained"
            except ConnectionResetError:  # gone with replies unread
                return "closed"
            if not read:
                return "closed"
            self._end += read
            if read < room:  # all it held then (a unix stream socket's read takes what it holds, up to the
                return "drained"  # room); what comes later makes it readable again

    def authenticate(self, authkey: bytes) -> None:
        """The server's half of ``multiprocessing``'s authentication with ``authkey`` (as
        ``Listener.accept`` runs it, on whichever thread calls this); ``authenticated`` once it passed.

        Raises:
            AuthenticationError: the peer does not have the key.
            EOFError, OSError: the link was closed (or shut down).
        """
        conn = Connection(os.dup(self.sock.fileno()))
        try:
            deliver_challenge(conn, authkey)
            answer_challenge(conn, authkey)
        finally:
            conn.close()
        self.authenticated = True

    def offer_arena(self, arena: Arena | None) -> bool:
        """The first thing a client does: send its arena's fd (or none) beside b"A" and how many of
        its first bytes the device may pin (8 bytes: for a ``pinned`` arena those it never gives
        back, ``keep``; else 0), or b"-", and read whether the server mapped it (b"1") or will read
        everything off the socket (b"0")."""
        if arena is None:
            socket.send_fds(self.sock, [b"-"], [])
        else:
            socket.send_fds(self.sock, [b"A" + struct.pack("!Q", arena.keep if arena.pinned else 0)], [arena.fd])
        answer = self._exactly(1)
        return bytes(answer) == b"1"

    def accept_arena(self, pin: Callable[[int, int], None] | None = None,
                     unpin: Callable[[int], None] | None = None) -> None:
        """The first thing a server does: map the client's arena, if it sent one (its kept bytes
        pinned with ``pin``, see ``PeerArena``), and say whether it did; an arena that cannot be
        mapped is refused (logged), the link goes on without it.

        Raises:
            EOFError: the link was closed.
        """
        assert self._start == self._end, "bytes were read ahead of the arena's fd"  # it comes first
        tag, fds, flags, _addr = socket.recv_fds(self.sock, 9, 1, socket.MSG_CMSG_CLOEXEC)
        if not tag:
            raise EOFError("the link was closed")
        try:
            if tag[:1] == b"A" and len(tag) < 9:  # the rest of the offer, after the fd's first bytes
                tag += self._exactly(9 - len(tag))
            if tag[:1] == b"A" and len(fds) == 1 and not flags & socket.MSG_CTRUNC:
                keep, = struct.unpack("!Q", tag[1:9])
                self.peer_arena = PeerArena(fds.pop(), keep, pin, unpin)
            elif tag != b"-" or fds:
                raise ValueError(f"the link arena did not arrive whole (tag {tag!r}, {len(fds)} fds, "
                                 f"flags {flags:#x})")
        except ValueError as exc:
            log.warning("a request worker's link goes without its arena: %s", exc)
        finally:
            for fd in fds:
                os.close(fd)
        self.sock.sendall(b"1" if self.peer_arena is not None else b"0")

    def _exactly(self, n: int) -> bytearray:
        """The next ``n`` bytes of the socket: those read ahead first, then a read of whatever the
        socket holds (up to ``READ_AHEAD``: what is left over waits for the next call), or, for a
        large rest, a read straight into the result."""
        buf = bytearray(n)
        view, ahead = memoryview(buf), memoryview(self._ahead)
        got = min(n, self._end - self._start)
        view[:got] = ahead[self._start:self._start + got]
        self._start += got
        while got < n:
            if n - got >= READ_AHEAD:
                read = self.sock.recv_into(view[got:])
            else:
                read = self.sock.recv_into(self._ahead)
                self._start, self._end = min(read, n - got), read
                view[got:got + self._start] = ahead[:self._start]
            if not read:
                raise EOFError("the link was closed")
            got += min(read, n - got)
        return buf


def _unpickle(data: Any, buffers: list[Any]) -> Any:
    """A message's object from its pickle and buffers.

    Raises:
        ValueError: a pickle cut short (its ``EOFError`` is no end of the link).
    """
    try:
        return pickle.loads(data, buffers=buffers)
    except EOFError as exc:
        raise ValueError(f"a link message's pickle is cut short: {exc}") from exc
