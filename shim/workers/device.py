"""What the device process answers its request workers: the device half of each op.

Calls wait until the device process has warmed up. A DeviceLost from any call trips the device
process's fault monitor (it stops, and its workers with it), as it would for its own requests.
Once warm, ``logits`` and ``run_model_later`` calls go straight into the model's batcher from the
link's reader thread and are answered as their batch ends (``Deferred``): no thread waits per call.
"""
from __future__ import annotations

import io
import pickle
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Sequence

from ..faults import DeviceLost
from ..ops import ClassifyOp
from ..ops.model import ModelOp
from ..service import Service
from ..tenant_metrics import TenantEvent, apply
from .link import Deferred, Handler

LOAD_TIMEOUT_S = 3600.0


class DeviceEndpoint:
    """The handlers of the link for one assembled ``service``; ``workers`` is how many request
    workers must report ready before the shim answers ready."""

    def __init__(self, service: Service, workers: int) -> None:
        self._service = service
        self._registry = service.registry
        self._workers = workers
        self._ready_workers: set[int] = set()
        self._lock = threading.Lock()
        self._registry.add_gate(self.workers_ready)
        ops = [self._registry.lookup(name) for name in self._registry.names()]
        self._classify_ops = {op.config.name: op for op in ops if isinstance(op, ClassifyOp)}
        # calls that come before the warm-up ends wait for it here (threads made only when needed)
        self._early = ThreadPoolExecutor(max_workers=8, thread_name_prefix="device-early")

    def workers_ready(self) -> bool:
        with self._lock:
            return len(self._ready_workers) >= self._workers

    def worker_gone(self, pid: int) -> None:
        """A worker exited: the shim is not ready again until its replacement reports."""
        with self._lock:
            self._ready_workers.discard(pid)

    def handlers(self) -> dict[str, Handler | Deferred]:
        device_calls: dict[str, Callable[..., Any]] = {
            "model_specs": self._model_specs,
            "pipeline_device": lambda model: self._classify(model).backend,
            "pipeline_decodes_jpeg": lambda model: self._classify(model).decodes_jpeg,
            "logits": lambda model, items: self._classify(model).logits(items),
            "run_model": lambda name, feeds: self._registry.get(name).run(feeds, {}),
            "gemm": self._service.backend.gemm,
        }
        handlers: dict[str, Handler | Deferred] = {name: self._guarded(fn) for name, fn in device_calls.items()}
        if self._classify_ops and all(op.batches for op in self._classify_ops.values()):
            early_logits = handlers["logits"]  # without batching, each call runs on a pool thread
            handlers["logits"] = Deferred(lambda model, items: self._logits_later(early_logits, model, items))
        run_model = handlers["run_model"]  # a call the model does not batch: on a thread of its own
        handlers["run_model_later"] = Deferred(lambda name, feeds: self._run_model_later(run_model, name, feeds))
        handlers["http"] = self._http
        handlers["records"] = self._records
        handlers["worker_ready"] = self._worker_ready
        return handlers

    def _guarded(self, fn: Callable[..., Any]) -> Handler:
        """``fn`` once the device is warm, refused on a lost device, counted as in flight."""
        def call(*args: Any) -> Any:
            self._registry.loaded.wait(LOAD_TIMEOUT_S)
            self._begin()
            try:
                result = fn(*args)
            except BaseException as exc:
                self._end(exc)
                raise
            self._end(None)
            return result

        return call

    def _begin(self) -> None:
        """A device call starts: refused on a lost device, then counted as in flight."""
        if self._service.guard is not None:
            self._service.guard.monitor.check()
        self._service.metrics.inflight.inc()

    def _end(self, exc: BaseException | None) -> None:
        """A device call ended (raising ``exc``): no longer in flight; a lost device trips the
        fault monitor."""
        self._service.metrics.inflight.dec()
        if isinstance(exc, DeviceLost) and self._service.guard is not None:
            self._service.guard.monitor.trip(exc)

    def _logits_later(self, early: Handler, model: str, items: list[Any]) -> Future[Any]:
        """classify's device half for a worker, answered when its batch ends (``early`` on a thread
        of its own while the device warms up: the link's reader must not wait)."""
        if not self._registry.loaded.is_set():
            return self._early.submit(early, model, items)
        future = self._started(lambda: self._classify(model).logits_later(items))
        assert future is not None
        return future

    def _run_model_later(self, alone: Handler, name: str, feeds: dict[str, Any]) -> Future[Any]:
        """A raw model's run for a worker, answered when its batch ends; ``alone`` (on a thread of
        its own) while the device warms up, or where the model does not batch the request."""
        op = self._registry.get(name) if self._registry.loaded.is_set() else None
        future = self._started(lambda: op.run_later(feeds)) if isinstance(op, ModelOp) else None
        return future if future is not None else self._early.submit(alone, name, feeds)

    def _started(self, start: Callable[[], Future[Any] | None]) -> Future[Any] | None:
        """``start()``'s Future, counted as a device call in flight until it is done; None where
        ``start`` started nothing."""
        self._begin()
        try:
            future = start()
        except BaseException as exc:
            self._end(exc)
            raise
        if future is None:
            self._end(None)
            return None
        future.add_done_callback(lambda done: self._end(done.exception()))
        return future

    def _http(self, fields: dict[str, Any], body: bytes | bytearray | memoryview
              ) -> tuple[int, list[tuple[str, str]], Any]:
        """A request a worker forwards as it is (``LinkProxy``): through this process's app, as its
        own server would run it (the app authenticates, admits and answers errors itself)."""
        environ = {**fields, "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body),
                   "wsgi.errors": sys.stderr, "wsgi.multithread": True, "wsgi.multiprocess": False,
                   "wsgi.run_once": False, "wsgi.input_terminated": True}
        started: list[Any] = []

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
            started[:] = [int(status.split(" ", 1)[0]), headers]

        chunks = self._service.app(environ, start_response)
        try:
            data = b"".join(chunks)
        finally:
            getattr(chunks, "close", lambda: None)()
        return started[0], started[1], pickle.PickleBuffer(data)

    def _records(self, bundle: list[tuple[str, int, int, int, int]], tenant_events: Sequence[TenantEvent] = ()) -> None:
        """A worker's reports of the requests it finished and its tenant metrics' changes
        (``ReportingDispatcher``)."""
        for report in bundle:
            self._service.dispatcher.record(*report)
        if self._service.guard is not None:
            apply(self._service.guard.metrics, tenant_events)

    def _worker_ready(self, pid: int) -> None:
        with self._lock:
            self._ready_workers.add(pid)

    def _model_specs(self, name: str) -> tuple[list[Any], list[Any], str]:
        op = self._registry.lookup(name)
        return list(op.inputs), list(op.outputs), op.backend

    def _classify(self, model: str) -> ClassifyOp:
        op = self._classify_ops.get(model)
        if op is None:
            raise LookupError(f"no classify op serves model {model!r} in the device process")
        return op
