"""Check a parsed request against kernel signatures, device limits and the store; nothing runs here.

Buffer rules (one name is one buffer for the whole request):

- it is *loaded* from the store when its first use reads it (``i``/``io``), or when it is written
  into a window (``offset`` > 0) of an existing object; an input missing from the store is a 404;
- it is *stored* back when a kernel writes it (``o``/``io``) and it is not ephemeral; a stored
  buffer that is not loaded replaces the whole object under its key;
- ``t`` (temporary) and ``ephemeral`` buffers live only for the request and start zeroed;
- a ``const`` buffer is a read-only input, kept resident in the GPU cache between requests.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from accel.errors import InvalidInput, OpNotFound

from .library import LibraryRegistry
from .model import BufferSpec, KaasRequest, KernelSpec
from .runner import DeviceLimits
from .signature import LITERAL_TYPES, Kernel

# signature access -> the request argument types that may stand for it
_COMPATIBLE = {"i": ("i",), "o": ("o", "t"), "io": ("io", "t")}
_READS, _WRITES = ("i", "io"), ("o", "io", "t")


@dataclass
class PlannedBuffer:
    spec: BufferSpec
    size: int
    load: bool
    store: bool
    written: bool


@dataclass
class Launch:
    index: int
    spec: KernelSpec
    kernel: Kernel
    literals: list[np.generic]
    buffers: list[str]
    counts: list[int]


@dataclass
class Plan:
    buffers: dict[str, PlannedBuffer]
    launches: list[Launch]
    n_iter: int


def make_plan(request: KaasRequest, libraries: LibraryRegistry, limits: DeviceLimits,
              size_of: Callable[[str], int | None]) -> Plan:
    """The checked plan of ``request``.

    Args:
        size_of: key -> size of the stored object, or None when the store has no such key.
    Raises:
        OpNotFound: an unknown library or kernel, or an input buffer missing from the store.
        InvalidInput: anything else that does not fit (see the module docstring).
    """
    launches = []
    uses: dict[str, list[tuple[int, str]]] = {}
    specs: dict[str, BufferSpec] = {}
    for i, ks in enumerate(request.kernels):
        kernel = libraries.kernel(ks.library, ks.kernel)
        where = f"kernels[{i}] ({ks.library}.{ks.kernel})"
        literals = _literals(ks, kernel, where)
        _check_geometry(ks, kernel, limits, where)
        if len(ks.arguments) != len(kernel.args):
            raise InvalidInput(f"{where} takes {len(kernel.args)} buffer arguments "
                               f"({', '.join(a.name for a in kernel.args)}), not {len(ks.arguments)}")
        values = kernel.literal_values([lit.item() for lit in literals])
        counts = []
        for (spec, atype), arg, expr in zip(ks.arguments, kernel.args, kernel.counts):
            if atype not in _COMPATIBLE[arg.access]:
                raise InvalidInput(f"{where}: argument {arg.name!r} is {arg.access!r} in the kernel's signature; "
                                   f"buffer {spec.name!r} is passed as {atype!r} (allowed: "
                                   f"{', '.join(_COMPATIBLE[arg.access])})")
            if spec.offset % arg.itemsize:
                raise InvalidInput(f"{where}: buffer {spec.name!r} has offset {spec.offset}, not a multiple of "
                                   f"{arg.itemsize} ({arg.dtype} argument {arg.name!r})")
            try:
                count = expr.evaluate(values)
            except ValueError as exc:
                raise InvalidInput(f"{where}: argument {arg.name!r}: {exc}") from None
            if count < 0:
                raise InvalidInput(f"{where}: argument {arg.name!r} needs {arg.count} = {count} elements (< 0)")
            counts.append(count)
            uses.setdefault(spec.name, []).append((i, atype))
            specs[spec.name] = spec
        launches.append(Launch(i, ks, kernel, literals, [s.name for s, _ in ks.arguments], counts))
    buffers = {name: _plan_buffer(specs[name], uses[name], size_of) for name in uses}
    for launch in launches:
        for name, count, arg in zip(launch.buffers, launch.counts, launch.kernel.args):
            need = count * arg.itemsize
            if need > buffers[name].size:
                raise InvalidInput(
                    f"kernels[{launch.index}] ({launch.spec.library}.{launch.spec.kernel}): argument {arg.name!r} "
                    f"needs {arg.count} = {count} {arg.dtype} = {need} bytes; buffer {name!r} has "
                    f"{buffers[name].size}")
    return Plan(buffers, launches, request.n_iter)


def _literals(ks: KernelSpec, kernel: Kernel, where: str) -> list[np.generic]:
    if len(ks.literals) != len(kernel.literal_specs):
        raise InvalidInput(f"{where} takes {len(kernel.literal_specs)} literals "
                           f"({', '.join(f'{n}:{t}' for n, t in kernel.literal_specs) or 'none'}), "
                           f"not {len(ks.literals)}")
    out = []
    for j, (lit, (name, ltype)) in enumerate(zip(ks.literals, kernel.literal_specs)):
        if lit.type != ltype:
            raise InvalidInput(f"{where}: literal {j} ({name!r}) must have type {ltype!r}, not {lit.type!r}")
        out.append(LITERAL_TYPES[ltype](lit.val))
    return out


def _check_geometry(ks: KernelSpec, kernel: Kernel, limits: DeviceLimits, where: str) -> None:
    for label, dims, most in (("gridDim", ks.grid, limits.max_grid), ("blockDim", ks.block, limits.max_block)):
        for axis, d, m in zip("xyz", dims, most):
            if d > m:
                raise InvalidInput(f"{where}: {label}.{axis} = {d} is over the device limit of {m}")
    threads = ks.block[0] * ks.block[1] * ks.block[2]
    if threads > limits.max_threads_per_block:
        raise InvalidInput(f"{where}: a block of {list(ks.block)} is {threads} threads, over the device limit of "
                           f"{limits.max_threads_per_block}")
    if ks.shared_size > limits.max_shared_bytes:
        raise InvalidInput(f"{where}: sharedSize {ks.shared_size} is over the device limit of "
                           f"{limits.max_shared_bytes} bytes")
    if kernel.block is not None and ks.block != kernel.block:
        raise InvalidInput(f"{where} needs blockDim {list(kernel.block)}, not {list(ks.block)}")
    if ks.block[0] % kernel.block_multiple:
        raise InvalidInput(f"{where} needs blockDim.x to be a multiple of {kernel.block_multiple}, "
                           f"not {ks.block[0]}")


def _plan_buffer(spec: BufferSpec, uses: list[tuple[int, str]], size_of: Callable[[str], int | None]) -> PlannedBuffer:
    types = {t for _, t in uses}
    written = bool(types & set(_WRITES))
    if "t" in types and types != {"t"} and not spec.ephemeral:
        raise InvalidInput(f"buffer {spec.name!r} is a temporary ('t') in one kernel and a store buffer in "
                           "another; mark it ephemeral to keep it in the request")
    local = spec.ephemeral or types == {"t"}
    if spec.const and (local or written):
        raise InvalidInput(f"buffer {spec.name!r} is const: it must be a read-only ('i') store buffer")
    first_index, first_type = uses[0]
    if local:
        if first_type in _READS:
            raise InvalidInput(f"buffer {spec.name!r} is ephemeral and kernels[{first_index}] reads it before any "
                               "kernel writes it")
        if spec.size is None:
            raise InvalidInput(f"buffer {spec.name!r} is ephemeral: it needs a size")
        if spec.offset:
            raise InvalidInput(f"buffer {spec.name!r} is ephemeral: offset applies to store objects only")
        return PlannedBuffer(spec, spec.size, load=False, store=False, written=written)
    load = first_type in _READS or spec.offset > 0
    if not load:
        if spec.size is None:
            raise InvalidInput(f"output buffer {spec.name!r} needs a size")
        return PlannedBuffer(spec, spec.size, load=False, store=written, written=written)
    stored = size_of(spec.key)
    if stored is None:
        raise OpNotFound(f"input buffer {spec.name!r} (key {spec.key!r}) is not in the buffer store")
    size = spec.size if spec.size is not None else stored - spec.offset
    if size <= 0 or spec.offset + size > stored:
        raise InvalidInput(f"buffer {spec.name!r}: offset {spec.offset} + size {size} is outside its store object "
                           f"{spec.key!r} of {stored} bytes")
    return PlannedBuffer(spec, size, load=True, store=written, written=written)
