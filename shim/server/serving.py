"""Run the app under waitress on a TCP port and/or a unix socket; warm up in the background."""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import stat
import threading
import time
from pathlib import Path

from waitress import wasyncore
from waitress.channel import HTTPChannel
from waitress.server import create_server
from waitress.task import ErrorTask, ThreadedTaskDispatcher

from ..service import Service

log = logging.getLogger(__name__)


def bind_sockets(host: str | None, port: int, unix_path: str | None) -> list[socket.socket]:
    """Bound, not yet listening, sockets: TCP (``port`` 0 picks a free one) and the unix socket (0660)."""
    sockets = []
    if host is not None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        tcp = socket.socket(family, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind((host, port))
        sockets.append(tcp)
    if unix_path:
        path = Path(unix_path)
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise FileExistsError(f"{path} exists and is not a socket; refusing to replace it")
            path.unlink()
        path.parent.mkdir(parents=True, exist_ok=True)
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        unix.bind(str(path))
        os.chmod(path, 0o660)
        sockets.append(unix)
    return sockets


class _JsonErrorTask(ErrorTask):
    """waitress's own errors (a body over the limit, malformed HTTP) as ``{"error": ...}`` JSON,
    like every other error of the shim, instead of waitress's text/plain page."""

    def execute(self) -> None:
        error = self.request.error
        limit = self.channel.adj.max_request_body_size - 1
        message = (f"the request body is over the limit of {limit} bytes" if error.code == 413
                   else f"{error.reason}: {error.body}")
        body = json.dumps({"error": message}).encode("utf-8")
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class _JsonErrorChannel(HTTPChannel):
    error_task_class = _JsonErrorTask


class Server:
    """A shim being served: the waitress server plus the warm-up thread."""

    def __init__(self, service: Service, sockets: list[socket.socket]) -> None:
        settings = service.settings
        self.service = service
        self.sockets = sockets
        self.exit_code = 0
        self.drain_seconds = 30.0
        # waitress will not mix TCP and unix sockets in one server, so each socket gets its own
        # server, all on one socket map (one event loop) and one pool of worker threads.
        self._map: dict = {}
        self._tasks = ThreadedTaskDispatcher()
        self._tasks.set_thread_count(settings.threads)
        self._servers = [
            create_server(service.app, map=self._map, _dispatcher=self._tasks, sockets=[sock],
                          threads=settings.threads, ident="accelshim",
                          # waitress refuses a body of >= its limit; the shim's limit is inclusive
                          max_request_body_size=settings.max_body_bytes + 1, channel_timeout=120,
                          connection_limit=1000, clear_untrusted_proxy_headers=True,
                          # tensors are large: keep bodies in memory (waitress spills anything over
                          # 512 KiB to a temp file by default) and move them in big reads and writes
                          inbuf_overflow=settings.max_body_bytes + 65536, outbuf_overflow=1 << 30,
                          recv_bytes=1 << 18, send_bytes=1 << 18, outbuf_high_watermark=1 << 30)
            for sock in sockets
        ]
        for server in self._servers:
            server.channel_class = _JsonErrorChannel
        self._stopping = threading.Event()
        self._warmup = threading.Thread(target=self._load, name="warmup", daemon=True)

    def addresses(self) -> list[str]:
        out = []
        for s in self.sockets:
            if s.family == socket.AF_UNIX:
                out.append(f"unix://{s.getsockname()}")
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

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT (or a failed warm-up); returns the exit code."""
        def on_signal(signum: int, _frame: object) -> None:
            log.info("signal %s: stopping", signal.Signals(signum).name)
            self.stop()

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_signal)
            signal.signal(signal.SIGINT, on_signal)
        log.info("listening on %s (warming up)", " ".join(self.addresses()))
        self._warmup.start()
        try:
            while not self._stopping.is_set():
                wasyncore.loop(timeout=0.2, map=self._map, count=1)
            for server in self._servers:
                server.close()
            self._drain()
        finally:
            self._tasks.shutdown()
            for s in self.sockets:
                if s.family == socket.AF_UNIX:
                    try:
                        os.unlink(s.getsockname())
                    except OSError:
                        pass
        return self.exit_code

    def _drain(self) -> None:
        """Serve the open connections until none has a request in flight, then close them."""
        deadline = time.monotonic() + self.drain_seconds
        while time.monotonic() < deadline and any(
                getattr(ch, "requests", None) or getattr(ch, "current_task", None) for ch in list(self._map.values())):
            wasyncore.loop(timeout=0.05, map=self._map, count=1)
        for channel in list(self._map.values()):
            channel.close()
