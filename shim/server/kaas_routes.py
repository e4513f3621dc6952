"""HTTP routes of Kernel-as-a-Service: ``/v1/kaas`` and the buffer store ``/v1/buffers``.

Routes decode and encode only; errors are raised as ``accel.errors`` and answered by the app's
one error handler. The tenant is ``flask.g.tenant`` when an auth layer has set it, else
``"default"``.
"""
from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response, g, jsonify, request

from accel.errors import InvalidInput, PayloadTooLarge

from ..kaas import DEFAULT_TENANT, KaasService

OCTET = "application/octet-stream"


def kaas_blueprint(kaas: KaasService) -> Blueprint:
    """The blueprint of the KaaS endpoints, served by ``kaas``."""
    bp = Blueprint("kaas", __name__)

    @bp.post("/v1/kaas")
    def run() -> Any:
        try:
            doc = json.loads(_body())
        except ValueError as exc:
            raise InvalidInput(f"the KaaS request is not JSON: {exc}") from None
        return jsonify(kaas.run(doc, _tenant()).as_json())

    @bp.get("/v1/kaas/libraries")
    def libraries() -> Any:
        return jsonify(kaas.describe_libraries())

    @bp.put("/v1/buffers/<key>")
    def put_buffer(key: str) -> Any:
        data = _body()
        kaas.put_buffer(key, data, _tenant())
        return jsonify(key=key, size=len(data))

    @bp.get("/v1/buffers/<key>")
    def get_buffer(key: str) -> Any:
        return Response(kaas.get_buffer(key, _tenant()), content_type=OCTET)

    @bp.delete("/v1/buffers/<key>")
    def delete_buffer(key: str) -> Any:
        kaas.delete_buffer(key, _tenant())
        return jsonify(deleted=key)

    @bp.get("/v1/buffers")
    def list_buffers() -> Any:
        tenant = _tenant()
        return jsonify(buffers=[b.as_json() for b in kaas.list_buffers(tenant)], **kaas.usage(tenant))

    return bp


def _tenant() -> str:
    return getattr(g, "tenant", None) or DEFAULT_TENANT


def _body() -> bytes:
    """The raw body, in one read of its declared length (Flask has applied MAX_CONTENT_LENGTH)."""
    if request.headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity"):
        raise InvalidInput("KaaS and buffer bodies are sent without Content-Encoding")
    length = request.content_length or 0
    if request.max_content_length is not None and length > request.max_content_length:
        raise PayloadTooLarge(f"the body is {length} bytes, over the limit of {request.max_content_length}")
    body = request.environ["wsgi.input"].read(length) if length else b""
    if len(body) != length:
        raise InvalidInput(f"the body ended after {len(body)} of {length} bytes")
    return body
