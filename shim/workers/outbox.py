"""Whole messages onto one socket, from threads that may wait for the peer and from threads that
must not (a batcher's, answering the calls of its batch).

``send`` waits until its message is out. ``post`` never waits: its message goes out at once as far
as the socket takes it without blocking, and the outbox's writer thread sends the rest, as it sends
any message posted while another one is on its way. One message is on its way at a time (``busy``,
under one condition): a sender waits for its turn, a posting thread that cannot send at once queues
its message, and the rest of a message a posting thread began is the writer's next message (the
turn passes to the writer with it). A peer that is gone is no error for ``post``: the message is
dropped (logged). A send that fails partway shuts the socket down, so that the peer sees the link
end rather than read the next message after a partial one.
"""
from __future__ import annotations

import logging
import socket
import threading
from collections import deque
from typing import Any, Sequence

log = logging.getLogger(__name__)

_MAX_VIEWS = 64  # buffers per sendmsg (the system takes at most IOV_MAX, 1024 on Linux)


class Outbox:
    """Messages (each a sequence of buffers) onto ``sock``; see the module's docstring."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._cond = threading.Condition()  # guards what follows
        self._busy = False                  # a message is on its way
        self._queue: deque[list[memoryview]] = deque()  # posted, waiting for their turn
        self._carry: list[memoryview] | None = None     # the rest of a begun message: the writer's, next
        self._closed = False
        self._writer: threading.Thread | None = None

    def send(self, parts: Sequence[Any]) -> None:
        """Send ``parts`` as one message, waiting for its turn and for the peer as long as it takes.

        Raises:
            OSError: the peer is gone.
        """
        with self._cond:
            while self._busy:
                self._cond.wait()
            self._busy = True
        try:
            for part in parts:
                self._sock.sendall(part)
        except BaseException as exc:
            self._fail(exc)  # maybe partway: the link cannot carry another message after it
            raise
        finally:
            self._done()

    def post(self, parts: Sequence[Any]) -> None:
        """Send ``parts`` as one message without waiting (the writer finishes what cannot go now)."""
        views = [memoryview(part).cast("B") for part in parts]
        with self._cond:
            if self._busy or self._queue:  # its turn comes after those: the writer's to send
                try:
                    self._hand_over(views, carry=False)
                except BaseException as exc:  # no writer: the message would be lost, the link with it
                    self._fail(exc)
                    raise
                return
            self._busy = True
        handed = False
        try:
            rest = self._push(views)
            if rest:
                handed = self._hand_over(rest, carry=True)
                if not handed:  # closed meanwhile: the rest will not follow what went out
                    self._fail(EOFError("the outbox closed partway through a message"))
        except BaseException as exc:
            self._fail(exc)
            if not isinstance(exc, (OSError, ValueError)):
                raise
        finally:
            if not handed:
                self._done()

    def close(self) -> None:
        """No more messages: the writer stops once it has tried what it holds (the socket is the
        caller's to close, which fails a send that is stuck)."""
        with self._cond:
            self._closed = True
            self._queue.clear()  # nobody will read them (a begun message's rest is still tried)
            self._cond.notify_all()

    def _done(self) -> None:
        """The message on its way is out (or given up): the next one's turn."""
        with self._cond:
            self._busy = False
            self._cond.notify_all()

    def _push(self, views: list[memoryview]) -> list[memoryview]:
        """What of ``views`` the socket does not take without blocking."""
        while views:
            try:
                sent = self._sock.sendmsg(views[:_MAX_VIEWS], [], socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            while views and sent >= views[0].nbytes:
                sent -= views.pop(0).nbytes
            if views and sent:
                views[0] = views[0][sent:]
        return views

    def _hand_over(self, views: list[memoryview], carry: bool) -> bool:
        """``views`` to the writer: the rest of the message on its way (``carry``: its turn passes
        to the writer), or a whole message for its turn; False (dropped) once the outbox is closed."""
        with self._cond:
            if self._closed:  # the link is going: nobody reads it any more
                return False
            if self._writer is None:
                writer = threading.Thread(target=self._write, name="link-writer", daemon=True)
                writer.start()  # raises before anything is handed over when no thread can start
                self._writer = writer
            if carry:
                self._carry = views
            else:
                self._queue.append(views)
            self._cond.notify_all()
            return True

    def _write(self) -> None:
        while True:
            with self._cond:
                while self._carry is None and not (self._queue and not self._busy) and not self._closed:
                    self._cond.wait()
                if self._carry is not None:
                    views, self._carry = self._carry, None  # the turn is the writer's already
                elif self._queue and not self._busy:
                    views, self._busy = self._queue.popleft(), True
                elif self._queue:  # closed, a message still to send: wait for its turn
                    self._cond.wait()
                    continue
                else:
                    return  # closed, nothing left
            try:
                self._send_quietly(views)
            finally:
                self._done()

    def _send_quietly(self, views: list[memoryview]) -> None:
        try:
            for view in views:
                self._sock.sendall(view)
        except (OSError, ValueError) as exc:
            self._fail(exc)
        except Exception as exc:  # noqa: BLE001 - the writer goes on with the next message
            log.exception("the link's writer could not send a message")
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        """A message could not go out whole: the socket is shut down (the peer reads the end of the
        link, not the next message after a partial one) and the message dropped."""
        log.debug("dropped a message; the link is shut down: %s: %s", type(exc).__name__, exc)
        shut_down(self._sock)


def shut_down(sock: socket.socket) -> None:
    """Shut a socket down (both ways) without closing it: a thread blocked on it wakes up."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed
