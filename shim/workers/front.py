"""A request worker: a process of its own that serves the shim's public sockets.

It answers ``POST /v2/models/{op}/infer`` itself: HTTP, authentication and admission, decoding,
validation, the CPU half of the op (image decoding, top-k), encoding, with the device half one
link call to the device process. Every other request (health, metadata, statistics, metrics,
shared memory, KaaS, and infer requests that use shared memory or a compressed body) goes as it
is over the link to the device process's app, which keeps the state those need in one place.
Run as ``python -m shim.workers`` with its ``WorkerConfig`` pickled on stdin.
"""
from __future__ import annotations

import logging
import os
import pickle
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from flask import Flask, request

from accel.codec import HEADER_LENGTH, read_header_length
from accel.errors import InvalidInput
from accel.shm import REGISTER_HEADER

from ..batching import BatchingFactory
from ..config import Settings
from ..dispatch import Dispatcher
from ..faults import DeviceLost
from ..metrics import Metrics
from ..registry import Registry
from ..server import create_app
from ..server.guard import install_guard
from ..service import Service, build_guard, build_ops
from ..tenant_metrics import RELAYED, RelayedTenantMetrics, TenantEvent, TenantMetrics
from .arena import Arena
from .balance import ConnectionBoard, WorkerGate
from .link import LinkClient, LinkClosed
from .remote import RemoteBackend

log = logging.getLogger(__name__)

# a worker's batches of one model on their way to the device process at once: a request decoded while
# one is out goes in the next, without waiting for it to come back (on the H200, 4 carried 8-20% more
# images per second at 32 clients than 1 in 4 of 5 pairs: bench/results/NOTES.md)
WORKER_CALLS_IN_FLIGHT = 4
_HOP_RESPONSE = {"connection", "keep-alive", "transfer-encoding", "content-length", "server", "date"}
_SHM_MARK = b'"shared_memory_region"'
_FORWARD_FAILED = "accelshim.forward_failed"  # the environ key of a forward's error, for the app to answer
_REGISTER_KEY = "HTTP_" + REGISTER_HEADER.upper().replace("-", "_")


@dataclass
class WorkerConfig:
    """What a worker is started with."""

    settings: Settings
    link_address: str
    authkey: bytes
    fds: list[int]              # the public listening sockets, inherited
    backend_name: str
    backend_description: dict[str, object]
    board_fd: int | None = None  # the ConnectionBoard's memory, inherited (None: accept whenever woken)


class LinkProxy:
    """Forwards a request as it is to the device process's app, over the link: the device runs it
    through its WSGI app directly, with no second HTTP pass (parsing, a socket and its threads)."""

    def __init__(self, link: LinkClient) -> None:
        self._link = link

    def forward(self, environ: dict[str, Any]) -> tuple[str, list[tuple[str, str]], bytes]:
        """The device's answer to the request of ``environ``: WSGI status line, headers, body.

        Raises:
            LinkClosed: the device process cannot be reached (503).
        """
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        fields = {key: value for key, value in environ.items()
                  if isinstance(value, (str, int, float)) and not key.startswith(("wsgi.", "waitress."))}
        status, headers, data = self._link.call("http", fields, pickle.PickleBuffer(body))
        data = bytes(data)
        kept = [(k, v) for k, v in headers if k.lower() not in _HOP_RESPONSE]
        if environ.get("REQUEST_METHOD") == "HEAD":  # no body; the length a GET would have
            kept += [(k, v) for k, v in headers if k.lower() == "content-length"]
        else:
            kept.append(("Content-Length", str(len(data))))
        return f"{status} {_reason(status)}", kept, data


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def served_here(environ: dict[str, Any]) -> bool:
    """Whether a worker answers this request itself: an infer request with a plain body that uses no
    shared memory and registers none (a false alarm, the mark inside a tensor, only costs a hop)."""
    if environ.get("REQUEST_METHOD") != "POST" or not environ.get("PATH_INFO", "").endswith("/infer"):
        return False
    if environ.get("HTTP_CONTENT_ENCODING", "identity").strip().lower() not in ("", "identity"):
        return False
    if _REGISTER_KEY in environ:  # registers a region: the device process maps it
        return False
    stream = environ["wsgi.input"]
    length = int(environ.get("CONTENT_LENGTH") or 0)
    try:
        declared = read_header_length(environ.get("HTTP_" + HEADER_LENGTH.upper().replace("-", "_")))
    except InvalidInput:  # the app answers it
        declared = None
    peek = length if declared is None else min(length, declared)
    if not peek:
        return True
    if not stream.seekable():
        return False
    start = stream.tell()
    head = stream.read(peek)
    stream.seek(start)
    return _SHM_MARK not in head


def install_proxy(app: Flask, proxy: LinkProxy) -> None:
    """Send what the worker does not answer itself to the device process as it comes, before Flask
    sees it (the device process's app routes, authenticates and admits those: no request context,
    routing or guard here). A forward that fails (the device process is gone) is answered by the
    worker's app, which maps the error as it maps any other, after the hooks installed before
    this (the guard: the answer counts under the caller's tenant)."""
    inner = app.wsgi_app

    def forwarding(environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("PATH_INFO") == "/v2/health/live" or served_here(environ):
            return inner(environ, start_response)
        try:
            status, headers, data = proxy.forward(environ)
        except Exception as exc:  # noqa: BLE001 - raised again inside the app, which answers it
            environ[_FORWARD_FAILED] = exc
            return inner(environ, start_response)
        start_response(status, headers)
        return [data]

    @app.before_request
    def forward_failed() -> None:
        exc = request.environ.pop(_FORWARD_FAILED, None)
        if exc is not None:
            raise exc

    app.wsgi_app = forwarding  # type: ignore[method-assign]


class ReportingDispatcher(Dispatcher):
    """Counts each finished request in the device process (its /metrics and statistics are the shim's),
    with the tenant metrics' changes of the worker's guard (``relay``).

    Reports go in bundles, at most every ``interval`` seconds: one link message per request would
    cost the device process about as much as the device call itself once requests are batched here.
    """

    def __init__(self, registry: Registry, metrics: Metrics, link: LinkClient, interval: float = 0.02) -> None:
        super().__init__(registry, metrics)
        self._link = link
        self._interval = interval
        self._pending: list[tuple[str, int, int, int, int]] = []
        self._tenant_counts: dict[tuple[str, tuple[str, ...]], float] = {}  # summed until the next bundle
        self._tenant_observed: list[TenantEvent] = []
        self._lock = threading.Lock()
        self._flushing = threading.Lock()  # one bundle on its way at a time
        self._wake = threading.Event()
        threading.Thread(target=self._flush_loop, name="report-flush", daemon=True).start()

    def record(self, op_name: str, status: int, elapsed_ns: int, items: int = 0, compute_ns: int = 0) -> None:
        with self._lock:
            self._pending.append((op_name, status, elapsed_ns, items, compute_ns))
        self._wake.set()

    def relay(self, event: TenantEvent) -> None:
        """A tenant metric's change (``RelayedTenantMetrics``), for the device process's /metrics:
        a counter's increments go summed, one event per counter and bundle; observations each."""
        name, values, amount = event
        with self._lock:
            if RELAYED.get(name) == "inc":
                key = (name, values)
                self._tenant_counts[key] = self._tenant_counts.get(key, 0.0) + amount
            else:
                self._tenant_observed.append(event)
        self._wake.set()

    def flush(self) -> bool:
        """Send the reports not sent yet (when this returns, every report recorded before is sent);
        False once the link is closed."""
        with self._flushing:
            with self._lock:
                bundle, self._pending = self._pending, []
                events = [(name, values, amount) for (name, values), amount in self._tenant_counts.items()]
                events += self._tenant_observed
                self._tenant_counts, self._tenant_observed = {}, []
            if bundle or events:
                try:
                    self._link.notify("records", bundle, events)
                except LinkClosed:
                    return False  # the worker is stopping with its device process
        return True

    def _flush_loop(self) -> None:
        while True:
            self._wake.wait()
            time.sleep(self._interval)  # let the reports of the requests finishing now join this bundle
            self._wake.clear()
            if not self.flush():
                return


class FrontService(Service):
    """A worker's shim: its ops on the RemoteBackend; tells the device process once it is warm."""

    link: LinkClient | None = None

    def load(self) -> None:
        super().load()
        assert self.link is not None
        self.link.notify("worker_ready", os.getpid())


def build_front(config: WorkerConfig) -> FrontService:
    """A worker's service: the device process's ops seen through the link, and the proxy."""
    settings = config.settings
    metrics = Metrics()
    dispatchers: list[ReportingDispatcher] = []  # the one made below: the guard's tenant metrics go there
    relayed = RelayedTenantMetrics(TenantMetrics(metrics.registry),
                                   lambda event: dispatchers[0].relay(event) if dispatchers else None)
    guard = build_guard(settings, metrics, relayed)

    def lost() -> None:
        guard.monitor.trip(DeviceLost("the shim's device process exited"))

    link = LinkClient(config.link_address, config.authkey, on_close=lost, arena=Arena.or_none(pinned=True))
    # forwarded requests get a connection of their own: a big KaaS buffer crossing it does not hold
    # up the device calls of the requests this worker serves itself behind it (on the device, one thread
    # reads every link as its bytes come: only the unpickling of a message past the arena runs there)
    forwarded = LinkClient(config.link_address, config.authkey, on_close=lost, arena=Arena.or_none())
    backend = RemoteBackend(link, config.backend_name, config.backend_description)
    # the worker batches too: the requests it decodes at once go to the device in one call, where the
    # device's batchers mix the worker batches of every worker (fewer messages and hand-offs there);
    # several such calls may be on their way at once, whatever the model's instance_count
    registry = Registry(build_ops(settings, backend, BatchingFactory(concurrency=WORKER_CALLS_IN_FLIGHT)
                                  if settings.batching else None))
    dispatcher = ReportingDispatcher(registry, metrics, link)
    dispatchers.append(dispatcher)
    app = create_app(settings, dispatcher, metrics)
    install_guard(app, guard)  # first: a forward that failed is answered for the caller's tenant
    install_proxy(app, LinkProxy(forwarded))
    service = FrontService(settings, backend, registry, dispatcher, metrics, app, guard)
    service.link = link
    return service


def main() -> int:
    """A worker process: its config from stdin, its slot (0..workers-1) as its argument, then serve
    the inherited sockets until SIGTERM."""
    config: WorkerConfig = pickle.load(sys.stdin.buffer)
    slot = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    logging.basicConfig(level=config.settings.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s worker-{os.getpid()} %(name)s: %(message)s")
    if config.settings.gil_switch_us:
        sys.setswitchinterval(config.settings.gil_switch_us / 1e6)
    from ..server.serving import Server  # noqa: PLC0415

    sockets = [socket.socket(fileno=fd) for fd in config.fds]
    front = build_front(config)
    gate = None
    if config.board_fd is not None:
        gate = WorkerGate(ConnectionBoard(config.settings.workers, config.board_fd), slot, front.registry.is_ready)
    code = Server(front, sockets, unlink_unix=False, accept_gate=gate).run()
    if isinstance(front.dispatcher, ReportingDispatcher):
        front.dispatcher.flush()  # the requests drained last are counted too
    return code

