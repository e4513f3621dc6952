"""The shim's waitress: JSON error pages, requests stamped on arrival, the early 401 for a body sent
without a valid token, ``Connection: close`` once stopping, and servers on AF_VSOCK sockets."""
from __future__ import annotations

import json
import re
import socket
import threading
import time

from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import BaseWSGIServer, create_server
from waitress.task import ErrorTask, ThreadedTaskDispatcher, WSGITask
from waitress.utilities import Error as WaitressError

from accel.errors import Unauthorized

from ..auth import TokenStore
from .guard import RECEIVED_KEY

_HEADER_LINE = re.compile(r'(header line) ".*"', re.DOTALL)  # waitress quotes a malformed header line
_UNQUOTED = r"\1 (not repeated: it may hold a credential)"


class _JsonErrorTask(ErrorTask):
    """waitress's own errors (a body over the limit, malformed HTTP) as ``{"error": ...}`` JSON,
    like every other error of the shim, instead of waitress's text/plain page."""

    def execute(self) -> None:
        error = self.request.error
        limit = self.channel.adj.max_request_body_size - 1
        message = {413: f"the request body is over the limit of {limit} bytes",
                   401: error.body}.get(error.code, f"{error.reason}: {_HEADER_LINE.sub(_UNQUOTED, error.body)}")
        body = json.dumps({"error": message}).encode("utf-8")
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        if error.code == 401:
            self.response_headers.append(("WWW-Authenticate", 'Bearer realm="accelshim"'))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


EARLY_AUTH_BYTES = 64 * 1024  # bodies over this are refused unread when their token is not valid


class _Unauthorized(WaitressError):
    code = 401
    reason = "Unauthorized"


class _StampedParser(HTTPRequestParser):
    """Notes when the request had arrived whole, so that a deadline counts the time spent queued in
    waitress too, not only from when a worker thread picks the request up; and, on a shim with
    tokens, refuses a request with a body but no valid token as soon as its headers are in, before
    waitress buffers a body of up to ``--max-body-bytes`` for it."""

    received_at: float | None = None
    tokens: TokenStore | None = None  # set on a subclass per server
    _vetted = False

    def received(self, data: bytes) -> int:
        consumed = super().received(data)
        if self.tokens is not None and not self._vetted and self.headers_finished and not self.error:
            self._vetted = True
            if self.content_length > EARLY_AUTH_BYTES or self.chunked:
                try:
                    self.tokens.authenticate(self.headers.get("AUTHORIZATION"))
                except Unauthorized as exc:
                    self.error, self.completed = _Unauthorized(exc.message), True
        if self.completed and self.received_at is None:
            self.received_at = time.monotonic()
        if self.error is not None:  # refused (413, 431, the early 401): no 100 Continue to send its body
            self.expect_continue = False
        return consumed


class _StampedTask(WSGITask):
    """Stamps the request's arrival into its environ; once the server is ``stopping``, its response
    says ``Connection: close`` and the connection closes after it: a client that keeps its connection
    busy hears that it ends, rather than being served until the drain's deadline and then cut."""

    stopping: threading.Event | None = None  # set on a subclass per server

    def get_environment(self) -> dict:
        environ = super().get_environment()
        environ[RECEIVED_KEY] = getattr(self.request, "received_at", None)
        return environ

    def build_response_header(self) -> bytes:
        if self.stopping is not None and self.stopping.is_set():
            self.request.headers["CONNECTION"] = "close"  # an HTTP/1.0 keep-alive is not kept either
            self.set_close_on_finish()
        return super().build_response_header()


class _JsonErrorChannel(HTTPChannel):
    error_task_class = _JsonErrorTask
    parser_class = _StampedParser
    task_class = _StampedTask


def channel_class(tokens: TokenStore | None, stopping: threading.Event) -> type[HTTPChannel]:
    """The channel class of one server: its parser refuses early with ``tokens`` (``None``: a shim
    without tokens), its task closes connections once ``stopping`` is set."""
    parser = type("_Parser", (_StampedParser,), {"tokens": tokens})
    task = type("_Task", (_StampedTask,), {"stopping": stopping})
    return type("_Channel", (_JsonErrorChannel,), {"parser_class": parser, "task_class": task})


class _VsockWSGIServer(BaseWSGIServer):
    """waitress on an already bound AF_VSOCK socket (waitress itself takes only TCP and unix sockets)."""

    def getsockname(self) -> tuple[str, int]:
        return "vsock", self.socket.getsockname()[1]

    def set_socket_options(self, conn: socket.socket) -> None:
        pass  # waitress's defaults are TCP options (TCP_NODELAY), which AF_VSOCK refuses

    def fix_addr(self, addr: tuple[int, int]) -> tuple[str, int]:
        return f"vsock:{addr[0]}", addr[1]  # REMOTE_ADDR: the peer's CID


def make_server(app: object, sock: socket.socket, *, map: dict, dispatcher: ThreadedTaskDispatcher,
                **adjustments: object) -> BaseWSGIServer:
    """One waitress server on ``sock`` (TCP, unix or vsock), sharing ``map`` and ``dispatcher``."""
    if sock.family == getattr(socket, "AF_VSOCK", None):
        sockinfo = (sock.family, sock.type, sock.proto, sock.getsockname())
        return _VsockWSGIServer(app, map=map, _sock=sock, dispatcher=dispatcher, adj=Adjustments(**adjustments),
                                bind_socket=False, sockinfo=sockinfo)
    return create_server(app, map=map, _dispatcher=dispatcher, sockets=[sock], **adjustments)
