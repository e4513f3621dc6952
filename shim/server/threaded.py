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
import json
import logging
import socket
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

# a task never sends: its response goes out once it is done (its request's body freed by then), head
# and body in one send (waitress's outbuf_high_watermark still flushes a huge one as it is written)
SEND_AT_BYTES = 1 << 62
BUSY_RETRY_S = 1  # Retry-After of the 503 a connection gets when no thread can be made for it
# a request must arrive in time, however its bytes trickle in (each read only bounds the silence):
HEADERS_S = 30.0              # its head, from its first byte
BODY_S = 60.0                 # the whole request, from its first byte, plus its body's length at
BODY_MIN_BYTES_PER_S = 1 << 20  # this rate (a 256 MiB body: 60 s + 256 s)
LINGER_S = 1.0                # after a 408, what the client still sends is read (then dropped) this long


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


class ThreadBudget:
    """How many connections may have threads: the connection limit, lowered to what there is when a
    thread cannot be made (a container's pids limit: ``RuntimeError: can't start new thread``),
    raised by one as each connection ends (the next accept tries again). Logged once per shortage.
    Connections count over all of ``servers``."""

    def __init__(self, limit: int, servers: list[Any]) -> None:
        self.limit = self.cap = limit
        self._servers = servers
        self._lock = threading.Lock()

    def open_connections(self) -> int:
        return sum(len(s.active_channels) for s in self._servers)

    def short(self, exc: BaseException) -> None:
        """No thread for the connection just accepted (still counted among the open ones)."""
        open_connections = self.open_connections() - 1
        with self._lock:
            if self.cap == self.limit:
                log.warning("no thread for a new connection (%s: %s): answering 503 and accepting no more than "
                            "the %d open until one ends", type(exc).__name__, exc, open_connections)
            self.cap = max(1, open_connections)

    def ended(self) -> None:
        with self._lock:
            if self.cap < self.limit:
                self.cap += 1
                if self.cap == self.limit:
                    log.info("connections have threads again, up to the limit of %d", self.limit)


def closing_error(status: str, message: str, *headers: str) -> bytes:
    """A whole HTTP/1.1 response with a JSON error body, that closes the connection."""
    body = json.dumps({"error": message}).encode()
    head = "".join(f"{h}\r\n" for h in (f"HTTP/1.1 {status}", "Content-Type: application/json",
                                          "Connection: close", *headers, f"Content-Length: {len(body)}"))
    return head.encode() + b"\r\n" + body


_BUSY = closing_error("503 Service Unavailable", "the shim cannot take another connection now (no thread for it): "
                      "retry", f"Retry-After: {BUSY_RETRY_S}")


def request_begun(request: Any) -> bool:
    """Whether waitress's parser ``request`` (None between requests) has begun a request: blank
    lines between keep-alive requests are none."""
    return request is not None and bool(request.headers_finished or request.header_plus.strip())


def threaded(channel_class: type, budget: ThreadBudget) -> type:
    """``channel_class`` (a waitress HTTPChannel) served on a thread per connection, within ``budget``."""

    class ThreadedChannel(channel_class):  # type: ignore[misc, valid-type]
        own_thread = True

        def __init__(self, server: Any, sock: socket.socket, addr: Any, adj: Any, map: dict | None = None) -> None:
            adj = copy.copy(adj)
            adj.send_bytes = SEND_AT_BYTES
            # a map of its own: the event loop never polls it (it stays in ``active_channels``)
            super().__init__(OwnThreadServer(server), sock, addr, adj, map={})
            sock.settimeout(adj.channel_timeout)  # blocking, up to the idle timeout
            self._send_failed = False
            self._thread = threading.Thread(target=self._serve, name=f"connection-{self._fileno}", daemon=True)
            try:
                self._thread.start()
            except Exception as exc:  # noqa: BLE001 - no thread for it (a process limit): a 503, not a reset
                budget.short(exc)
                try:
                    sock.send(_BUSY)
                except OSError:
                    pass
                self.handle_close()

        def handle_close(self) -> None:
            was_open = self.connected
            super().handle_close()
            if was_open and self._thread.ident is not None:  # one that had a thread: room for the next
                budget.ended()

        def _serve(self) -> None:
            began: float | None = None  # when the request being read sent its first byte
            try:
                while self.connected and not (self.will_close or self.close_when_flushed):
                    deadline = self._deadline(began)
                    now = time.monotonic()
                    if deadline is not None and now >= deadline:
                        self._late(self.request)
                        break
                    by_deadline = deadline is not None and deadline - now < self.adj.channel_timeout
                    self.socket.settimeout(deadline - now if by_deadline else self.adj.channel_timeout)
                    try:
                        data = self.socket.recv(self.adj.recv_bytes)
                    except TimeoutError:
                        if by_deadline:
                            continue  # its deadline: answered above
                        break  # silent for channel_timeout, between requests or in one
                    except OSError:  # reset
                        break
                    if not data:  # closed by the client, or shut down to stop: what was read is served
                        break
                    arrived = time.monotonic()
                    self.socket.settimeout(self.adj.channel_timeout)  # its answers' sends: the whole timeout
                    self.last_activity = time.time()
                    self.received(data)
                    served = bool(self.requests)
                    while self.requests and self.connected:
                        self.service()
                    if not self._flush_all():
                        break
                    request = self.request
                    if not request_begun(request):
                        began = None  # between requests (blank lines between them are none)
                    elif served:
                        began = time.monotonic()  # came with the last one's tail: counted from its answer
                    elif began is None:
                        began = arrived
            except Exception:  # noqa: BLE001 - the connection ends; the others go on
                log.exception("connection %s failed", self.addr)
            finally:
                if not self._send_failed:
                    self._flush_all()
                self.handle_close()

        def _late(self, request: Any) -> None:
            """A 408 for ``request``, which did not arrive in time; nothing more goes out after it,
            and what the client still sends is read for a moment (a close with unread input would
            reset the connection before the client reads the 408)."""
            part, seconds = self._allowed(request)
            self._send_failed = True
            try:
                self.socket.settimeout(5.0)
                self.socket.sendall(closing_error("408 Request Timeout", f"the request did not arrive in time "
                                                  f"({part} within {seconds:.0f} s of its first byte)"))
                self.socket.shutdown(socket.SHUT_WR)
                self.socket.settimeout(LINGER_S)
                while self.socket.recv(1 << 16):
                    pass
            except OSError:
                pass

        def _allowed(self, request: Any) -> tuple[str, float]:
            """What of ``request`` must be in, and within how many seconds of its first byte: its head
            in ``HEADERS_S``; once that is in, all of it in ``BODY_S`` and its body's length (up to
            the body limit; a chunked body's as it grows) at ``BODY_MIN_BYTES_PER_S``."""
            if not request.headers_finished:
                return "its head", HEADERS_S
            length = min(max(request.content_length or 0, request.body_bytes_received or 0),
                         self.adj.max_request_body_size)
            return "all of it", BODY_S + length / BODY_MIN_BYTES_PER_S

        def _deadline(self, began: float | None) -> float | None:
            """When the request being read must be in (``_allowed``); None between requests."""
            request = self.request
            if request is None or began is None:
                return None
            return began + self._allowed(request)[1]

        def _flush_all(self) -> bool:
            """The responses in the out-buffers sent, the socket's timeout for each wait on a client that
            does not read; False (and no more tries) once a send failed or timed out."""
            while self.connected and self.total_outbufs_len and not self._send_failed:
                flushed, failed = self._flush_exception(self._flush_some, do_close=False)
                if failed or not flushed:
                    self._send_failed = True
            return not self._send_failed

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


def limit_connections(servers: list[Any], budget: ThreadBudget) -> None:
    """Waitress's checks for ``servers`` whose channels all have threads of their own: the connection
    limit (``budget``'s cap) counts them (they are in no event loop's map, which waitress counts; at
    the limit, logged as waitress does), and there is no idle sweep: their sockets' timeout closes
    them (the sweep would mark a channel to close while its thread may be reading a request, walking
    ``active_channels`` while their threads change it)."""
    full = [False]

    def room() -> bool:
        now_full = budget.open_connections() >= budget.cap
        if now_full != full[0] and budget.cap == budget.limit:
            log.warning("total open connections reached the connection limit, no longer accepting new "
                        "connections" if now_full else "total open connections dropped below the connection "
                        "limit, accepting new connections again")
        full[0] = now_full
        return not now_full

    for server in servers:
        def readable(inner: Any = server.readable) -> bool:
            return inner() and room()

        server.maintenance = lambda now: None
        server.readable = readable
