"""Open Inference Protocol (KServe v2) infer messages, JSON and binary tensor extension.

A message is a JSON header, optionally followed by the binary data of some tensors in header order;
``Inference-Header-Content-Length`` gives the JSON header's length. Requests and responses share the
framing, so one pair of functions (``_read_tensors`` / ``_write_message``) serves both sides.
"""
from __future__ import annotations

import json
from . import datatypes as dt
from ._record import Record
from .errors import InvalidInput
from .shm import SharedMemoryRef
from .tensor import Tensor

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Callable, Mapping, Sequence

    #: (tensor name, where its bytes lie) -> those bytes; the shim maps regions, the client its own
    Resolver = Callable[[str, SharedMemoryRef], memoryview]

HEADER_LENGTH = "Inference-Header-Content-Length"
#: milliseconds the caller will still wait for the answer; the shim drops a request whose time is up
#: before doing any work on it (504)
DEADLINE_HEADER = "X-Accel-Deadline-Ms"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"


class RequestedOutput(Record):
    """An entry of a request's ``outputs``: which output, whether it comes back binary, or into which
    shared memory region (``shm``, read from its parameters)."""

    __slots__ = ("name", "binary", "parameters", "shm")

    def __init__(self, name: str, binary: bool | None = None, parameters: dict[str, Any] | None = None) -> None:
        self.name, self.binary, self.parameters = name, binary, parameters or {}
        self.shm = SharedMemoryRef.from_parameters(self.parameters, f"output {name!r}")


class InferRequest(Record):
    """An infer request: input tensors, the outputs asked for (None: all), parameters, id."""

    __slots__ = ("inputs", "outputs", "parameters", "id")

    def __init__(self, inputs: list[Tensor], outputs: list[RequestedOutput] | None = None,
                 parameters: dict[str, Any] | None = None, id: str | None = None) -> None:
        self.inputs, self.outputs, self.parameters, self.id = inputs, outputs, parameters or {}, id

    def binary_output(self, name: str) -> bool:
        """Whether output ``name`` goes back in binary form (per output, else request-wide)."""
        for out in self.outputs or ():
            if out.name == name and out.binary is not None:
                return out.binary
        return bool(self.parameters.get("binary_data_output", False))


class InferResponse(Record):
    """An infer response: the model's name and version, output tensors, id, parameters."""

    __slots__ = ("model_name", "outputs", "model_version", "id", "parameters")

    def __init__(self, model_name: str, outputs: list[Tensor], model_version: str | None = None,
                 id: str | None = None, parameters: dict[str, Any] | None = None) -> None:
        self.model_name, self.outputs, self.model_version = model_name, outputs, model_version
        self.id, self.parameters = id, parameters or {}


# --- requests ---------------------------------------------------------------------------------
def encode_request(request: InferRequest, binary: bool = True) -> tuple[bytes, dict[str, str]]:
    """Serialise a request; with ``binary`` its tensors travel raw and outputs are asked for raw."""
    header: dict[str, Any] = {}
    if request.id is not None:
        header["id"] = request.id
    params = dict(request.parameters)
    if binary and request.outputs is None:
        params["binary_data_output"] = True
    if params:
        header["parameters"] = params
    if request.outputs is not None:
        header["outputs"] = [
            {"name": o.name, "parameters": {**o.parameters, **({"binary_data": binary if o.binary is None else o.binary})}}
            for o in request.outputs
        ]
    return _write_message(header, "inputs", request.inputs, lambda t: binary)


def read_header_length(value: str | None) -> int | None:
    """The JSON header's length that an ``Inference-Header-Content-Length`` value declares (None:
    no such header: the whole body is JSON).

    Raises:
        InvalidInput: not a non-negative integer.
    """
    if value is None:
        return None
    text = value.strip()
    if not (text.isascii() and text.isdigit()):
        raise InvalidInput(f"{HEADER_LENGTH} must be a non-negative integer, got {value!r}")
    return int(text)


def decode_request(body: bytes, header_length: int | None, resolve: Resolver | None = None) -> InferRequest:
    """Parse a request body; raises InvalidInput naming what is wrong.

    ``resolve`` gives the bytes of inputs in shared memory; without it such inputs are refused.
    """
    header, blob = _split(body, header_length)
    params = _object(header.get("parameters", {}), "request parameters")
    outputs = None
    if "outputs" in header:
        outputs = []
        for i, entry in enumerate(_array(header["outputs"], "outputs")):
            entry = _object(entry, f"outputs[{i}]")
            name = _name(entry.get("name"), f"outputs[{i}]")
            oparams = _object(entry.get("parameters", {}), f"output {name!r} parameters")
            binary = oparams.get("binary_data")
            if binary is not None and not isinstance(binary, bool):
                raise InvalidInput(f"output {name!r}: binary_data must be true or false")
            outputs.append(RequestedOutput(name, binary, oparams))
    inputs = _read_tensors(header, "inputs", blob, resolve)
    req_id = header.get("id")
    return InferRequest(inputs, outputs, params, None if req_id is None else str(req_id))


# --- responses --------------------------------------------------------------------------------
def encode_response(response: InferResponse, binary: Mapping[str, bool] | bool) -> tuple[bytes, dict[str, str]]:
    """Serialise a response; ``binary`` says per output name (or for all) whether it goes raw."""
    header: dict[str, Any] = {"model_name": response.model_name}
    if response.model_version is not None:
        header["model_version"] = response.model_version
    if response.id is not None:
        header["id"] = response.id
    if response.parameters:
        header["parameters"] = response.parameters
    pick = (lambda t: binary) if isinstance(binary, bool) else (lambda t: binary.get(t.name, False))
    return _write_message(header, "outputs", response.outputs, pick)


def decode_response(body: bytes, header_length: int | None, resolve: Resolver | None = None) -> InferResponse:
    """Parse a response body; ``resolve`` gives the bytes of outputs written to shared memory."""
    header, blob = _split(body, header_length)
    outputs = _read_tensors(header, "outputs", blob, resolve)
    return InferResponse(
        model_name=str(header.get("model_name", "")), outputs=outputs,
        model_version=header.get("model_version"), id=header.get("id"),
        parameters=header.get("parameters") or {},
    )


# --- shared framing ---------------------------------------------------------------------------
def _write_message(header: dict[str, Any], key: str, tensors: Sequence[Tensor],
                   is_binary: Any) -> tuple[bytes, dict[str, str]]:
    entries, chunks = [], []
    for t in tensors:
        entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        params = dict(t.parameters)
        if SharedMemoryRef.from_parameters(params, f"tensor {t.name!r}") is not None:
            params.pop("binary_data_size", None)  # the bytes are in the region: neither data nor a binary part
        elif is_binary(t):
            params["binary_data_size"] = len(t.raw)
            chunks.append(t.raw)
        else:
            params.pop("binary_data_size", None)
            entry["data"] = t.tolist()
        if params:
            entry["parameters"] = params
        entries.append(entry)
    header[key] = entries
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    if not chunks:
        return head, {"Content-Type": JSON_TYPE}
    return b"".join([head, *chunks]), {"Content-Type": BINARY_TYPE, HEADER_LENGTH: str(len(head))}


def _split(body: bytes, header_length: int | None) -> tuple[dict[str, Any], memoryview]:
    view = memoryview(body)
    if header_length is None:
        header_length = len(view)
    elif not 0 <= header_length <= len(view):
        raise InvalidInput(f"{HEADER_LENGTH} is {header_length} but the body has only {len(view)} bytes")
    try:
        header = json.loads(bytes(view[:header_length]))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"malformed JSON in the inference header: {exc}") from None
    return _object(header, "inference header"), view[header_length:]


def _read_tensors(header: Mapping[str, Any], key: str, blob: memoryview,
                  resolve: Resolver | None = None) -> list[Tensor]:
    tensors: list[Tensor] = []
    seen: set[str] = set()
    offset = 0
    for i, entry in enumerate(_array(header.get(key, []), key)):
        entry = _object(entry, f"{key}[{i}]")
        name = _name(entry.get("name"), f"{key}[{i}]")
        if name in seen:
            raise InvalidInput(f"{key}: {name!r} appears twice")
        seen.add(name)
        datatype = dt.check(entry.get("datatype"), f"{key[:-1]} {name!r}")
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise InvalidInput(f"{key[:-1]} {name!r}: shape must be a list of non-negative integers, got {shape!r}")
        dt.check_shape(tuple(shape), f"{key[:-1]} {name!r}")
        params = _object(entry.get("parameters", {}), f"{key[:-1]} {name!r} parameters")
        size = params.get("binary_data_size")
        shm = SharedMemoryRef.from_parameters(params, f"{key[:-1]} {name!r}")
        if shm is not None:
            tensors.append(_shm_tensor(name, datatype, tuple(shape), params, shm, "data" in entry or size is not None,
                                       resolve, key[:-1]))
        elif size is not None:
            if "data" in entry:
                raise InvalidInput(f"{key[:-1]} {name!r} has both data and binary_data_size")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidInput(f"{key[:-1]} {name!r}: binary_data_size must be a non-negative integer")
            if offset + size > len(blob):
                raise InvalidInput(f"{key[:-1]} {name!r}: binary_data_size {size} runs past the end of the "
                                   f"binary data ({len(blob) - offset} bytes left)")
            tensors.append(Tensor(name, datatype, tuple(shape), blob[offset:offset + size], params))
            offset += size
        elif "data" in entry:
            tensor = Tensor.from_list(name, datatype, shape, entry["data"])
            tensor.parameters = params
            tensors.append(tensor)
        else:
            raise InvalidInput(f"{key[:-1]} {name!r} has neither data nor binary_data_size")
    if offset != len(blob):
        raise InvalidInput(f"the body carries {len(blob)} bytes of binary data but the {key} "
                           f"declare {offset}")
    return tensors


def _shm_tensor(name: str, datatype: str, shape: tuple[int, ...], params: dict[str, Any], shm: SharedMemoryRef,
                has_data: bool, resolve: Resolver | None, what: str) -> Tensor:
    """A tensor whose bytes lie in a shared memory region (checked to be exactly its size)."""
    if has_data:
        raise InvalidInput(f"{what} {name!r} is in shared memory region {shm.region!r} and carries data too")
    if resolve is None:
        raise InvalidInput(f"{what} {name!r} is in shared memory region {shm.region!r}, which is not "
                           "served here")
    if datatype != dt.BYTES:
        want = dt.element_count(shape) * dt.FIXED[datatype][1]
        if shm.byte_size != want:
            raise InvalidInput(f"{what} {name!r}: shared_memory_byte_size is {shm.byte_size} but shape "
                               f"{list(shape)} of {datatype} is {want} bytes")
    return Tensor(name, datatype, shape, resolve(name, shm), params)


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    return value


def _array(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidInput(f"{what} must be a JSON array")
    return value


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"{what}: name must be a non-empty string")
    return value
