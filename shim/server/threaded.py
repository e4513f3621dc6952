"""A connection served on a thread of its own, outside waitress's event loop (``--connection-threads``).

Under waitress, the event loop's thread reads and parses a request, then hands it to a task thread
(a wake that, in a busy request worker, waits for the interpreter lock), and each turn of the loop
is a ``select`` and the Python around it. Here one thread per connection does it all: a blocking
read, waitress's own parser (limits, chunked bodies, the early 401), waitress's task (the WSGI call,
the response's head, error pages) and the send. Connections still arrive through the event loop's
accept (and the accept gate), count in the server's ``active_channels`` and drain as others do.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

log = logging.getLogger(__name__)


class OwnThreadServer:
    """What a threaded channel sees as its server: the waitress server, but for the two calls that
    would involve the event loop: a request to serve (this channel's thread serves it) and the
    trigger (nothing to wake: this thread sends)."""

    def __init__(self, server: Any) -> None:
        self._server = server

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)

    def add_task(self, channel: Any) -> None:
        """Nothing: the channel's thread serves what it read once the read is parsed."""

    def pull_trigger(self) -> None:
        """Nothing: the channel's thread sends its responses itself."""


def threaded(channel_class: type) -> type:
    """``channel_class`` (a waitress HTTPChannel) served on a thread per connection."""

    class ThreadedChannel(channel_class):  # type: ignore[misc, valid-type]
        def __init__(self, server: Any, sock: socket.socket, addr: Any, adj: Any, map: dict | None = None) -> None:
            # a map of its own: the event loop never polls it (it stays in ``active_channels``)
            super().__init__(OwnThreadServer(server), sock, addr, adj, map={})
            sock.settimeout(adj.channel_timeout)  # blocking, up to the idle timeout
            self._thread = threading.Thread(target=self._serve, name=f"connection-{self._fileno}", daemon=True)
            self._thread.start()

        def _serve(self) -> None:
            try:
                while self.connected and not (self.will_close or self.close_when_flushed):
                    try:
                        data = self.socket.recv(self.adj.recv_bytes)
                    except OSError:  # idle past channel_timeout, reset, or shut down to stop
                        break
                    if not data:
                        break
                    self.last_activity = time.time()
                    self.received(data)
                    while self.requests and self.connected:
                        self.service()
                    self._flush_all()
            except Exception:  # noqa: BLE001 - the connection ends; the others go on
                log.exception("connection %s failed", self.addr)
            finally:
                self._flush_all()
                self.handle_close()

        def _flush_all(self) -> None:
            """What is left in the out-buffers (a response the socket's buffer did not take at once)."""
            while self.connected and self.total_outbufs_len:
                flushed, failed = self._flush_exception(self._flush_some, do_close=False)
                if failed or not flushed:
                    break

        def stop(self) -> None:
            """End the connection from another thread: its blocking read returns, and it closes."""
            try:
                self.socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    return ThreadedChannel
