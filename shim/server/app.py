"""HTTP layer only: routes decode the request, call the dispatcher, encode the answer.

Every error leaves through one place, ``_error_response``, with the status from DESIGN.md and a
JSON body ``{"error": "..."}``.
"""
from __future__ import annotations

import logging
import math
import zlib
from typing import Any

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from accel.codec import HEADER_LENGTH, decode_request, encode_response, read_header_length
from accel.errors import AccelError, InvalidInput, NotReady, PayloadTooLarge
from accel.shm import REGISTER_HEADER

from .. import __version__
from ..config import Settings
from ..dispatch import Dispatcher
from ..metrics import Metrics
from .shm_routes import ShmScope, shm_blueprint

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from ..kaas import KaasService
    from ..shm import SharedMemoryRegistry

log = logging.getLogger(__name__)

EXTENSIONS = ["binary_tensor_data", "model_repository_metadata", "statistics", "system_shared_memory"]
INFLATE_PIECE = 1 << 20  # bytes of an encoded body inflated at a time


def create_app(settings: Settings, dispatcher: Dispatcher, metrics: Metrics, kaas: KaasService | None = None,
               shm: SharedMemoryRegistry | None = None) -> Flask:
    """The Flask app of the Open Inference Protocol endpoints (and of KaaS, ``/v1/...``, given ``kaas``;
    of system shared memory, ``/v2/systemsharedmemory/...``, given ``shm``)."""
    app = Flask("accelshim")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    if kaas is not None:
        from .kaas_routes import kaas_blueprint  # noqa: PLC0415

        app.register_blueprint(kaas_blueprint(kaas))
    if shm is not None:
        app.register_blueprint(shm_blueprint(shm, dispatcher.registry.loaded.is_set))
    extensions = [e for e in EXTENSIONS if shm is not None or e != "system_shared_memory"]
    registry = dispatcher.registry

    @app.get("/v2/health/live")
    def live() -> Any:
        return jsonify(live=True)

    @app.get("/v2/health/ready")
    def ready() -> Any:
        if not registry.is_ready():
            raise NotReady("the shim is warming up")
        return jsonify(ready=True)

    @app.get("/v2")
    def server_metadata() -> Any:
        return jsonify(name="accelshim", version=__version__, extensions=extensions)

    @app.get("/v2/models")
    def models() -> Any:
        return jsonify(models=[{"name": n, "version": "1", "state": "READY" if registry.is_ready(n) else "LOADING"}
                               for n in registry.names()])

    @app.get("/v2/models/<name>")
    @app.get("/v2/models/<name>/versions/<version>")
    def model_metadata(name: str, version: str = "1") -> Any:
        _check_version(name, version)
        return jsonify(registry.lookup(name).metadata())

    @app.get("/v2/models/stats")
    @app.get("/v2/models/<name>/stats")
    @app.get("/v2/models/<name>/versions/<version>/stats")
    def statistics(name: str | None = None, version: str = "1") -> Any:
        if name is not None:
            _check_version(name, version)
            registry.lookup(name)
        return jsonify(dispatcher.stats.as_json([name] if name else registry.names()))

    @app.post("/v2/repository/index")
    def repository_index() -> Any:
        return jsonify([{"name": n, "version": "1", "state": "READY" if registry.is_ready(n) else "LOADING",
                         "reason": ""} for n in registry.names()])

    @app.get("/v2/models/<name>/ready")
    @app.get("/v2/models/<name>/versions/<version>/ready")
    def model_ready(name: str, version: str = "1") -> Any:
        _check_version(name, version)
        registry.lookup(name)
        if not registry.is_ready(name):
            raise NotReady(f"op {name!r} is warming up")
        return jsonify(name=name, ready=True)

    @app.post("/v2/models/<name>/infer")
    @app.post("/v2/models/<name>/versions/<version>/infer")
    def infer(name: str, version: str = "1") -> Any:
        _check_version(name, version)
        body = _read_body(g.get("body_limit", settings.max_body_bytes))  # the tenant's, set by the guard
        metrics.request_bytes.labels(name).inc(len(body))
        length = read_header_length(request.headers.get(HEADER_LENGTH))
        with ShmScope(shm, ready=dispatcher.registry.loaded.is_set) as regions:  # inputs and outputs in regions
            regions.register_on_the_way(request.headers.get(REGISTER_HEADER))
            infer_request = decode_request(body, length, regions.input)
            response = dispatcher.infer(name, infer_request, regions.destinations(infer_request))
            regions.place_outputs(infer_request, response)
            binary = {t.name: infer_request.binary_output(t.name) for t in response.outputs}
            payload, headers = encode_response(response, binary)
        return Response(payload, status=200, headers=headers)

    @app.get("/metrics")
    def prometheus() -> Any:
        metrics.ready.set(1 if registry.is_ready() else 0)
        payload, content_type = metrics.render()
        return Response(payload, content_type=content_type)

    @app.errorhandler(Exception)
    def on_error(exc: Exception) -> Any:
        return _error_response(exc)

    return app


def _check_version(name: str, version: str) -> None:
    if version != "1":
        raise AccelError(f"op {name!r} has only version 1, not {version!r}", status=404)


def _read_body(limit: int) -> bytes:
    """The request body, inflated if gzip/deflate-encoded (never past ``limit`` bytes)."""
    length = request.content_length or 0
    if length > limit:
        raise PayloadTooLarge(f"the request body is {length} bytes, over the limit of {limit}")
    # one read of the declared length: werkzeug's get_data() reads a limited stream in small
    # pieces (~30 ms for 8 MiB); waitress has already buffered the whole (de-chunked) body
    body = request.environ["wsgi.input"].read(length) if length else b""
    if len(body) != length:
        raise InvalidInput(f"the body ended after {len(body)} of {length} bytes")
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise InvalidInput(f"unsupported Content-Encoding {encoding!r} (use gzip, deflate or none)")
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    # in pieces, counted as they come: a bomb costs the limit in memory, not the doubling buffer of
    # one call that may return the limit (twice the limit at its peak)
    parts: list[bytes] = []
    size, pending = 0, body
    try:
        while True:
            part = inflater.decompress(pending, INFLATE_PIECE)
            size += len(part)
            if size > limit:
                raise PayloadTooLarge(f"the inflated body is over the limit of {limit} bytes")
            parts.append(part)
            pending = inflater.unconsumed_tail
            if inflater.eof or not (pending or len(part) == INFLATE_PIECE):
                break
    except zlib.error as exc:
        raise InvalidInput(f"the {encoding} body cannot be inflated: {exc}") from None
    if not inflater.eof:
        raise InvalidInput(f"the {encoding} body is truncated: its stream ends before its end marker")
    return b"".join(parts)  # one part: that part itself, not a copy


def _error_response(exc: Exception) -> Response:
    if isinstance(exc, AccelError):
        status, message = exc.status, exc.message
    elif isinstance(exc, RequestEntityTooLarge):
        status, message = 413, f"the request body is over the limit of {request.max_content_length} bytes"
    elif isinstance(exc, HTTPException):
        status = exc.code or 500
        message = {404: f"no endpoint {request.method} {request.path}",
                   405: f"method {request.method} not allowed on {request.path}"}.get(status, exc.description or exc.name)
    else:
        log.exception("internal error on %s %s", request.method, request.path)
        status, message = 500, f"internal error: {type(exc).__name__}: {exc}"
    response = jsonify(error=message)
    response.status_code = status
    retry_after = getattr(exc, "retry_after", None)
    if status in (429, 503) or retry_after is not None:  # whole seconds, as HTTP wants them
        response.headers["Retry-After"] = str(max(1, math.ceil(retry_after or 1)))
    return response
