"""Run the app under waitress on the sockets ``binding`` made (TCP, unix, vsock); warm up in the background."""
from __future__ import annotations

import logging
import os
import select
import signal
import socket
import threading
import time
from typing import Any, Callable, Protocol

from waitress import wasyncore
from waitress.task import ThreadedTaskDispatcher

from ..config import DRAIN_SECONDS, TASKS_SHUTDOWN_S
from ..faults import EXIT_DEVICE_LOST, DeviceLost
from ..service import Service
from .threaded import ThreadBudget, limit_connections, request_begun, threaded
from .waitress_ext import channel_class, make_server

log = logging.getLogger(__name__)
_VSOCK_CID_ANY_NAME = "any"  # VMADDR_CID_ANY in logs: the peer uses this machine's own CID


CONNECTION_LIMIT = 1000  # open connections per server process; more wait in the listen backlog
CHANNEL_TIMEOUT_S = 120  # a connection silent this long is closed (idle, or in a request)
ACCEPT_DEFER_S = 0.005  # how long a worker leaves a waiting connection to a less loaded one
ACCEPT_DEFER_POLL_S = 0.0005  # its pause per turn of its event loop meanwhile


class AcceptGate(Protocol):
    """Which connections a server takes (request workers: ``workers.balance.WorkerGate``)."""

    def note(self, connections: int) -> None:
        """The connections open now."""

    def may_accept(self, connections: int) -> bool:
        """Whether to take a waiting connection, holding ``connections``."""

    def closed(self) -> None:
        """This server takes no more connections (it is stopping)."""


def _in_flight(channel: Any) -> bool:
    """Whether ``channel`` has a request being received (a body still arriving), one being served,
    or a response not yet sent; blank lines between keep-alive requests are no request."""
    return bool(getattr(channel, "requests", None) or request_begun(getattr(channel, "request", None))
                or getattr(channel, "total_outbufs_len", 0))


class Server:
    """A shim being served: the waitress server plus the warm-up thread."""

    def __init__(self, service: Service, sockets: list[socket.socket], *, unlink_unix: bool = True,
                 before_drain: Callable[[], None] | None = None,
                 accept_gate: AcceptGate | None = None) -> None:
        """Args:
            unlink_unix: remove the unix sockets' paths on exit (not when other processes serve them too).
            before_drain: runs, on a thread of its own, once the shim stops accepting; the event loop
                keeps serving open connections until it returns (request workers drain first).
            accept_gate: told the connections open at each turn of the event loop; a waiting one is
                taken while it says so, else left to another process for up to ``ACCEPT_DEFER_S``.
        """
        settings = service.settings
        self._stopping = threading.Event()
        self._unlink_unix = unlink_unix
        self._before_drain = before_drain
        self.service = service
        self.sockets = sockets
        self.exit_code = 0
        self.drain_seconds = DRAIN_SECONDS
        # waitress will not mix TCP and unix sockets in one server, so each socket gets its own
        # server, all on one socket map (one event loop) and one pool of worker threads.
        self._map: dict = {}
        # ``threads`` requests run at once (admission's slots); the extra threads let the queue wait
        # in admission, bounded and deadline-aware, and let health probes through a full shim
        threads = settings.threads + settings.max_queue + 2
        self._tasks = ThreadedTaskDispatcher()
        # with connection threads the pool runs nothing: each connection's thread runs its tasks
        self._tasks.set_thread_count(1 if settings.connection_threads else threads)
        self._servers = [
            make_server(service.app, sock, map=self._map, dispatcher=self._tasks,
                        threads=threads, ident="accelshim",
                        # waitress refuses a body of >= its limit; the shim's limit is inclusive
                        max_request_body_size=settings.max_body_bytes + 1, channel_timeout=CHANNEL_TIMEOUT_S,
                        connection_limit=CONNECTION_LIMIT, clear_untrusted_proxy_headers=True,
                        # tensors are large: keep bodies in memory (waitress spills anything over
                        # 512 KiB to a temp file by default) and read them in big pieces. A response
                        # goes out from its request's thread as it is written (waitress's send_bytes
                        # of 1, deprecated to set): a threshold above it would leave each one to the
                        # event loop's thread, one more hand-off under the interpreter lock
                        inbuf_overflow=settings.max_body_bytes + 65536, outbuf_overflow=1 << 30,
                        recv_bytes=1 << 18, outbuf_high_watermark=1 << 30)
            for sock in sockets
        ]
        tokens = service.guard.tokens if service.guard is not None else None
        channel = channel_class(tokens, self._stopping)
        if settings.connection_threads:
            budget = ThreadBudget(CONNECTION_LIMIT, self._servers)
            channel = threaded(channel, budget)
            limit_connections(self._servers, budget)
        for server in self._servers:
            server.channel_class = channel
        self._gate: AcceptGate | None = None
        if accept_gate is not None:
            self._gate_accepts(accept_gate)
        self._warmup = threading.Thread(target=self._load, name="warmup", daemon=True)
        if service.guard is not None:
            service.guard.monitor.on_trip(self._device_lost)

    def _gate_accepts(self, gate: AcceptGate) -> None:
        """Tell ``gate`` the connections open at each turn of the event loop, and take a waiting one
        only while it says so, else leave it to another process that listens on the same socket:
        every one of them is woken for it, so one that may take it does, at once. While leaving it,
        this one pauses ``ACCEPT_DEFER_POLL_S`` per turn (the socket stays readable: no spinning),
        and takes it itself once it has waited ``ACCEPT_DEFER_S``. A turn in which nothing waited
        ends the wait (another process took the connection); so does a select that blocked for the
        deferral's length after a turn saw one waiting (another process took it between the look and
        the select: the connection that woke the loop is new), once per wait."""
        servers = self._servers
        listeners = [server.socket for server in servers]
        # since when a connection waits; whether it was left this turn; when the listener was last looked
        # at (a turn's start); whether this wait was renewed once
        wait: dict[str, Any] = {"since": None, "left": False, "looked": 0.0, "renewed": False}

        def connections() -> int:
            return sum(len(s.active_channels) for s in servers)

        def still_waiting() -> bool:
            try:
                return bool(select.select(listeners, [], [], 0)[0])
            except (OSError, ValueError):  # a listener closed: stopping
                return False

        def turn(readable: Callable[[], bool]) -> Callable[[], bool]:
            def read() -> bool:  # the first server's, once per turn of the loop
                if not wait["left"] or not still_waiting():  # taken by another process meanwhile
                    wait["since"] = None
                wait["left"] = False
                wait["looked"] = time.monotonic()
                gate.note(connections())
                return readable()
            return read

        def gated(accept: Callable[[], None]) -> Callable[[], None]:
            def handle_accept() -> None:
                if not gate.may_accept(connections()):
                    now = time.monotonic()
                    wait["left"] = True
                    if wait["since"] is None:
                        wait["since"], wait["renewed"] = now, False
                    elif now - wait["looked"] >= ACCEPT_DEFER_S and not wait["renewed"]:
                        # the loop's select blocked this long since the turn's look: the connection
                        # that waited was taken by another process in between, and this is a new one
                        # (or the thread stalled): one whole deferral more, once, then it is taken
                        wait["since"], wait["renewed"] = now, True
                    if now - wait["since"] < ACCEPT_DEFER_S:
                        time.sleep(ACCEPT_DEFER_POLL_S)
                        return
                wait["since"] = None
                accept()
                gate.note(connections())

            return handle_accept

        servers[0].readable = turn(servers[0].readable)  # type: ignore[method-assign]
        for server in servers:
            server.handle_accept = gated(server.handle_accept)  # type: ignore[method-assign]
        self._gate = gate

    def _device_lost(self, fault: DeviceLost) -> None:
        """Stop accepting and exit EXIT_DEVICE_LOST once the requests in flight have failed (503)."""
        self.exit_code = EXIT_DEVICE_LOST
        self.drain_seconds = min(self.drain_seconds, 10.0)
        self.stop()

    def addresses(self) -> list[str]:
        return self.describe_sockets(self.sockets)

    @staticmethod
    def describe_sockets(sockets: list[socket.socket]) -> list[str]:
        """The URLs of ``sockets`` (``http://``, ``unix://``, ``vsock://``)."""
        out = []
        for s in sockets:
            if s.family == socket.AF_UNIX:
                out.append(f"unix://{s.getsockname()}")
            elif s.family == getattr(socket, "AF_VSOCK", None):
                out.append(f"vsock://{_VSOCK_CID_ANY_NAME}:{s.getsockname()[1]}")
            else:
                host, port = s.getsockname()[:2]
                out.append(f"http://{host}:{port}")
        return out

    def _load(self) -> None:
        try:
            self.service.load()
            log.info("ready: serving %s on %s", ", ".join(self.service.registry.names()), " ".join(self.addresses()))
        except Exception:
            log.exception("warm-up failed; stopping")
            self.exit_code = 1
            self.stop()

    def stop(self) -> None:
        """Stop accepting; requests in flight are finished (up to ``drain_seconds``)."""
        self._stopping.set()

    def fail(self, exit_code: int = 1) -> None:
        """``stop``, the process to exit with ``exit_code`` (a part it cannot serve without has failed),
        unless an earlier failure set one."""
        if not self.exit_code:
            self.exit_code = exit_code
        self.stop()

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT (or a failed warm-up); returns the exit code."""
        def on_signal(signum: int, _frame: object) -> None:
            log.info("signal %s: stopping", signal.Signals(signum).name)
            self.stop()

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_signal)
            signal.signal(signal.SIGINT, on_signal)
        log.info("listening on %s (warming up)%s", " ".join(self.addresses()),
                 ", each connection on a thread of its own" if self.service.settings.connection_threads else "")
        unix_paths = [s.getsockname() for s in self.sockets if s.family == socket.AF_UNIX and self._unlink_unix]
        self._warmup.start()
        try:
            while not self._stopping.is_set():
                wasyncore.loop(timeout=0.2, map=self._map, count=1)
            if self._before_drain is not None:
                first = threading.Thread(target=self._before_drain, name="before-drain")
                first.start()
                while first.is_alive():
                    wasyncore.loop(timeout=0.05, map=self._map, count=1)
            if self._gate is not None:
                self._gate.closed()  # before the listeners go: others take the new connections
            for server in self._servers:
                # the listener alone: server.close() would also close the trigger that the worker
                # threads pull when a response is ready, and the requests in flight must be answered
                wasyncore.dispatcher.close(server)
            self._drain()
            for server in self._servers:
                server.trigger.close()
        finally:
            self._tasks.shutdown(timeout=TASKS_SHUTDOWN_S)
            for path in unix_paths:  # named before: a closed socket no longer knows its name
                try:
                    os.unlink(path)
                except OSError:
                    pass
        return self.exit_code

    def _drain(self) -> None:
        """Serve the open connections until none has a request in flight, then close them (those on
        threads of their own too: ``active_channels`` holds both kinds)."""
        deadline = time.monotonic() + self.drain_seconds

        def channels() -> list[Any]:  # the event loop's, and those on threads of their own
            return list(self._map.values()) + [ch for s in self._servers for ch in list(s.active_channels.values())
                                               if getattr(ch, "own_thread", False)]

        # a request is done once its response has left too: the worker pops it from ``requests``
        # as soon as the response is in the channel's out-buffers, before the event loop sends it
        while time.monotonic() < deadline and any(_in_flight(ch) for ch in channels()):
            wasyncore.loop(timeout=0.05, map=self._map, count=1)
        for channel in channels():
            getattr(channel, "stop", channel.close)()
        for channel in channels():  # a request a connection's thread had read is answered first
            if hasattr(channel, "join"):
                channel.join(max(0.0, deadline - time.monotonic()))
