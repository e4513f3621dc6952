"""A connection served on a thread of its own, outside waitress's event loop (``--connection-threads``).

Under waitress, the event loop's thread reads and parses a request, then hands it to a task thread
(a wake that, in a busy request worker, waits for the interpreter lock), and each turn of the loop
is a ``select`` and the Python around it. Here one thread per connection does it all: a blocking
read, waitress's own parser (limits, chunked bodies, the early 401), waitress's task (the WSGI call,
the response's head, error pages) and the send. Connections still arrive through the event loop's
accept (and the accept gate), count in the server's ``active_channels`` and drain as others do.
"""
from __future__ import annotations

import copy
import logging
import socket
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

SEND_AT_BYTES = 1 << 20  # a response's bytes buffered before they go out while the task still writes


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
        own_thread = True

        def __init__(self, server: Any, sock: socket.socket, addr: Any, adj: Any, map: dict | None = None) -> None:
            # a response's head and body go out in one send once the task is done (waitress writes
            # each as it comes past ``send_bytes``: two sends, two reads for the client), a large
            # body as it is written
            adj = copy.copy(adj)
            adj.send_bytes = SEND_AT_BYTES
            # a map of its own: the event loop never polls it (it stays in ``active_channels``)
            super().__init__(OwnThreadServer(server), sock, addr, adj, map={})
            sock.settimeout(adj.channel_timeout)  # blocking, up to the idle timeout
            self._thread = threading.Thread(target=self._serve, name=f"connection-{self._fileno}", daemon=True)
            try:
                self._thread.start()
            except Exception:  # noqa: BLE001 - no thread for it (a process limit): this one connection ends
                log.exception("no thread for a connection from %s: closing it", addr)
                self.handle_close()

        def _serve(self) -> None:
            try:
                while self.connected and not (self.will_close or self.close_when_flushed):
                    try:
                        data = self.socket.recv(self.adj.recv_bytes)
                    except OSError:  # idle past channel_timeout, or reset
                        break
                    if not data:  # closed by the client, or shut down to stop: what was read is served
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

        def _flush_outbufs_below_high_watermark(self) -> None:
            if self.total_outbufs_len > self.adj.outbuf_high_watermark:
                self._flush_all()  # this thread is the only writer: nobody else would drain them

        def stop(self) -> None:
            """Stop reading, from another thread: a request already read is still answered, then the
            connection closes (``join`` waits for that)."""
            sock = self.socket
            if sock is None:  # closed already, by its thread
                return
            try:
                sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass

        def join(self, timeout: float) -> None:
            self._thread.join(timeout)

    return ThreadedChannel


def limit_connections(servers: list[Any]) -> None:
    """Waitress's checks for ``servers`` whose channels all have threads of their own: the connection
    limit counts them (they are in no event loop's map, which waitress counts), and there is no idle
    sweep: their sockets' timeout closes them (the sweep would mark a channel to close while its
    thread may be reading a request, walking ``active_channels`` while their threads change it)."""
    limit = servers[0].adj.connection_limit

    def open_connections() -> int:
        return sum(len(s.active_channels) for s in servers)

    for server in servers:
        def readable(inner: Any = server.readable) -> bool:
            return inner() and open_connections() < limit

        server.maintenance = lambda now: None
        server.readable = readable
