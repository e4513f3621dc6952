"""The OpenAPI 3 description of the shim's whole HTTP API, in one place: ``GET /openapi.json``.

Each path is described once here; ``openapi_document`` keeps the paths that the app serves (the
buffer and KaaS routes are there only when their module is), so the document never lists a route
the shim does not have. ``tests/test_fuzz.py`` checks that every route is described, then fuzzes
the API against this document.
"""
from __future__ import annotations

import re
from typing import Any

from flask import Flask, jsonify

from accel import datatypes as dt
from accel.codec import DEADLINE_HEADER, HEADER_LENGTH
from accel.shm import REGISTER_HEADER

from .. import __version__
from ..names import NAME

JSON = "application/json"
_REF = "#/components/schemas/"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF + name}


def _errors(*statuses: int) -> dict[str, Any]:
    reasons = {400: "invalid input", 401: "no valid token", 403: "another tenant's resource",
               404: "no such op, model or resource", 405: "method not allowed", 413: "body or image too large",
               429: "queue full or over quota (see Retry-After)", 503: "not ready, draining or device lost "
               "(see Retry-After)", 504: "the deadline passed before any work", 507: "over the tenant's buffer quota"}
    return {str(s): {"description": reasons[s], "content": {JSON: {"schema": _ref("Error")}}} for s in statuses}


def _ok(schema: dict[str, Any] | None, description: str = "OK", content_type: str = JSON) -> dict[str, Any]:
    body = {"description": description}
    if schema is not None:
        body["content"] = {content_type: {"schema": schema}}
    return {"200": body}


_NAME_PARAM = {"name": "name", "in": "path", "required": True, "description": "op or model name",
               "schema": {"type": "string", "pattern": f"^{NAME.pattern}$", "maxLength": 128}}
_VERSION_PARAM = {"name": "version", "in": "path", "required": True, "schema": {"type": "string", "enum": ["1"]}}
_KEY_PARAM = {"name": "key", "in": "path", "required": True, "description": "buffer key",
              "schema": {"type": "string", "pattern": f"^{NAME.pattern}$", "maxLength": 128}}
_REGION_PARAM = {"name": "region", "in": "path", "required": True, "description": "shared memory region name",
                 "schema": {"type": "string", "pattern": f"^{NAME.pattern}$", "maxLength": 128}}
_TENANT_PARAM = {"name": "tenant", "in": "query", "required": False,
                 "description": "the owner; only the caller's own tenant is allowed (else 403)",
                 "schema": {"type": "string", "maxLength": 64}}
_DEADLINE_PARAM = {"name": DEADLINE_HEADER, "in": "header", "required": False,
                   "description": "milliseconds the caller still waits; past it the request is dropped (504)",
                   "schema": {"type": "integer", "minimum": 0}}
_WORK_ERRORS = (400, 401, 404, 413, 429, 503, 504)


def _op(summary: str, responses: dict[str, Any], *, params: tuple[dict, ...] = (), body: dict | None = None,
        secure: bool = True) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if params:
        op["parameters"] = list(params)
    if body is not None:
        op["requestBody"] = body
    if not secure:
        op["security"] = []
    return op


def _infer() -> dict[str, Any]:
    return _op("Run an op or model (JSON tensors, or the binary tensor extension)",
               {**_ok(_ref("InferResponse")), **_errors(*_WORK_ERRORS, 507)},
               params=(_DEADLINE_PARAM, {"name": HEADER_LENGTH, "in": "header", "required": False,
                                         "description": "length of the JSON header of a binary body",
                                         "schema": {"type": "integer", "minimum": 0}},
                       {"name": REGISTER_HEADER, "in": "header", "required": False,
                        "description": 'the shared memory region the request uses, {"name", "key", "offset", '
                                       '"byte_size"}: registered on the way unless it is already, just so; '
                                       "400 when the name stands for another object (docs/shared-memory.md)",
                        "schema": {"type": "string"}}),
               body={"required": True, "content": {JSON: {"schema": _ref("InferRequest")},
                                                   "application/octet-stream": {"schema": {"type": "string",
                                                                                           "format": "binary"}}}})


def _paths() -> dict[str, dict[str, Any]]:
    meta = _op("Op metadata: inputs, outputs, datatypes, shapes", {**_ok(_ref("ModelMetadata")), **_errors(400, 401, 404)})
    ready = _op("Whether the op has warmed up", {**_ok({"type": "object"}), **_errors(400, 401, 404, 503)})
    stats = _op("Inference statistics (statistics extension)", {**_ok({"type": "object"}), **_errors(400, 401, 404)})
    v = [_VERSION_PARAM]
    buffer_body = {"required": True, "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                         "format": "binary"}}}}
    return {
        "/v2/health/live": {"get": _op("Liveness", _ok({"type": "object"}), secure=False)},
        "/v2/health/ready": {"get": _op("Readiness: every op warmed up", {**_ok({"type": "object"}), **_errors(503)},
                                        secure=False)},
        "/v2": {"get": _op("Server metadata", {**_ok(_ref("ServerMetadata")), **_errors(401)})},
        "/v2/models": {"get": _op("The ops and models", {**_ok({"type": "object"}), **_errors(401)})},
        "/v2/models/stats": {"get": stats},
        "/v2/repository/index": {"post": _op("Model repository index", {**_ok({"type": "array"}), **_errors(401)})},
        "/v2/models/{name}": {"get": {**meta, "parameters": [_NAME_PARAM]}},
        "/v2/models/{name}/versions/{version}": {"get": {**meta, "parameters": [_NAME_PARAM, *v]}},
        "/v2/models/{name}/ready": {"get": {**ready, "parameters": [_NAME_PARAM]}},
        "/v2/models/{name}/versions/{version}/ready": {"get": {**ready, "parameters": [_NAME_PARAM, *v]}},
        "/v2/models/{name}/stats": {"get": {**stats, "parameters": [_NAME_PARAM]}},
        "/v2/models/{name}/versions/{version}/stats": {"get": {**stats, "parameters": [_NAME_PARAM, *v]}},
        "/v2/models/{name}/infer": {"post": {**_infer(), "parameters": [_NAME_PARAM, *_infer()["parameters"]]}},
        "/v2/models/{name}/versions/{version}/infer": {
            "post": {**_infer(), "parameters": [_NAME_PARAM, *v, *_infer()["parameters"]]}},
        "/v1/buffers": {"get": _op("The caller's buffer keys", {**_ok({"type": "object"}), **_errors(401, 403, 429, 503, 504)},
                                   params=(_TENANT_PARAM, _DEADLINE_PARAM))},
        "/v1/buffers/{key}": {
            "put": _op("Store a buffer (durable once answered)", {**_ok({"type": "object"}),
                                                                  **_errors(400, 401, 403, 413, 429, 503, 504, 507)},
                       params=(_KEY_PARAM, _TENANT_PARAM, _DEADLINE_PARAM), body=buffer_body),
            "get": _op("Read a buffer", {**_ok({"type": "string", "format": "binary"}, content_type="application/octet-stream"),
                                         **_errors(400, 401, 403, 404, 429, 503, 504)}, params=(_KEY_PARAM, _TENANT_PARAM, _DEADLINE_PARAM)),
            "delete": _op("Delete a buffer", {**_ok({"type": "object"}), **_errors(400, 401, 403, 404, 429, 503, 504)},
                          params=(_KEY_PARAM, _TENANT_PARAM, _DEADLINE_PARAM)),
        },
        "/v1/kaas/libraries": {"get": _op("The kernel libraries and their kernels' signatures",
                                          {**_ok({"type": "object"}), **_errors(401, 429, 503, 504)},
                                          params=(_DEADLINE_PARAM,))},
        "/v1/kaas": {"post": _op("Run a graph of preloaded kernels over named buffers",
                                 {**_ok({"type": "object"}), **_errors(*_WORK_ERRORS, 403, 507)},
                                 params=(_DEADLINE_PARAM,),
                                 body={"required": True, "content": {JSON: {"schema": {"type": "object"}}}})},
        **_shm_paths(),
        "/metrics": {"get": _op("Prometheus metrics (per op and per tenant)",
                                _ok({"type": "string"}, content_type="text/plain"), secure=False)},
        "/openapi.json": {"get": _op("This document", _ok({"type": "object"}), secure=False)},
    }


def _shm_paths() -> dict[str, dict[str, Any]]:
    """The system_shared_memory extension (Triton's; docs/shared-memory.md): the caller's regions."""
    status = {"type": "array", "items": _ref("ShmRegionStatus")}
    done = _ok(None, "done (empty body, as Triton)")
    register_body = {"required": True, "content": {JSON: {"schema": _ref("ShmRegisterRequest")}}}
    return {
        "/v2/systemsharedmemory/status": {"get": _op("The caller's shared memory regions",
                                                     {**_ok(status), **_errors(401)})},
        "/v2/systemsharedmemory/region/{region}/status": {"get": _op(
            "One shared memory region", {**_ok(status), **_errors(400, 401, 403, 404)}, params=(_REGION_PARAM,))},
        "/v2/systemsharedmemory/region/{region}/register": {"post": _op(
            "Map byte_size bytes at offset of /dev/shm/<key> as a region (key: a POSIX shm name, no path)",
            {**done, **_errors(400, 401, 403, 413, 429, 507)}, params=(_REGION_PARAM,), body=register_body)},
        "/v2/systemsharedmemory/unregister": {"post": _op("Unregister all the caller's regions",
                                                          {**done, **_errors(401)})},
        "/v2/systemsharedmemory/region/{region}/unregister": {"post": _op(
            "Unregister one region (an unknown one too, as Triton)", {**done, **_errors(400, 401, 403)},
            params=(_REGION_PARAM,))},
    }


def _schemas() -> dict[str, Any]:
    shape = {"type": "array", "items": {"type": "integer", "minimum": 0}, "maxItems": dt.MAX_RANK}
    params = {"type": "object", "additionalProperties": True}
    tensor = {"type": "object", "required": ["name", "datatype", "shape"],
              "properties": {"name": {"type": "string", "minLength": 1},
                             "datatype": {"type": "string", "enum": sorted(dt.ALL)},
                             "shape": shape, "parameters": params,
                             "data": {"type": "array", "items": {}}}}
    spec = {"type": "object", "properties": {"name": {"type": "string"}, "datatype": {"type": "string"},
                                             "shape": {"type": "array", "items": {"type": "integer"}}}}
    return {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
        "Tensor": tensor,
        "InferRequest": {"type": "object", "required": ["inputs"], "properties": {
            "id": {"type": "string"}, "parameters": params,
            "inputs": {"type": "array", "items": _ref("Tensor")},
            "outputs": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
                "name": {"type": "string", "minLength": 1}, "parameters": params}}}}},
        "InferResponse": {"type": "object", "required": ["model_name", "outputs"], "properties": {
            "model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
            "parameters": params, "outputs": {"type": "array", "items": _ref("Tensor")}}},
        "ModelMetadata": {"type": "object", "required": ["name", "inputs", "outputs"], "properties": {
            "name": {"type": "string"}, "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string"}, "inputs": {"type": "array", "items": spec},
            "outputs": {"type": "array", "items": spec}}},
        "ShmRegionStatus": {"type": "object", "required": ["name", "key", "offset", "byte_size"], "properties": {
            "name": {"type": "string"}, "key": {"type": "string"}, "offset": {"type": "integer", "minimum": 0},
            "byte_size": {"type": "integer", "minimum": 0}}},
        "ShmRegisterRequest": {"type": "object", "required": ["key", "byte_size"], "properties": {
            "key": {"type": "string", "pattern": "^/?[A-Za-z0-9_.-]{1,200}$"},
            "offset": {"type": "integer", "minimum": 0}, "byte_size": {"type": "integer", "minimum": 1}}},
        "ServerMetadata": {"type": "object", "required": ["name", "version", "extensions"], "properties": {
            "name": {"type": "string"}, "version": {"type": "string"},
            "extensions": {"type": "array", "items": {"type": "string"}}}},
    }


def served_paths(app: Flask) -> set[str]:
    """The app's routes, written as OpenAPI paths (``<name>`` -> ``{name}``)."""
    return {re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule) for rule in app.url_map.iter_rules()
            if rule.endpoint != "static"}


def openapi_document(app: Flask) -> dict[str, Any]:
    """The OpenAPI 3.0 document of the routes ``app`` serves."""
    served = served_paths(app)
    return {
        "openapi": "3.0.3",
        "info": {"title": "accelshim", "version": __version__,
                 "description": "Open Inference Protocol (KServe v2) with the binary tensor extension, plus "
                                "buffers and Kernel-as-a-Service. Errors are JSON {\"error\": ...}."},
        "paths": {path: item for path, item in _paths().items() if path in served},
        "components": {"schemas": _schemas(),
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "description": "the tenant's token (--tokens)"}}},
        "security": [{"bearer": []}],
    }


def register_openapi(app: Flask) -> None:
    """Serve ``GET /openapi.json`` (built on each call: routes may be added after this)."""
    app.add_url_rule("/openapi.json", "openapi", lambda: jsonify(openapi_document(app)), methods=["GET"])
