"""HTTP face of the system shared memory extension (Triton's ``system_shared_memory``).

The endpoints (``/v2/systemsharedmemory/...``: status, register, unregister) and ``ShmScope``, the
step of an infer request between decode and dispatch (inputs read from regions, no copy; the
requested outputs' places in their regions resolved, for ops that compute straight into them) and
between dispatch and encode (the other outputs copied into their regions). Regions belong to the
request's tenant (``guard.current_tenant``); errors are ``accel.errors``, answered by the app's one
error handler.
"""
from __future__ import annotations

import json
from typing import Any, Callable

import numpy as np
from flask import Blueprint, Response, jsonify, request

from accel.codec import InferRequest, InferResponse
from accel.errors import InvalidInput, NotReady, PayloadTooLarge
from accel.shm import BYTE_SIZE, OFFSET, REGION, REGISTER_HEADER, SharedMemoryRef

from ..shm import Region, SharedMemoryRegistry
from .guard import current_tenant

#: a register request is three small fields
MAX_REGISTER_BODY = 64 * 1024
_SHM_KEYS = (REGION, BYTE_SIZE, OFFSET)


def shm_blueprint(registry: SharedMemoryRegistry, ready: Callable[[], bool] = lambda: True) -> Blueprint:
    """The blueprint of the ``/v2/systemsharedmemory`` endpoints over ``registry``; registering waits
    (503) until the ops have warmed up (``ready``: a GPU backend pins regions, which must not run
    beside the capture of a model's CUDA graph at warm-up)."""
    bp = Blueprint("system_shared_memory", __name__)

    @bp.get("/v2/systemsharedmemory/status")
    def status_all() -> Any:
        return jsonify(registry.status(None, current_tenant()))

    @bp.get("/v2/systemsharedmemory/region/<region>/status")
    def status(region: str) -> Any:
        return jsonify(registry.status(region, current_tenant()))

    @bp.post("/v2/systemsharedmemory/region/<region>/register")
    def register(region: str) -> Any:
        if not ready():
            raise NotReady("the shim is warming up: register the region once it is ready")
        length = request.content_length or 0
        if length > MAX_REGISTER_BODY:
            raise PayloadTooLarge(f"a register request is at most {MAX_REGISTER_BODY} bytes, not {length}")
        doc = _registration(request.environ["wsgi.input"].read(length) if length else b"", "the register request")
        registry.register(region, doc["key"], doc.get("offset", 0), doc["byte_size"], current_tenant())
        return Response(status=200)  # as Triton: success is the status alone

    @bp.post("/v2/systemsharedmemory/unregister")
    def unregister_all() -> Any:
        registry.unregister(None, current_tenant())
        return Response(status=200)

    @bp.post("/v2/systemsharedmemory/region/<region>/unregister")
    def unregister(region: str) -> Any:
        registry.unregister(region, current_tenant())
        return Response(status=200)

    return bp


def _registration(text: bytes | str, what: str, fields: tuple[str, ...] = ("key", "byte_size")) -> dict[str, Any]:
    """``{"key": str, "offset": int, "byte_size": int}`` (and any other ``fields``) from JSON ``text``
    (types checked by the registry)."""
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{what} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidInput(f'{what} must be a JSON object {{{", ".join(map(repr, fields))}, "offset"}}')
    missing = [k for k in fields if k not in doc]
    if missing:
        raise InvalidInput(f"{what} has no {missing[0]!r}")
    return doc


class ShmScope:
    """The shared memory part of one infer request; a context manager that keeps the regions it
    used mapped until the request is answered.

    Args:
        registry: the shim's regions, or None when the shim serves no shared memory (such requests: 400).
        tenant: whose regions the request may name.
    """

    def __init__(self, registry: SharedMemoryRegistry | None, tenant: str | None = None,
                 ready: Callable[[], bool] = lambda: True) -> None:
        self._registry = registry
        self._tenant = tenant or current_tenant()
        self._ready = ready
        self._pinned: dict[str, Region] = {}
        self._named: str | None = None  # the region the request's header named: the only one it may use

    def register_on_the_way(self, header: str | None) -> None:
        """Register the region that ``REGISTER_HEADER`` (its value ``header``; None: absent) names,
        unless it is registered just so already, and hold that very object for the request: a
        function's first call through a region needs no register request of its own, and a call whose
        region name another instance took over is refused (400) instead of using the other's object.

        The request may then use that region only (a tensor in another region is a 400): every region
        it uses is one it named.

        Raises:
            InvalidInput: a malformed header, a shim that serves no shared memory, the name registered
                with another key, offset, size or object (400), or what registering raises;
            QuotaExceeded / InsufficientStorage: over the tenant's region count (429) or bytes (507);
            NotReady: warming up, or another request registering that name (503).
        """
        if header is None:
            return
        what = f"the {REGISTER_HEADER} header"
        if self._registry is None:
            raise InvalidInput(f"{what} registers a shared memory region, but this shim serves no shared memory "
                               "(system_shared_memory is off)")
        if not self._ready():
            raise NotReady("the shim is warming up: register the region once it is ready")
        doc = _registration(header, what, ("name", "key", "byte_size"))
        if not isinstance(doc["name"], str):
            raise InvalidInput(f"{what}: name must be a string")
        name = doc["name"]
        # this very object, whoever takes the name over meanwhile
        self._pinned[name] = self._registry.ensure(name, doc["key"], doc.get("offset", 0), doc["byte_size"],
                                                   self._tenant)
        self._named = name

    def __enter__(self) -> "ShmScope":
        return self

    def __exit__(self, *exc: object) -> None:
        pinned, self._pinned = self._pinned, {}
        for region in pinned.values():
            self._registry.release(region)  # type: ignore[union-attr]

    def input(self, tensor: str, ref: SharedMemoryRef) -> memoryview:
        """The bytes of input ``tensor`` in its region, read-only and not copied (the codec's resolver)."""
        return self._view(tensor, ref, ref.byte_size).toreadonly()

    def destinations(self, request: InferRequest) -> dict[str, memoryview]:
        """Where the outputs that ``request`` asks for in shared memory go: writable views of their
        regions (``shared_memory_byte_size`` bytes at their offset), for ``Dispatcher.infer``, so that
        an op can compute into them; resolved before the work, so that a bad place costs none.

        Raises:
            InvalidInput: a place outside its region, or shared memory asked of a shim that serves none.
            OpNotFound: an unknown region.
        """
        wanted = [o for o in request.outputs or () if o.shm is not None]
        return {o.name: self._view(o.name, o.shm, o.shm.byte_size) for o in wanted}

    def place_outputs(self, request: InferRequest, response: InferResponse) -> list[str]:
        """Write the outputs that ``request`` asked for in shared memory into their regions, unless
        they already are there (an op computed into its destination, or noop echoed an input where
        its output goes); they are answered with the region parameters and no data (the actual
        ``shared_memory_byte_size``).

        Returns:
            The names of the outputs copied into their regions.
        Raises:
            InvalidInput: a region too small for its output (the output is named), or shared memory
                asked of a shim that serves none.
            OpNotFound: an unknown region.
        """
        copied = []
        wanted = {o.name: o.shm for o in request.outputs or () if o.shm is not None}
        for tensor in response.outputs:
            ref = wanted.get(tensor.name)
            params = {k: v for k, v in tensor.parameters.items() if k not in _SHM_KEYS and k != "binary_data_size"}
            if ref is None:
                if len(params) != len(tensor.parameters):  # e.g. an input echoed with its region parameters
                    tensor.parameters = params
                continue
            raw = memoryview(tensor.raw)
            nbytes = raw.nbytes
            if nbytes > ref.byte_size:
                raise InvalidInput(f"output {tensor.name!r} is {nbytes} bytes but its shared_memory_byte_size "
                                   f"is {ref.byte_size}: register or ask for a larger region")
            target = self._view(tensor.name, ref, nbytes)
            if _address(raw) != _address(target):  # else the op computed it there: nothing to move
                target[:] = raw if raw.format == "B" and raw.ndim == 1 else raw.cast("B")
                copied.append(tensor.name)
            tensor.parameters = {**params, **SharedMemoryRef(ref.region, nbytes, ref.offset).parameters()}
        return copied

    def _view(self, tensor: str, ref: SharedMemoryRef, nbytes: int) -> memoryview:
        """``nbytes`` bytes at ``ref``'s offset of its region, pinned for this request (writable)."""
        return SharedMemoryRegistry.view(self._pin(ref.region, tensor), ref.offset, nbytes, tensor)

    def _pin(self, name: str, tensor: str) -> Region:
        if self._registry is None:
            raise InvalidInput(f"tensor {tensor!r} names shared memory region {name!r}, but this shim serves no "
                               "shared memory (system_shared_memory is off)")
        region = self._pinned.get(name)
        if region is None:
            if self._named is not None:  # its object unchecked: the request named another one
                raise InvalidInput(f"tensor {tensor!r} is in shared memory region {name!r}, but the request's "
                                   f"{REGISTER_HEADER} header names region {self._named!r}: one region per "
                                   "such request")
            region = self._pinned[name] = self._registry.pin(name, self._tenant, tensor)
        return region


def _address(view: memoryview) -> int:
    """The address of ``view``'s first byte (0 when it has none)."""
    return int(np.frombuffer(view, np.uint8).ctypes.data) if view.nbytes else 0
