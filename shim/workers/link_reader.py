"""One thread that reads every link of the device process (``selectors``), where a thread per link
each blocked in its own read cost a thread's waking, and its wait for the interpreter lock, per
message: the links ready at once are read in one wake-up.

A link is read only once its handshake is done (``add``): from then on this thread alone reads its
socket, taking the messages that came whole (``Channel.take_ready``, which never waits for the rest
of one), and hands each to ``on_message`` in the link's order. ``on_message`` runs on this thread
for every link, so it must not block: it starts a call (on a pool, or in a batcher) and returns.
Whatever goes wrong with one link (its peer gone, a message that cannot be read, one ``on_message``
refuses) drops that link alone: ``on_gone`` is called once for it, and the others go on. Should the
thread itself fail (the selector), every link is dropped and ``on_fail`` says so: nothing is read
any more, and the process is to end.
"""
from __future__ import annotations

import logging
import selectors
import socket
import threading
from typing import Any, Callable

from .channel import Channel

log = logging.getLogger(__name__)


class LinkReader:
    """Reads the links ``add``ed to it on a thread of its own until ``close``.

    Args:
        on_message: ``on_message(chan, message)`` for each message, in each link's order; must not block.
        on_gone: ``on_gone(chan)`` once for a link that is read no more (by then not registered here),
            which is to close it: its peer gone, an error, or this reader closing.
        on_fail: ``on_fail()`` once the reading thread has failed and dropped every link (not at ``close``).
    """

    def __init__(self, on_message: Callable[[Channel, Any], None], on_gone: Callable[[Channel], None],
                 on_fail: Callable[[], None] | None = None) -> None:
        self._on_message, self._on_gone, self._on_fail = on_message, on_gone, on_fail
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()  # guards what follows
        self._joining: list[Channel] = []  # added, for the reading thread to register
        self._closing = False
        self._thread = threading.Thread(target=self._read, name="link-read-all", daemon=True)
        self._thread.start()

    def add(self, chan: Channel) -> None:
        """Read ``chan`` from now on (from any thread; after the reader closed, ``on_gone`` at once)."""
        with self._lock:
            taken = not self._closing
            if taken:
                self._joining.append(chan)
        if taken:
            self._wake()
        else:
            self._on_gone(chan)

    def close(self, timeout: float = 5.0) -> None:
        """Stop reading: every link still read is handed to ``on_gone`` (on the reading thread), which
        this waits for up to ``timeout`` seconds."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        self._wake()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"w")
        except (BlockingIOError, OSError):  # one pending already wakes it (or it is gone)
            pass

    def _read(self) -> None:
        failed = False
        try:
            while True:
                for key, _ in self._selector.select():
                    if key.data is None:
                        if self._woken():
                            return
                    else:
                        self._take(key.fd, key.data)
        except Exception:  # noqa: BLE001 - a failure of the selector itself: no link can be read
            log.exception("the device process's link reader failed; its links are closed")
            failed = True
        finally:
            with self._lock:
                self._closing = True
                joining, self._joining = self._joining, []
            read = [(key.fd, key.data) for key in self._selector.get_map().values() if key.data is not None]
            for fd, chan in read:
                self._gone(fd, chan)
            for chan in joining:
                self._gone(None, chan)
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()
        if failed and self._on_fail is not None:
            self._on_fail()

    def _woken(self) -> bool:
        """Take the wake-ups and register the links added since: whether the reader is to stop."""
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            if self._closing:
                return True  # those added are handed to on_gone as the reader ends
            joining, self._joining = self._joining, []
        for chan in joining:
            try:  # by its fd (as ``_gone`` unregisters it, whatever became of the socket)
                self._selector.register(chan.sock.fileno(), selectors.EVENT_READ, chan)
            except Exception as exc:  # noqa: BLE001 - closed already, say: that link only
                log.warning("a request worker's link could not be read: %s: %s", type(exc).__name__, exc)
                self._gone(None, chan)
        return False

    def _take(self, fd: int, chan: Channel) -> None:
        """Hand on the messages of ``chan`` that came whole; drop it when it is gone or fails."""
        while True:
            try:
                messages = chan.take_ready()
            except (EOFError, OSError):  # the peer went (or the link was shut down)
                self._gone(fd, chan)
                return
            except Exception as exc:  # noqa: BLE001 - a message that cannot be read: that link only
                self._drop_bad(fd, chan, "a message that cannot be read", exc)
                return
            for message in messages:
                try:
                    self._on_message(chan, message)
                except Exception as exc:  # noqa: BLE001 - that link only
                    self._drop_bad(fd, chan, "a message that cannot be started", exc)
                    return
            if not chan.failing:  # else one came after these that it could not take: raised now
                return

    def _drop_bad(self, fd: int, chan: Channel, what: str, exc: Exception) -> None:
        log.warning("dropped a request worker's link, %s: %s: %s", what, type(exc).__name__, exc)
        self._gone(fd, chan)

    def _gone(self, fd: int | None, chan: Channel) -> None:
        """``chan`` read no more (unregistered, where ``fd`` says it was), then ``on_gone``."""
        try:
            if fd is not None:
                self._selector.unregister(fd)
        except Exception:  # noqa: BLE001 - closed all the same
            log.exception("a request worker's link could not be unregistered")
        try:
            self._on_gone(chan)
        except Exception:  # noqa: BLE001 - the other links go on
            log.exception("a request worker's link could not be closed")
