"""The KaaS request format (Pemberton et al. 2022) as dataclasses, parsed and checked for shape.

``parse_request`` checks everything a request can be checked for on its own (types, names,
ranges, consistent buffer specs); :mod:`shim.kaas.plan` then checks it against the kernel
signatures, the device limits and the buffer store.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from accel.errors import InvalidInput

from .signature import LITERAL_TYPES

LIBRARY_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
KERNEL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # as shim.names.NAME (and no "..")
BUFFER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
ARG_TYPES = ("i", "o", "io", "t")
MAX_KERNELS = 1024
MAX_ITER = 100_000
MAX_LAUNCHES = 1_000_000
_INT_RANGE = {"i": (-2**31, 2**31 - 1), "Q": (0, 2**64 - 1)}

_REQUEST_KEYS = {"kernels", "nIter"}
_KERNEL_KEYS = {"library", "kernel", "arguments", "literals", "nGrid", "gridDim", "nBlock", "blockDim", "sharedSize"}
_BUFFER_KEYS = {"name", "size", "offset", "key", "ephemeral", "const"}


@dataclass(frozen=True)
class BufferSpec:
    """A named buffer: ``size`` bytes at ``offset`` of store object ``key`` (None: an input's whole length)."""

    name: str
    size: int | None
    offset: int = 0
    key: str = ""
    ephemeral: bool = False
    const: bool = False


@dataclass(frozen=True)
class Literal:
    type: str
    val: int | float


@dataclass(frozen=True)
class KernelSpec:
    library: str
    kernel: str
    arguments: tuple[tuple[BufferSpec, str], ...]
    literals: tuple[Literal, ...]
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_size: int = 0


@dataclass(frozen=True)
class KaasRequest:
    kernels: tuple[KernelSpec, ...]
    n_iter: int = 1


def parse_request(doc: Any) -> KaasRequest:
    """A :class:`KaasRequest` from decoded JSON.

    Raises:
        InvalidInput: anything not in the format, with the path of the offending field.
    """
    _object(doc, "the request", _REQUEST_KEYS)
    kernels = doc.get("kernels")
    if not isinstance(kernels, list) or not kernels:
        raise InvalidInput("kernels must be a non-empty list of kernel specs")
    if len(kernels) > MAX_KERNELS:
        raise InvalidInput(f"a request may have at most {MAX_KERNELS} kernels, not {len(kernels)}")
    n_iter = _int(doc.get("nIter", 1), "nIter", 1, MAX_ITER)
    if n_iter * len(kernels) > MAX_LAUNCHES:
        raise InvalidInput(f"nIter * len(kernels) = {n_iter * len(kernels)} launches, over the limit of {MAX_LAUNCHES}")
    specs = tuple(_kernel(k, f"kernels[{i}]") for i, k in enumerate(kernels))
    _check_buffers_agree(specs)
    return KaasRequest(specs, n_iter)


def _kernel(doc: Any, where: str) -> KernelSpec:
    _object(doc, where, _KERNEL_KEYS)
    library, kernel = doc.get("library"), doc.get("kernel")
    if not isinstance(library, str) or not LIBRARY_NAME.match(library):
        raise InvalidInput(f"{where}.library must be a registered library name ([a-z][a-z0-9_]*), "
                           f"not {library!r}; libraries are never paths")
    if not isinstance(kernel, str) or not KERNEL_NAME.match(kernel):
        raise InvalidInput(f"{where}.kernel must be a kernel name (a C identifier), not {kernel!r}")
    arguments = doc.get("arguments", [])
    if not isinstance(arguments, list):
        raise InvalidInput(f"{where}.arguments must be a list of [bufferSpec, type]")
    args = []
    for j, item in enumerate(arguments):
        at = f"{where}.arguments[{j}]"
        if not isinstance(item, list) or len(item) != 2 or item[1] not in ARG_TYPES:
            raise InvalidInput(f"{at} must be [bufferSpec, type] with type one of {', '.join(ARG_TYPES)}")
        args.append((_buffer(item[0], at), item[1]))
    literals = doc.get("literals", [])
    if not isinstance(literals, list):
        raise InvalidInput(f"{where}.literals must be a list of {{\"type\", \"val\"}}")
    return KernelSpec(library, kernel, tuple(args), tuple(_literal(x, f"{where}.literals[{j}]") for j, x in enumerate(literals)),
                      _dim(doc, ("nGrid", "gridDim"), where), _dim(doc, ("nBlock", "blockDim"), where),
                      _int(doc.get("sharedSize", 0), f"{where}.sharedSize", 0, 2**31 - 1))


def _buffer(doc: Any, where: str) -> BufferSpec:
    _object(doc, f"{where} bufferSpec", _BUFFER_KEYS)
    name = doc.get("name")
    if not isinstance(name, str) or not BUFFER_NAME.match(name):
        raise InvalidInput(f"{where}: buffer name must match {BUFFER_NAME.pattern}, not {name!r}")
    key = doc.get("key", name)
    if not isinstance(key, str) or not KEY.match(key) or ".." in key:
        raise InvalidInput(f"{where}: buffer {name!r} has key {key!r}; keys must match {KEY.pattern}")
    size = None if doc.get("size") is None else _int(doc["size"], f"{where}: size of {name!r}", 1, 2**40)
    flags = {f: doc.get(f, False) for f in ("ephemeral", "const")}
    for f, v in flags.items():
        if not isinstance(v, bool):
            raise InvalidInput(f"{where}: {f} of buffer {name!r} must be true or false")
    return BufferSpec(name, size, _int(doc.get("offset", 0), f"{where}: offset of {name!r}", 0, 2**40), key,
                      flags["ephemeral"], flags["const"])


def _literal(doc: Any, where: str) -> Literal:
    _object(doc, where, {"type", "val"})
    ltype, val = doc.get("type"), doc.get("val")
    if ltype not in LITERAL_TYPES:
        raise InvalidInput(f"{where}: literal type must be one of {', '.join(LITERAL_TYPES)}, not {ltype!r}")
    if ltype in _INT_RANGE:
        lo, hi = _INT_RANGE[ltype]
        if type(val) is not int or not lo <= val <= hi:
            raise InvalidInput(f"{where}: a {ltype!r} literal must be an integer in [{lo}, {hi}], not {val!r}")
    elif type(val) not in (int, float) or not math.isfinite(val):
        raise InvalidInput(f"{where}: a {ltype!r} literal must be a finite number, not {val!r}")
    return Literal(ltype, val)


def _dim(doc: dict[str, Any], names: tuple[str, str], where: str) -> tuple[int, int, int]:
    given = [n for n in names if n in doc]
    if len(given) != 1:
        raise InvalidInput(f"{where} needs exactly one of {' or '.join(names)} (an int or [x, y, z])")
    value = doc[given[0]]
    items = value if isinstance(value, list) else [value]
    if not 1 <= len(items) <= 3:
        raise InvalidInput(f"{where}.{given[0]} must be an int or a list of 1 to 3 ints")
    dims = [_int(v, f"{where}.{given[0]}", 1, 2**31 - 1) for v in items]
    return tuple(dims + [1] * (3 - len(dims)))  # type: ignore[return-value]


def _check_buffers_agree(kernels: tuple[KernelSpec, ...]) -> None:
    """One name is one buffer: every use must give the same spec; names sharing a key only read it."""
    by_name: dict[str, BufferSpec] = {}
    by_key: dict[str, set[str]] = {}
    written: set[str] = set()
    for i, k in enumerate(kernels):
        for spec, atype in k.arguments:
            seen = by_name.setdefault(spec.name, spec)
            if seen != spec:
                raise InvalidInput(f"kernels[{i}]: buffer {spec.name!r} is given as {_show(spec)} here and as "
                                   f"{_show(seen)} before; one name is one buffer")
            if not spec.ephemeral:
                by_key.setdefault(spec.key, set()).add(spec.name)
            if atype != "i":
                written.add(spec.name)
        names = [spec.name for spec, _ in k.arguments]
        for spec, atype in k.arguments:
            if atype != "i" and names.count(spec.name) > 1:
                raise InvalidInput(f"kernels[{i}] passes buffer {spec.name!r} twice and writes it: aliasing "
                                   "arguments are not allowed")
    for key, names in by_key.items():
        if len(names) > 1 and names & written:
            a, b = sorted(names)[:2]
            raise InvalidInput(f"buffers {a!r} and {b!r} both use key {key!r} and one is written; several names "
                               "may share a key only to read it")


def _show(spec: BufferSpec) -> str:
    return (f"{{size={spec.size}, offset={spec.offset}, key={spec.key!r}, ephemeral={spec.ephemeral}, "
            f"const={spec.const}}}")


def _object(doc: Any, where: str, allowed: set[str]) -> None:
    if not isinstance(doc, dict):
        raise InvalidInput(f"{where} must be a JSON object")
    unknown = sorted(set(doc) - allowed)
    if unknown:
        raise InvalidInput(f"{where} has unknown field {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise InvalidInput(f"{what} must be an integer in [{lo}, {hi}], not {value!r}")
    return value
