"""Tensors through system shared memory (Triton's ``system_shared_memory`` extension), client side.

A tensor travels in a registered region instead of the HTTP body when its ``parameters`` carry
``shared_memory_region`` and ``shared_memory_byte_size`` (and optionally ``shared_memory_offset``).
``SharedMemoryRef`` is that triple as the codec reads and writes it; ``SharedMemory`` is a POSIX
shared memory object this process creates, whose ``array()`` views let a function build its inputs
in place, so that nothing is copied on the way to the shim. ``multiprocessing.shared_memory`` and
numpy are imported only when a ``SharedMemory`` is made or viewed.
"""
from __future__ import annotations

import os
import re

from ._record import Record
from .errors import InvalidInput

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Mapping, Sequence

    import numpy as np

REGION = "shared_memory_region"
BYTE_SIZE = "shared_memory_byte_size"
OFFSET = "shared_memory_offset"
#: placement of tensors copied into a region: what numpy and SIMD kernels like
ALIGN = 64
_REGION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class SharedMemoryRef(Record):
    """Where a tensor's bytes lie: ``byte_size`` bytes at ``offset`` of registered region ``region``."""

    __slots__ = ("region", "byte_size", "offset")

    def __init__(self, region: str, byte_size: int, offset: int = 0) -> None:
        self.region, self.byte_size, self.offset = region, byte_size, offset

    @classmethod
    def from_parameters(cls, params: Mapping[str, Any], what: str) -> "SharedMemoryRef | None":
        """The reference that tensor parameters ``params`` hold, or None when they hold none.

        Raises:
            InvalidInput: only one of region and byte size, or values of the wrong type or sign.
        """
        region, size, offset = params.get(REGION), params.get(BYTE_SIZE), params.get(OFFSET, 0)
        if region is None and size is None:
            if OFFSET in params:
                raise InvalidInput(f"{what}: {OFFSET} without {REGION} and {BYTE_SIZE}")
            return None
        if region is None or size is None:
            raise InvalidInput(f"{what}: {REGION} and {BYTE_SIZE} go together; only "
                               f"{REGION if size is None else BYTE_SIZE} was given")
        if not isinstance(region, str) or not region:
            raise InvalidInput(f"{what}: {REGION} must be a non-empty string")
        for key, value in ((BYTE_SIZE, size), (OFFSET, offset)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidInput(f"{what}: {key} must be a non-negative integer, got {value!r}")
        return cls(region, size, offset)

    def parameters(self) -> dict[str, Any]:
        """The tensor parameters that say so (offset left out when 0, as tritonclient does)."""
        params: dict[str, Any] = {REGION: self.region, BYTE_SIZE: self.byte_size}
        if self.offset:
            params[OFFSET] = self.offset
        return params


class SharedMemory:
    """A POSIX shared memory object of this process, to pass tensors to and from the shim.

    The shim must see the same ``/dev/shm`` (same host; in Kubernetes see docs/shared-memory.md).
    Build inputs in place with ``array()`` and pass ``shm=`` to ``Client.infer``/``gemm``: inputs that
    are views of this region are not copied at all, others are copied in once; outputs are written
    here by the shim and come back as views of it.

    Args:
        name: the region name the shim knows it by (per tenant; ``[A-Za-z0-9_.-]``, up to 128).
        byte_size: its size in bytes.
        key: the shared memory object's name (``/dev/shm/<key>``); default ``accel_<name>_<pid>_<random>``.
        create: create (and later unlink) the object; False: attach to an existing one.

    ``close()`` (or leaving a ``with`` block) unmaps it and, when this object created it, unlinks it;
    views from ``array()`` must be gone by then.
    """

    def __init__(self, name: str, byte_size: int, *, key: str | None = None, create: bool = True) -> None:
        from multiprocessing import shared_memory  # noqa: PLC0415  (lazily: keeps ``import accel`` light)

        if not isinstance(name, str) or not _REGION_NAME.fullmatch(name) or ".." in name:
            raise InvalidInput(f"invalid shared memory region name {name!r}: use 1 to 128 of A-Z a-z 0-9 _ . -")
        if int(byte_size) < 1:
            raise InvalidInput(f"a shared memory region needs at least 1 byte, not {byte_size}")
        self.name = name
        self.key = key or f"accel_{name}_{os.getpid()}_{os.urandom(4).hex()}"
        self._owner = create
        self._shm = shared_memory.SharedMemory(self.key, create=create, size=int(byte_size) if create else 0)
        self.byte_size = int(byte_size) if create else self._shm.size
        self.buf: memoryview | None = self._shm.buf

    # --- views ------------------------------------------------------------------------------
    def array(self, shape: Sequence[int] | int, dtype: Any = "float32", offset: int = 0) -> "np.ndarray":
        """A numpy array of ``shape`` and ``dtype`` that *is* the region's memory from ``offset`` on."""
        import numpy as np  # noqa: PLC0415

        dtype = np.dtype(dtype)
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if offset < 0 or offset + nbytes > self.byte_size:
            raise InvalidInput(f"an array of {nbytes} bytes at offset {offset} does not fit region {self.name!r} "
                               f"of {self.byte_size} bytes")
        return np.ndarray(shape, dtype, buffer=self._view(), offset=offset)

    def offset_of(self, array: Any) -> int | None:
        """The offset of C-contiguous numpy ``array`` in this region, or None when it is not a view of it."""
        interface = getattr(array, "__array_interface__", None)
        if interface is None or not array.flags.c_contiguous:
            return None
        import numpy as np  # noqa: PLC0415

        base = np.frombuffer(self._view(), dtype=np.uint8).ctypes.data
        start = interface["data"][0] - base
        return start if 0 <= start and start + array.nbytes <= self.byte_size else None

    def view(self, offset: int, nbytes: int) -> memoryview:
        """The region's bytes ``[offset, offset + nbytes)``."""
        if offset < 0 or nbytes < 0 or offset + nbytes > self.byte_size:
            raise InvalidInput(f"bytes {offset}..{offset + nbytes} are outside region {self.name!r} "
                               f"of {self.byte_size} bytes")
        return self._view()[offset:offset + nbytes]

    def _view(self) -> memoryview:
        if self.buf is None:
            raise InvalidInput(f"shared memory region {self.name!r} is closed")
        return self.buf[:self.byte_size]

    # --- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        """Unmap; unlink too when this object created the shared memory object."""
        if self.buf is None:
            return
        self.buf.release()
        self.buf = None
        self._shm.close()
        if self._owner:
            try:
                self._shm.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> "SharedMemory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SharedMemory(name={self.name!r}, key={self.key!r}, byte_size={self.byte_size})"


class Layout:
    """First-fit placement of tensors in one region for one call, around what already lies there."""

    def __init__(self, region: SharedMemory) -> None:
        self.region = region
        self._taken: list[tuple[int, int]] = []

    def claim(self, offset: int, nbytes: int) -> int:
        """Mark ``[offset, offset + nbytes)`` as used (a tensor the caller built in place)."""
        self._taken.append((offset, offset + nbytes))
        return offset

    def place(self, nbytes: int, what: str) -> int:
        """A free, ALIGN-aligned offset for ``nbytes``, now claimed.

        Raises:
            InvalidInput: the region has no room for it.
        """
        start = 0
        for lo, hi in sorted(self._taken):
            if start + nbytes <= lo:
                break
            start = max(start, -(-hi // ALIGN) * ALIGN)
        if start + nbytes > self.region.byte_size:
            used = sum(hi - lo for lo, hi in self._taken)
            raise InvalidInput(f"shared memory region {self.region.name!r} ({self.region.byte_size} bytes) has no room "
                               f"for {what} ({nbytes} bytes; {used} bytes already placed in this call)")
        return self.claim(start, nbytes)
