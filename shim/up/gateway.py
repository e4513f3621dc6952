"""A local stand-in for the OpenFaaS gateway, for the routes that invoke and list functions.

- ``/function/<name>[/<path>]`` and ``/function/<name>.<namespace>[/<path>]``, any method: proxied
  to the function with its path, query, headers and body; ``X-Call-Id`` (kept if the caller sent
  one) and ``X-Start-Time`` (Unix nanoseconds) are added, and the answer carries ``X-Call-Id``,
  ``X-Start-Time`` and ``X-Duration-Seconds``.
- ``GET /system/functions[?namespace=]`` and ``GET /system/function/<name>``: OpenFaaS's
  FunctionStatus JSON (name, image, namespace, replicas, availableReplicas, invocationCount,
  envProcess, labels, annotations, ...).
- ``GET /healthz``: ``OK`` while the gateway runs.
"""
from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Mapping

import requests
from flask import Flask, Response, jsonify, request
from waitress import wasyncore
from waitress.server import create_server

from .stack import Function, Resources

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
# RFC 9110 hop-by-hop headers, plus those the proxy recomputes
_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
        "transfer-encoding", "upgrade", "host", "content-length"}


@dataclass
class Route:
    """A function behind the gateway: where it listens, whether it is up, how often it was called."""

    function: Function
    url: str
    ready: threading.Event
    created_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    invocations: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def invoked(self) -> None:
        with self._lock:
            self.invocations += 1

    def status(self) -> dict[str, Any]:
        """The function as OpenFaaS's ``GET /system/functions`` lists it."""
        fn = self.function
        return {
            "name": fn.name, "image": fn.image, "namespace": fn.namespace, "envProcess": fn.env_process,
            "envVars": fn.environment, "labels": fn.labels, "annotations": fn.annotations, "secrets": fn.secrets,
            "limits": _resources(fn.limits), "requests": _resources(fn.requests), "constraints": [],
            "readOnlyRootFilesystem": False, "replicas": 1, "availableReplicas": int(self.ready.is_set()),
            "invocationCount": self.invocations,
            "createdAt": self.created_at.isoformat(timespec="seconds").replace("+00:00", "Z"),
        }


class _Passthrough(Response):
    default_mimetype = None  # no Content-Type unless the function sent one


def create_gateway(routes: Mapping[str, Route], *, timeout: float = 60.0, wait_ready: float = 10.0,
                   log: Callable[[str], None] | None = None) -> Flask:
    """The gateway app for ``routes`` (function name -> Route).

    Args:
        timeout: seconds a function may take to answer (504 after).
        wait_ready: seconds a call waits for a function that is (re)starting (503 after).
        log: gets one line per invocation.
    """
    app = Flask("accelshim-gateway")
    sessions = threading.local()  # requests.Session is not thread-safe: one per worker thread

    @app.route("/function/<path:target>", methods=METHODS)
    def invoke(target: str) -> Response:
        name_ns, slash, rest = _raw_path()[len("/function/"):].partition("/")
        name, _, namespace = name_ns.partition(".")
        route = routes.get(name)
        if route is None or (namespace and namespace != route.function.namespace):
            return _text(f"error finding function {name_ns}: no such function in the stack", 404)
        if not route.ready.wait(wait_ready):
            return _text(f"function {name} is not ready (it is starting or restarting)", 503)
        call_id = request.headers.get("X-Call-Id") or str(uuid.uuid4())
        start_ns, started = time.time_ns(), time.monotonic()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        headers.update({"X-Call-Id": call_id, "X-Start-Time": str(start_ns),
                        "X-Forwarded-For": request.remote_addr or "", "X-Forwarded-Host": request.host})
        query = request.query_string.decode("latin-1")
        url = f"{route.url}/{rest}" + (f"?{query}" if query else "")
        if not hasattr(sessions, "session"):
            sessions.session = requests.Session()
        try:
            upstream = sessions.session.request(request.method, url, data=request.get_data(), headers=headers,
                                                stream=True, allow_redirects=False, timeout=(5.0, timeout))
            body = upstream.raw.read(decode_content=False)
        except requests.Timeout:
            return _text(f"function {name} did not answer in {timeout:.0f}s", 504)
        except requests.ConnectionError as exc:
            return _text(f"cannot reach function {name}: {exc}", 502)
        route.invoked()
        duration = time.monotonic() - started
        response = _Passthrough(body, status=upstream.status_code,
                                headers=[(k, v) for k, v in upstream.raw.headers.items() if k.lower() not in _HOP])
        response.headers.update({"X-Call-Id": call_id, "X-Start-Time": str(start_ns),
                                 "X-Duration-Seconds": f"{duration:.6f}"})
        if log is not None:
            log(f"{request.method} /function/{name_ns}{slash}{rest} {upstream.status_code} {duration:.3f}s {call_id}")
        return response

    @app.get("/system/functions")
    def list_functions() -> Response:
        namespace = request.args.get("namespace")
        return jsonify([r.status() for r in routes.values() if namespace in (None, "", r.function.namespace)])

    @app.get("/system/function/<name>")
    def describe(name: str) -> Response:
        route = routes.get(name)
        if route is None or request.args.get("namespace", route.function.namespace) != route.function.namespace:
            return _text(f"error finding function {name}", 404)
        return jsonify(route.status())

    @app.get("/healthz")
    def healthz() -> Response:
        return _text("OK", 200)

    @app.errorhandler(404)
    @app.errorhandler(405)
    def not_routed(exc: Any) -> Response:
        return _text(f"{exc.code} {exc.name}: {request.method} {request.path}", exc.code)

    return app


def _raw_path() -> str:
    """The path as sent (percent-escapes kept), without the query."""
    raw = request.environ.get("REQUEST_URI") or request.environ.get("RAW_URI")
    return raw.split("?", 1)[0] if raw else request.path


def _text(message: str, status: int) -> Response:
    return Response(message + "\n", status=status, mimetype="text/plain")


def _resources(resources: Resources | None) -> dict[str, str] | None:
    if resources is None:
        return None
    return {k: v for k, v in (("memory", resources.memory), ("cpu", resources.cpu)) if v is not None}


class GatewayServer:
    """The gateway under waitress; binds at construction so that a taken port fails early."""

    def __init__(self, app: Flask, host: str, port: int, threads: int = 16) -> None:
        self._server = create_server(app, host=host, port=port, threads=threads, ident="accelshim-gateway",
                                     clear_untrusted_proxy_headers=True)
        self.host, self.port = host, int(self._server.effective_port)  # type: ignore[union-attr]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def serve_until(self, stop: threading.Event, drain_seconds: float = 10.0) -> None:
        """Serve in this thread until ``stop`` is set, then answer the calls in flight and close."""
        channels = self._server._map  # type: ignore[union-attr]
        while not stop.is_set():
            wasyncore.loop(timeout=0.2, map=channels, count=1)
        self.close_listener()
        deadline = time.monotonic() + drain_seconds
        while time.monotonic() < deadline and any(
                getattr(ch, "requests", None) or getattr(ch, "total_outbufs_len", 0) for ch in list(channels.values())):
            wasyncore.loop(timeout=0.05, map=channels, count=1)
        self.close()

    def close_listener(self) -> None:
        # the listener alone: waitress's close() also closes the trigger that answers in flight need
        if self._server.accepting:  # type: ignore[union-attr]
            wasyncore.dispatcher.close(self._server)  # type: ignore[arg-type]

    def close(self) -> None:
        """Close the listener, the connections and the worker threads (idempotent)."""
        self.close_listener()
        self._server.task_dispatcher.shutdown()  # type: ignore[union-attr]
        wasyncore.close_all(self._server._map)  # type: ignore[union-attr]
