#!/usr/bin/env python
"""The python3-accel entrypoint: the python3-http ``handle(event, context)`` contract behind waitress.

of-watchdog (``mode=http``) forwards every request to ``upstream_url`` (http://127.0.0.1:5000),
where this app calls ``function.handler.handle(event, context)``:

- ``event``: ``body`` (bytes), ``headers``, ``method``, ``query`` (a MultiDict), ``path``.
- ``context``: ``hostname``, ``call_id`` (the request's ``X-Call-Id``) and ``accel``, one
  ``accel.Client`` made once per process ($ACCEL_SHIM_URL) and shared by every invocation.
- the handler returns ``None`` (200, empty), a dict ``{"statusCode", "body", "headers"}`` (a
  dict or list body is sent as JSON) or anything Flask can make a response of.

Errors are JSON, never HTML: an ``accel.AccelError`` keeps its status (400 for InvalidInput, 413,
503 when the shim is unreachable, ...), any other exception is a 500. Each carries the call id.
The call id is sent to the shim with every ``context.accel`` call, so that one call can be
followed through both logs. SIGTERM (or SIGINT) stops accepting, finishes the requests in
flight, then exits.

The port is ``$http_port`` when set (for local runs, as in OpenFaaS's other templates), else that
of ``$upstream_url``, else 5000. ``$PORT`` is not read: Knative sets it for the watchdog's port.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import uuid
from types import ModuleType
from typing import Any, Mapping, Protocol
from urllib.parse import urlsplit

from flask import Flask, Response, g, jsonify, make_response, request
from werkzeug.exceptions import HTTPException

import accel

log = logging.getLogger("function")

CALL_ID = "X-Call-Id"
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
DEFAULT_PORT = 5000
DRAIN_SECONDS = 30.0


class Handler(Protocol):
    def handle(self, event: "Event", context: "Context") -> Any: ...


class Event:
    """The request as the handler sees it."""

    def __init__(self) -> None:
        self.body: bytes = request.get_data()
        self.headers = request.headers
        self.method: str = request.method
        self.query = request.args
        self.path: str = request.path


class Context:
    """Per invocation: the shared accel client, the call id, the host name."""

    def __init__(self, client: accel.Client, call_id: str) -> None:
        self.accel = client
        self.call_id = call_id
        self.hostname = os.environ.get("HOSTNAME", "localhost")


def create_app(handler: Handler | ModuleType, client: accel.Client) -> Flask:
    """The Flask app that serves ``handler.handle`` with ``client`` as ``context.accel``."""
    app = Flask("function")

    @app.route("/", defaults={"path": ""}, methods=METHODS)
    @app.route("/<path:path>", methods=METHODS)
    def call_handler(path: str) -> Response:
        call_id = _call_id()
        with client.headers({CALL_ID: call_id}):
            result = handler.handle(Event(), Context(client, call_id))
        response = format_response(result)
        response.headers.setdefault(CALL_ID, call_id)
        return response

    @app.errorhandler(Exception)
    def on_error(exc: Exception) -> Response:
        call_id = _call_id()
        if isinstance(exc, HTTPException):
            status, message = exc.code or 500, exc.description or exc.name
        elif isinstance(exc, accel.AccelError):
            status, message = exc.status, exc.message
            log.warning("call %s: %s %s", call_id, type(exc).__name__, exc.message)
        else:
            status, message = 500, f"{type(exc).__name__}: {exc}"
            log.error("call %s: the handler raised", call_id, exc_info=exc)
        response = jsonify(error=message, call_id=call_id)
        response.status_code = status
        response.headers[CALL_ID] = call_id
        return response

    return app


def _call_id() -> str:
    """The request's X-Call-Id (the gateway sets one), or a new one, the same all through the request."""
    if "call_id" not in g:
        g.call_id = request.headers.get(CALL_ID) or str(uuid.uuid4())
    return g.call_id


def format_response(result: Any) -> Response:
    """A Flask response from what ``handle`` returned (see the module docstring)."""
    if result is None:
        return make_response("", 200)
    if not isinstance(result, dict):
        return make_response(result)
    body = result.get("body")
    if isinstance(body, (dict, list)):
        response = jsonify(body)
    elif isinstance(body, (bytes, bytearray, memoryview)):
        response = make_response(bytes(body))
    else:
        response = make_response("" if body is None else str(body))
    response.status_code = int(result.get("statusCode", 200))
    headers = result.get("headers") or {}
    for key, value in (headers.items() if isinstance(headers, dict) else headers):
        response.headers[key] = str(value)
    return response


def listen_port(environ: Mapping[str, str] = os.environ) -> int:
    """``$http_port``, else the port of ``$upstream_url``, else 5000."""
    if environ.get("http_port"):
        return int(environ["http_port"])
    return urlsplit(environ.get("upstream_url", "")).port or DEFAULT_PORT


def serve(app: Flask, host: str, port: int, threads: int = 8, drain_seconds: float = DRAIN_SECONDS) -> None:
    """Serve ``app`` until SIGTERM/SIGINT, then finish the requests in flight and return."""
    from waitress import wasyncore
    from waitress.server import create_server

    server = create_server(app, host=host, port=port, threads=threads, ident="python3-accel")
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("%s: draining", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("listening on http://%s:%d", host, port)
    channels = server._map  # waitress keeps the listener and its connections in one socket map
    while not stopping.is_set():
        wasyncore.loop(timeout=0.2, map=channels, count=1)
    # close the listener alone: server.close() would also close the trigger that worker threads
    # pull when a response is ready, and the requests in flight must still be answered
    wasyncore.dispatcher.close(server)
    deadline = time.monotonic() + drain_seconds
    while time.monotonic() < deadline and any(
            getattr(ch, "requests", None) or getattr(ch, "total_outbufs_len", 0) for ch in list(channels.values())):
        wasyncore.loop(timeout=0.05, map=channels, count=1)
    server.task_dispatcher.shutdown()
    wasyncore.close_all(channels)


def main() -> int:
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO").upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from function import handler

    client = accel.Client()
    log.info("accel shim: %s", client.url)
    serve(create_app(handler, client), "127.0.0.1", listen_port())
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
