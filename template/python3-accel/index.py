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
503 when the shim is unreachable, ...) except the shim's 401 and 403, which are about this function's
own token and so a 502 to its caller; any other exception is a 500. Each carries the call id.
The call id is sent to the shim with every ``context.accel`` call, so that one call can be
followed through both logs.

``GET /_/ready`` is answered here, never by the handler: 200 while serving, 503 once stopping. The
image sets of-watchdog's ``ready_path`` to it, so the watchdog's own ``/_/ready`` fails until waitress
listens. ``/_/`` is the watchdog's prefix: its ``/_/health`` and ``/_/ready`` never reached a handler.

The accel client's timeout is ``$ACCEL_TIMEOUT`` when set, else the watchdog's ``$exec_timeout`` less
a margin (10%, 0.5 to 5 s), so that a slow shim gets the client's JSON error before the watchdog's
bare 504; without ``exec_timeout`` (or with 0, "no limit") the client keeps its default.

Stopping: behind of-watchdog (``mode=http``), SIGTERM reaches this process as the watchdog starts
its own shutdown, but the watchdog goes on accepting requests for ``healthcheck_interval``
(default ``write_timeout``, default 10 s) and forwarding them here. So new requests are served for
that long (plus 0.5 s), then the listener closes, the requests in flight are finished, and the
process exits at most ``write_timeout`` + 1 s after SIGTERM: inside the pod's grace period where
the platform sets it to ``write_timeout`` + 2 s (faas-netes did; current CE sets none, so
Kubernetes' 30 s applies, and a drain that runs longer is cut there). Run alone (``accelshim up``, ``python index.py``), or on
SIGINT, it stops accepting at once and drains for up to 30 s. A second signal ends the grace early.

The port is ``$http_port`` when set (for local runs, as in OpenFaaS's other templates), else that
of ``$upstream_url``, else 5000. ``$PORT`` is not read: Knative sets it for the watchdog's port.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import signal
import sys
import threading
import time
import uuid
from types import ModuleType
from typing import Any, Mapping, NamedTuple, Protocol
from urllib.parse import urlsplit

from flask import Flask, Response, g, jsonify, make_response, request
from werkzeug.exceptions import HTTPException

import accel

log = logging.getLogger("function")

CALL_ID = "X-Call-Id"
REQUEST_TIMEOUT = "X-Timeout"  # of-watchdog: a request may lower exec_timeout for itself
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
DEFAULT_PORT = 5000
READY_PATH = "/_/ready"        # of-watchdog's ready_path (Dockerfile); never reaches the handler
DRAIN_SECONDS = 30.0           # without the watchdog: how long the requests in flight may take
WATCHDOG_TIMEOUT = 10.0        # of-watchdog's read/write/exec_timeout when unset or unparseable
LISTEN_MARGIN = 0.5            # accept this long past healthcheck_interval: the watchdog's last requests
EXIT_MARGIN = 1.0              # exit by write_timeout + this (a grace period of write_timeout + 2 s fits it)
EXEC_MARGIN = 0.1              # the client's timeout: exec_timeout less 10% of it,
EXEC_MARGIN_RANGE = (0.5, 5.0)  # but no less than 0.5 s and no more than 5 s


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


def create_app(handler: Handler | ModuleType, client: accel.Client,
               stopping: threading.Event | None = None, exec_timeout: float | None = None) -> Flask:
    """The Flask app that serves ``handler.handle`` with ``client`` as ``context.accel``.

    ``stopping`` (set by ``serve`` on SIGTERM) turns ``GET /_/ready`` to 503. ``exec_timeout``:
    of-watchdog's, when behind it; a request's ``X-Timeout`` that the watchdog takes (a Go
    duration up to exec_timeout) then ends its accel calls in time as well (``request_timeout``).
    """
    app = Flask("function")
    stopping = threading.Event() if stopping is None else stopping

    @app.route(READY_PATH, methods=METHODS)
    def ready() -> Response:
        # every method is routed here, so that no request for this path reaches the handler
        if request.method not in ("GET", "HEAD"):
            return _error(405, "method not allowed", _call_id())
        return make_response(("stopping\n", 503) if stopping.is_set() else ("ready\n", 200))

    @app.route("/", defaults={"path": ""}, methods=METHODS)
    @app.route("/<path:path>", methods=METHODS)
    def call_handler(path: str) -> Response:
        call_id = _call_id()
        budget = _request_budget(request.headers, exec_timeout)
        with client.headers({CALL_ID: call_id}), \
                (client.deadline(budget) if budget is not None else contextlib.nullcontext()):
            result = handler.handle(Event(), Context(client, call_id))
        response = format_response(result)
        response.headers.setdefault(CALL_ID, call_id)
        return response

    @app.errorhandler(Exception)
    def on_error(exc: Exception) -> Response:
        call_id = _call_id()
        if isinstance(exc, HTTPException):
            status, message = exc.code or 500, exc.description or exc.name
        elif isinstance(exc, (accel.Unauthorized, accel.Forbidden)):  # this function's credentials, not the caller's
            status, message = 502, f"the shim refused this function's credentials: {exc.message}"
            log.warning("call %s: %s %s", call_id, type(exc).__name__, exc.message)
        elif isinstance(exc, accel.AccelError):
            status, message = exc.status, exc.message
            log.warning("call %s: %s %s", call_id, type(exc).__name__, exc.message)
        else:
            status, message = 500, f"{type(exc).__name__}: {exc}"
            log.error("call %s: the handler raised", call_id, exc_info=exc)
        return _error(status, message, call_id)

    return app


def _error(status: int, message: str, call_id: str) -> Response:
    response = jsonify(error=message, call_id=call_id)
    response.status_code = status
    response.headers[CALL_ID] = call_id
    return response


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


# --- of-watchdog's settings, read as its config package reads them ---------------------------
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_GO_TERM = re.compile(r"([0-9]+\.?[0-9]*|\.[0-9]+)([^0-9.]+)")  # a number and its unit


def parse_duration(value: str) -> float | None:
    """Seconds in ``value`` as of-watchdog reads a timeout, or None where it falls back to its default.

    A whole number is seconds ("30"); anything else must be a Go duration ("30s", "1m30s", "1.5h",
    "500ms", "-5s"): a bare "1.5" or "-5" is not one.
    """
    if re.fullmatch(r"[+-]?[0-9]+", value):
        return float(int(value)) if int(value) >= 0 else None
    sign = -1.0 if value.startswith("-") else 1.0
    rest = value[1:] if value.startswith(("+", "-")) else value
    if rest == "0":
        return 0.0
    total, at = 0.0, 0
    while at < len(rest):
        term = _GO_TERM.match(rest, at)
        if term is None or term.group(2) not in _GO_UNITS:
            return None
        total += float(term.group(1)) * _GO_UNITS[term.group(2)]
        at = term.end()
    return sign * total if rest else None


def watchdog_duration(environ: Mapping[str, str], key: str, default: float) -> float:
    """``environ[key]`` in seconds as the watchdog reads it: ``default`` when unset or unparseable."""
    value = environ.get(key)
    if value is None:
        return default
    seconds = parse_duration(value)
    if seconds is None:
        log.warning("%s=%r is not a duration; of-watchdog reads it as %gs", key, value, default)
        return default
    return seconds


class ShutdownPlan(NamedTuple):
    """What SIGTERM does: accept new requests for ``grace`` seconds, then drain; exit by ``limit``."""

    grace: float = 0.0
    limit: float = DRAIN_SECONDS

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> "ShutdownPlan":
        """Behind of-watchdog (``mode=http``): its healthcheck_interval and write_timeout; else none."""
        if environ.get("mode") != "http":
            return cls()
        write = watchdog_duration(environ, "write_timeout", WATCHDOG_TIMEOUT)
        interval = watchdog_duration(environ, "healthcheck_interval", write)
        limit = max(write, 0.0) + EXIT_MARGIN
        return cls(grace=min(interval + LISTEN_MARGIN, limit) if interval > 0 else 0.0, limit=limit)


def client_timeout(environ: Mapping[str, str]) -> float | None:
    """The accel client's timeout in seconds; None keeps the client's default.

    ``$ACCEL_TIMEOUT`` (seconds or a Go duration) when set, else less a margin than the watchdog's
    limit: behind of-watchdog (``mode=http``) the smaller of its exec_timeout and write_timeout (10 s
    each when unset or unparseable, as the watchdog reads them), otherwise ``$exec_timeout``.
    Values that do not parse are logged and ignored, never fatal.
    """
    override = environ.get("ACCEL_TIMEOUT", "")
    if override:
        seconds = _seconds(override)
        if seconds is not None and 0 < seconds < math.inf:
            return seconds
        log.warning("ACCEL_TIMEOUT=%r is not a positive duration; ignored", override)
    if environ.get("mode") == "http":  # of-watchdog's limits as it reads them, its 10 s defaults included
        limits = [watchdog_duration(environ, key, WATCHDOG_TIMEOUT) for key in ("exec_timeout", "write_timeout")]
        exec_timeout = min((t for t in limits if t > 0), default=0.0)  # the caller's answer must be written too
    else:
        raw = environ.get("exec_timeout", "")
        exec_timeout = parse_duration(raw) if raw else None
        if exec_timeout is None:
            if raw:
                log.warning("exec_timeout=%r is not a duration; the accel client keeps its default timeout", raw)
            return None
    if exec_timeout <= 0:  # the watchdog sets no limit
        return None
    return _less_margin(exec_timeout)


def request_timeout(header: str | None, exec_timeout: float | None) -> float | None:
    """The seconds a request's accel calls may take in all, from its ``X-Timeout`` as of-watchdog
    takes it (``getTimeout``: a Go duration no longer than exec_timeout, else ignored), less a
    margin; None without one, or not behind the watchdog (``exec_timeout`` None). Requests without
    one still have the watchdog's exec_timeout for all their calls (``create_app``)."""
    if not header or exec_timeout is None:
        return None
    # Go reads the header's bytes (WSGI gives them as latin-1) and, of repeated lines, the first
    # (waitress joins them with ", ", which no Go duration holds); it trims spaces and tabs only
    value = header.encode("latin-1", "replace").decode("utf-8", "replace").split(",", 1)[0].strip(" \t")
    if re.fullmatch(r"[+-]?[0-9]+", value):
        return None  # no Go duration but "0" (and "+0", "-0"), with which the watchdog sets no limit at all
    seconds = parse_duration(value)
    if seconds is None or seconds <= 0 or seconds > exec_timeout:
        return None
    return _less_margin(seconds)


def _request_budget(headers: Mapping[str, str], exec_timeout: float | None) -> float | None:
    """The seconds all of a request's accel calls may take: its X-Timeout's (``request_timeout``),
    else the watchdog's exec_timeout less the margin; None for a stream, which the watchdog does
    not time, or where no limit is known."""
    if _streaming(headers):
        return None
    budget = request_timeout(headers.get(REQUEST_TIMEOUT), exec_timeout)
    if budget is None and exec_timeout is not None and exec_timeout > 0:
        return _less_margin(exec_timeout)
    return budget


def _streaming(headers: Mapping[str, str]) -> bool:
    """Whether of-watchdog proxies the request as a stream (server-sent events, a websocket), where
    it applies neither exec_timeout nor X-Timeout."""
    return "text/event-stream" in headers.get("Accept", "") or headers.get("Upgrade", "").lower() == "websocket"


def _less_margin(seconds: float) -> float:
    """``seconds`` less 10% of it, at least 0.5 and at most 5 s of it, never below half."""
    low, high = EXEC_MARGIN_RANGE
    return max(seconds - min(max(seconds * EXEC_MARGIN, low), high), seconds / 2)


def _seconds(value: str) -> float | None:
    """A number of seconds ("2.5") or a Go duration ("45s")."""
    try:
        return float(value)
    except ValueError:
        return parse_duration(value)


# --- serving ---------------------------------------------------------------------------------
def serve(app: Flask, host: str, port: int, threads: int = 8, plan: ShutdownPlan = ShutdownPlan(),
          stopping: threading.Event | None = None, signals: list | None = None) -> None:
    """Serve ``app`` until SIGTERM/SIGINT, then as ``plan`` says: serve on for its grace (SIGTERM
    only), stop accepting, finish the requests in flight until its limit, and return.
    ``stopping`` is set at the signal (``create_app``'s readiness)."""
    from waitress import wasyncore
    from waitress.server import create_server

    server = create_server(app, host=host, port=port, threads=threads, ident="python3-accel")
    signals = record_signals() if signals is None else signals
    log.info("listening on http://%s:%d", host, port)
    channels = server._map  # waitress keeps the listener and its connections in one socket map
    while not signals:
        wasyncore.loop(timeout=0.2, map=channels, count=1)
    name, signalled = signals[0]
    if stopping is not None:
        stopping.set()
    grace = plan.grace if name == "SIGTERM" else 0.0
    if grace > 0:
        log.info("%s: still serving new requests for %.1fs (of-watchdog forwards them for its "
                 "healthcheck_interval), then draining; exiting within %.1fs", name, grace, plan.limit)
        while len(signals) == 1 and time.monotonic() < signalled + grace:
            wasyncore.loop(timeout=min(0.2, max(0.0, signalled + grace - time.monotonic())), map=channels, count=1)
        if len(signals) > 1:
            log.info("%s again: the grace period ends early", signals[1][0])
    log.info("%s: draining", name)
    # close the listener alone: server.close() would also close the trigger that worker threads
    # pull when a response is ready, and the requests in flight must still be answered
    wasyncore.dispatcher.close(server)
    deadline = signalled + plan.limit
    while time.monotonic() < deadline and _in_flight(channels):
        wasyncore.loop(timeout=0.05, map=channels, count=1)
    left = _in_flight(channels)
    if left:
        log.warning("%d request(s) still in flight %.1fs after %s; exiting without them", left, plan.limit, name)
    else:
        log.info("drained in %.1fs; exiting", time.monotonic() - signalled)
    server.task_dispatcher.shutdown(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
    wasyncore.close_all(channels)


def record_signals(signals: list | None = None) -> list:
    """SIGTERM and SIGINT from now on, as (name, monotonic time), in the list returned (``signals``,
    when given: handlers installed again, after an import that may have set its own)."""
    signals = [] if signals is None else signals

    def on_signal(signum: int, _frame: object) -> None:
        signals.append((signal.Signals(signum).name, time.monotonic()))

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return signals


def _in_flight(channels: Mapping[int, Any]) -> int:
    """Connections with a request being received (its body may still be streaming in from the
    watchdog) or served, or a response not yet sent."""
    return sum(1 for ch in list(channels.values())
               if getattr(ch, "requests", None) or _receiving(getattr(ch, "request", None))
               or getattr(ch, "total_outbufs_len", 0))


def _receiving(request: Any) -> bool:
    """Whether waitress's parser ``request`` (None between requests) has begun a request: blank
    lines between keep-alive requests are none."""
    return request is not None and bool(request.headers_finished or request.header_plus.strip())


def main() -> int:
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO").upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signals = record_signals()  # before the handler's import, which may take long
    from function import handler
    record_signals(signals)  # again: the handler (or a library it imports) may have set its own

    timeout = client_timeout(os.environ)
    client = accel.Client() if timeout is None else accel.Client(timeout=timeout)
    log.info("accel shim: %s, timeout %.1fs%s", client.url, client.timeout,
             "" if timeout is None else " (from $ACCEL_TIMEOUT or the watchdog's timeouts)")
    stopping = threading.Event()
    exec_timeout = watchdog_duration(os.environ, "exec_timeout", WATCHDOG_TIMEOUT) \
        if os.environ.get("mode") == "http" else None
    serve(create_app(handler, client, stopping, exec_timeout), "127.0.0.1", listen_port(),
          plan=ShutdownPlan.from_env(os.environ), stopping=stopping, signals=signals)
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
