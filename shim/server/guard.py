"""The shim's front door, hooked into the Flask app: who is calling, may they, and is there room.

Before a route runs: authenticate the bearer token (401), check the names in the path (400), refuse
an explicit address of another tenant's resources (``?tenant=other``: 403; buffers are kept per
tenant, so a bare key only ever names the caller's own), then, for requests that do work (infer, buffers, KaaS), refuse a lost device (503), an over-size body
(413, the tenant's limit), a passed deadline (504) and a full queue (429), and take a slot. After
it: count the answer per tenant and give the slot back. Health probes, ``/metrics`` and
``/openapi.json`` stay open. A DeviceLost raised anywhere trips the FaultMonitor.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

from flask import Flask, Response, g, request

from accel.codec import DEADLINE_HEADER
from accel.errors import Forbidden, InvalidInput, PayloadTooLarge

from ..admission import Admission
from ..auth import DEFAULT_TENANT, Tenant, TokenStore
from ..faults import DeviceLost, FaultMonitor
from ..names import check_name
from ..tenant_metrics import RelayedTenantMetrics, TenantMetrics

#: what the server puts in the WSGI environ: when the request had arrived whole (time.monotonic())
RECEIVED_KEY = "accelshim.received"
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready", "/metrics", "/openapi.json"})
UNAUTHENTICATED = "_unauthenticated"
_REJECTED = {401: "unauthorized", 403: "forbidden", 413: "body_too_large", 507: "buffer_quota"}


@dataclass
class Guard:
    """What the front door checks against."""

    tokens: TokenStore | None
    admission: Admission
    monitor: FaultMonitor
    metrics: TenantMetrics | RelayedTenantMetrics
    max_body_bytes: int
    tenant_max_body_bytes: int = 0  # 0: max_body_bytes
    #: tenant -> bytes it holds in the buffer store (for the per-tenant gauge), when there is a store
    buffer_usage: Callable[[str], int] | None = None

    def authenticate(self, authorization: str | None) -> Tenant:
        """The caller: the token's tenant, or DEFAULT_TENANT when the shim runs without tokens."""
        return self.tokens.authenticate(authorization) if self.tokens is not None else Tenant(DEFAULT_TENANT)


def current_tenant() -> str:
    """The tenant of the request being served (routes pass it to the buffer store)."""
    return g.get("tenant") or DEFAULT_TENANT


def is_work(rule: str) -> bool:
    """Whether a route does work, and so takes an admission slot: infer, buffers, KaaS."""
    return rule.endswith("/infer") or rule.startswith("/v1/")


def read_deadline(value: str | None, received: float) -> float | None:
    """The absolute deadline (``time.monotonic()``) of a request whose DEADLINE_HEADER is ``value``."""
    if value is None:
        return None
    try:
        ms = float(value)
    except ValueError:
        ms = math.nan
    if not math.isfinite(ms):
        raise InvalidInput(f"{DEADLINE_HEADER} must be a number of milliseconds, got {value[:40]!r}")
    return received + ms / 1000.0


def install_guard(app: Flask, guard: Guard) -> None:
    """Hook ``guard`` into ``app`` (before/after each request, and on DeviceLost)."""
    from .app import _error_response  # the one mapping of errors to responses

    @app.before_request
    def admit() -> None:
        if request.path in OPEN_PATHS:
            return
        g.tenant = UNAUTHENTICATED
        tenant = guard.authenticate(request.headers.get("Authorization"))
        g.tenant = tenant.name
        for key, value in (request.view_args or {}).items():
            if isinstance(value, str):
                check_name(value, key if key != "name" else "op or model name")
        owner = request.args.get("tenant")
        if owner is not None and owner != tenant.name:  # an explicit address of another tenant's resource
            raise Forbidden(f"the resources of tenant {owner[:64]!r} are not yours (you are {tenant.name!r})")
        if request.url_rule is None or not is_work(request.url_rule.rule):
            return
        guard.monitor.check()
        length = request.content_length or 0
        guard.metrics.request_bytes.labels(tenant.name).inc(length)
        limit = min(tenant.limits.max_body_bytes or guard.tenant_max_body_bytes or guard.max_body_bytes,
                    guard.max_body_bytes)
        if length > limit:
            raise PayloadTooLarge(f"the request body is {length} bytes, over tenant {tenant.name!r}'s limit of {limit}")
        g.body_limit = limit  # also bounds what a compressed body inflates to
        received = request.environ.get(RECEIVED_KEY) or time.monotonic()
        deadline = read_deadline(request.headers.get(DEADLINE_HEADER), received)
        g.slot = guard.admission.admit(tenant.name, deadline, max_inflight=tenant.limits.max_inflight,
                                       max_queue=tenant.limits.max_queue)

    @app.after_request
    def account(response: Response) -> Response:
        if request.path in OPEN_PATHS:
            return response
        if g.get("slot") is not None and guard.monitor.fault is not None and response.status_code < 500:
            # computed on a device that was lost meanwhile: not to be trusted
            try:
                guard.monitor.check()
            except DeviceLost as exc:
                response = _error_response(exc)
        status = response.status_code
        tenant = g.get("tenant") or UNAUTHENTICATED
        if guard.buffer_usage is not None and g.get("slot") is not None and request.path.startswith("/v1/"):
            guard.metrics.buffer_bytes.labels(tenant).set(guard.buffer_usage(tenant))
        guard.metrics.requests.labels(tenant, str(status)).inc()
        if status in _REJECTED:
            guard.metrics.rejected.labels(tenant, _REJECTED[status]).inc()
        if status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="accelshim"'
        return response

    @app.teardown_request
    def release(_exc: BaseException | None) -> None:
        slot = g.pop("slot", None)
        if slot is not None:
            slot.release()

    def on_device_lost(exc: DeviceLost) -> Response:
        guard.monitor.trip(exc)
        return _error_response(exc)

    app.register_error_handler(DeviceLost, on_device_lost)
