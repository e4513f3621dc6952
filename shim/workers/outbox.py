"""Whole messages onto one socket, from threads that may wait for the peer and from threads that
must not (a batcher's, answering the calls of its batch).

``send`` waits until its message is out. ``post`` never waits: its message goes out at once as far
as the socket takes it without blocking, and the outbox's writer thread sends the rest, as it sends
any message posted while another one is on its way. One lock keeps messages whole: it is held while
a message is on its way, and only threads that may wait (senders, the writer) ever wait for it; when
a posting thread leaves the rest of its message to the writer, the writer releases the lock once the
message is out. A peer that is gone is no error for ``post``: the message is dropped (logged).
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
        self._lock = threading.Lock()          # held while a message is on its way
        self._cond = threading.Condition()     # guards what follows
        self._queue: deque[list[memoryview]] = deque()
        self._carry: list[memoryview] | None = None  # the rest of a posted message: the lock is held for it
        self._closed = False
        self._writer: threading.Thread | None = None

    def send(self, parts: Sequence[Any]) -> None:
        """Send ``parts`` as one message, waiting for the peer as long as it takes.

        Raises:
            OSError: the peer is gone.
        """
        with self._lock:
            for part in parts:
                self._sock.sendall(part)

    def post(self, parts: Sequence[Any]) -> None:
        """Send ``parts`` as one message without waiting (the writer finishes what cannot go now)."""
        views = [memoryview(part).cast("B") for part in parts]
        if not self._lock.acquire(blocking=False):  # another message is on its way
            self._hand_over(views, carry=False)
            return
        try:
            rest = self._push(views)
        except (OSError, ValueError) as exc:
            self._lock.release()
            log.debug("dropped a message for a peer that is gone: %s", exc)
            return
        if rest:
            self._hand_over(rest, carry=True)
        else:
            self._lock.release()

    def close(self) -> None:
        """No more messages: the writer stops once it has tried what it holds (the socket is the
        caller's to close, which fails a send that is stuck)."""
        with self._cond:
            self._closed = True
            self._cond.notify()

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

    def _hand_over(self, views: list[memoryview], carry: bool) -> None:
        """``views`` to the writer: the rest of a message it owes the lock for (``carry``), or a
        whole message to send when the lock is free."""
        with self._cond:
            if self._closed:  # the link is going: nobody reads it any more
                if carry:
                    self._lock.release()
                return
            if carry:
                self._carry = views
            else:
                self._queue.append(views)
            if self._writer is None:
                self._writer = threading.Thread(target=self._write, name="link-writer", daemon=True)
                self._writer.start()
            self._cond.notify()

    def _write(self) -> None:
        while True:
            with self._cond:
                while self._carry is None and not self._queue and not self._closed:
                    self._cond.wait()
                carry, self._carry = self._carry, None
                queued = list(self._queue)
                self._queue.clear()
                if carry is None and not queued:
                    return  # closed, nothing left
            if carry is not None:
                try:
                    self._send_quietly(carry)
                finally:
                    self._lock.release()
            for views in queued:
                with self._lock:
                    self._send_quietly(views)

    def _send_quietly(self, views: list[memoryview]) -> None:
        try:
            for view in views:
                self._sock.sendall(view)
        except (OSError, ValueError) as exc:
            log.debug("dropped a message for a peer that is gone: %s", exc)
