"""Tensors through system shared memory (Triton's ``system_shared_memory`` extension), client side.

A tensor travels in a registered region instead of the HTTP body when its ``parameters`` carry
``shared_memory_region`` and ``shared_memory_byte_size`` (and optionally ``shared_memory_offset``).
``SharedMemoryRef`` is that triple as the codec reads and writes it; ``SharedMemory`` is a POSIX
shared memory object this process creates, whose ``array()`` (numpy) and ``tensor()`` (no numpy)
views let a function build its inputs in place, so that nothing is copied on the way to the shim.
Making a region costs system calls only; numpy is imported only by ``array()`` views.
"""
from __future__ import annotations

import os
import weakref

from . import datatypes as dt
from ._record import Record
from .errors import InvalidInput
from .tensor import Tensor

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Mapping, Sequence

    import numpy as np

REGION = "shared_memory_region"
BYTE_SIZE = "shared_memory_byte_size"
OFFSET = "shared_memory_offset"
#: an infer request's header that registers the region it uses on the way (an accelshim extension:
#: one round trip fewer for a function's first call through a region); its value is the JSON of
#: ``registration(region)``. A shim that is not accelshim ignores it and answers that the region is
#: unknown, and the client then registers the region the standard way.
REGISTER_HEADER = "Accel-Shared-Memory-Register"
#: placement of tensors copied into a region: what numpy and SIMD kernels like
ALIGN = 64
#: where POSIX shared memory objects live (shm_open's namespace on Linux)
SHM_DIR = "/dev/shm"
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")  # no ``re``: ~5 ms


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
    here by the shim and come back as views of it. ``array()`` hands out the region's space from the
    start on (an arena; ``reset()`` starts over); a call puts its copies and outputs in the space that
    no ``array()`` holds, so results are valid until the next call through this region.

    Args:
        name: the region name the shim knows it by (per tenant; ``[A-Za-z0-9_.-]``, up to 128).
        byte_size: its size in bytes.
        key: the shared memory object's name (``/dev/shm/<key>``); default ``accel_<name>_<pid>_<random>``.
        create: create (and later unlink) the object; False: attach to an existing one.
        mode: the new object's permissions (less the umask); 0o600: the shim must run as the same user;
            0o660 lets a shim of the same group in (docs/shared-memory.md).

    ``close()`` (or leaving a ``with`` block) unmaps it and, when this object created it, unlinks it;
    views from ``array()`` must be gone by then. A region never closed is unlinked when it is collected
    or the interpreter exits; a process killed outright (SIGKILL) leaves its object in ``/dev/shm``.

    Raises:
        InvalidInput: a bad name or size, the object exists already (create) or not at all (attach).
    """

    def __init__(self, name: str, byte_size: int, *, key: str | None = None, create: bool = True,
                 mode: int = 0o600) -> None:
        if not isinstance(name, str) or not 0 < len(name) <= 128 or not _NAME_CHARS.issuperset(name) \
                or name[0] in "_.-" or ".." in name:
            raise InvalidInput(f"invalid shared memory region name {name!r}: use 1 to 128 of A-Z a-z 0-9 _ . -")
        if create and int(byte_size) < 1:
            raise InvalidInput(f"a shared memory region needs at least 1 byte, not {byte_size}")
        self.name = name
        self.key = key or f"accel_{name}_{os.getpid()}_{os.urandom(4).hex()}"
        bare = self.key.lstrip("/")
        if not bare or "/" in bare or bare in (".", "..") or len(bare) > 255 or "\0" in bare:
            raise InvalidInput(f"invalid shared memory key {self.key!r}: one name (an optional leading '/', "
                               "then up to 255 characters, no other '/')")
        self._owner = create
        path = f"{SHM_DIR}/{bare}"
        # shm_open is open() under /dev/shm on Linux; multiprocessing.shared_memory would cost ~12 ms of
        # imports and a resource-tracker process, a large part of a function's first call
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if create else 0)
        try:
            fd = os.open(path, flags, mode)
        except FileExistsError:
            raise InvalidInput(f"shared memory object {self.key!r} exists already") from None
        except FileNotFoundError:
            if create:
                raise  # no /dev/shm here: not the caller's input
            raise InvalidInput(f"no shared memory object {self.key!r}") from None
        if create:  # unlinked when closed, collected, or at exit, whichever comes first
            self._unlink = weakref.finalize(self, _unlink, path, os.getpid())
        try:
            if create:
                os.ftruncate(fd, int(byte_size))
            self.byte_size = int(byte_size) if create else os.fstat(fd).st_size
            if self.byte_size < 1:
                raise InvalidInput(f"shared memory object {self.key!r} is empty")
            import mmap  # noqa: PLC0415

            self._map = mmap.mmap(fd, self.byte_size)
        except BaseException:
            if create:
                self._unlink()
            raise
        finally:
            os.close(fd)
        self.buf: memoryview | None = memoryview(self._map)
        self.held: list[tuple[int, int]] = []  # [start, end) of what array() and tensor() handed out

    # --- views ------------------------------------------------------------------------------
    def array(self, shape: Sequence[int] | int, dtype: Any = "float32", offset: int | None = None) -> "np.ndarray":
        """A numpy array of ``shape`` and ``dtype`` that *is* the region's memory (uninitialised).

        ``offset`` None: the next free, 64-byte aligned space; else exactly there. Either way the
        space is held (calls through the region leave it alone) until ``reset()``.
        """
        import numpy as np  # noqa: PLC0415

        dtype = np.dtype(dtype)
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        offset = self._hold(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, offset)
        return self._array(shape, dtype, offset)

    def tensor(self, name: str, shape: Sequence[int], datatype: str = "FP32", offset: int | None = None) -> Tensor:
        """A protocol tensor whose bytes *are* the region's memory, for functions without numpy.

        Fill ``tensor.raw`` (a writable memoryview) in place, e.g. ``body.readinto(t.raw)`` or
        ``t.raw[:] = data``, and pass it to ``Client.gemm``/``infer`` with ``shm=`` this region (which
        they register): it travels as a reference to the region. Space is held as by ``array()``.
        """
        if dt.check(datatype, f"tensor {name!r}") == dt.BYTES:
            raise InvalidInput(f"tensor {name!r}: BYTES tensors travel in the request body, not in shared memory")
        shape = tuple(int(d) for d in shape)
        if any(d < 0 for d in shape):
            raise InvalidInput(f"tensor {name!r}: shape {list(shape)} has a negative dimension")
        dt.check_shape(shape, f"tensor {name!r}")
        nbytes = dt.element_count(shape) * dt.FIXED[datatype][1]
        offset = self._hold(nbytes, offset)
        return Tensor(name, datatype, shape, self.view(offset, nbytes),
                      SharedMemoryRef(self.name, nbytes, offset).parameters())

    def _hold(self, nbytes: int, offset: int | None) -> int:
        """Hold ``nbytes`` at ``offset`` (None: the next free, ALIGN-aligned space); returns the offset."""
        if offset is None:
            offset = -(-max((end for _, end in self.held), default=0) // ALIGN) * ALIGN
        if offset < 0 or offset + nbytes > self.byte_size:
            raise InvalidInput(f"{nbytes} bytes at offset {offset} do not fit region {self.name!r} "
                               f"of {self.byte_size} bytes")
        self.held.append((offset, offset + nbytes))
        return offset

    def _array(self, shape: tuple[int, ...], dtype: Any, offset: int) -> "np.ndarray":
        import numpy as np  # noqa: PLC0415

        return np.ndarray(shape, dtype, buffer=self._view(), offset=offset)

    def reset(self) -> None:
        """Forget what ``array()`` handed out (the arrays stay valid; their space is free again)."""
        self.held.clear()

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
        """Unlink the shared memory object when this object created it, and unmap it (once no array
        views it any more: ``del`` them first to unmap now)."""
        if self.buf is None:
            return
        try:
            self.buf.release()
        except BufferError:  # an array made straight from ``buf``
            pass
        self.buf = None
        try:
            self._map.close()
        except BufferError:  # arrays still view it: the mapping goes with the last of them
            pass
        self._map = None  # type: ignore[assignment]  (ours was the last reference but the views')
        if self._owner:
            self._unlink()

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
        self._taken: list[tuple[int, int]] = list(region.held)

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


def place_request(region: SharedMemory, inputs: Mapping[str, Any], outputs: Mapping[str, Any] | None
                  ) -> tuple[list[Any], list[Any] | None]:
    """The input tensors and requested outputs of a call that passes tensors through ``region``.

    Args:
        inputs: name -> numpy array (or ``Tensor``, sent as it is). Arrays that are views of the region
            (``region.array(...)``) are referenced where they lie; others are copied into free space.
            BYTES arrays travel in the request body.
        outputs: name -> where the shim writes it: a byte size (placed in free space), an array view or
            a ``region.tensor(...)`` of the region (written exactly there), or None (in the response
            body). None: every output in the response body.
    Returns:
        (tensors, requested outputs or None) for ``InferRequest``.
    Raises:
        InvalidInput: no room in the region, or an output array that is not a view of it.
    """
    from .codec import RequestedOutput  # noqa: PLC0415  (the codec imports this module)

    layout = Layout(region)
    arrays: dict[str, tuple[Any, int | None]] = {}
    for name, value in inputs.items():
        if isinstance(value, Tensor):  # sent as it is; one that lies in this region keeps its space
            ref = SharedMemoryRef.from_parameters(value.parameters, f"input {name!r}")
            if ref is not None and ref.region == region.name:
                layout.claim(ref.offset, ref.byte_size)
            continue
        import numpy as np  # noqa: PLC0415  (only for arrays: Tensors need none)

        array = np.asarray(value)
        datatype = dt.from_numpy_dtype(array.dtype)
        if datatype == dt.BYTES:
            continue
        native = np.dtype(dt.FIXED[datatype][2])
        offset = region.offset_of(array) if array.dtype == native else None
        if offset is not None:
            layout.claim(offset, array.nbytes)
        arrays[name] = (array, offset)
    where: dict[str, SharedMemoryRef | None] = {}
    for name, spec in (outputs or {}).items():
        if spec is None or isinstance(spec, int):
            where[name] = None if spec is None else SharedMemoryRef(region.name, spec, -1)
            continue
        if isinstance(spec, Tensor):
            ref = SharedMemoryRef.from_parameters(spec.parameters, f"output {name!r}")
            if ref is None or ref.region != region.name:
                raise InvalidInput(f"output {name!r}: the tensor given for it does not lie in region {region.name!r} "
                                   "(make it with region.tensor(...))")
            where[name] = SharedMemoryRef(region.name, ref.byte_size, layout.claim(ref.offset, ref.byte_size))
            continue
        offset = region.offset_of(spec)
        if offset is None:
            raise InvalidInput(f"output {name!r}: the array given for it is not a C-contiguous view of region "
                               f"{region.name!r} (make it with region.array(...))")
        where[name] = SharedMemoryRef(region.name, spec.nbytes, layout.claim(offset, spec.nbytes))
    tensors: list[Any] = []
    for name, value in inputs.items():
        if name not in arrays:
            tensors.append(value.renamed(name) if isinstance(value, Tensor) else Tensor.from_numpy(name, value))
            continue
        array, offset = arrays[name]
        import numpy as np  # noqa: PLC0415

        if offset is None:
            offset = layout.place(array.nbytes, f"input {name!r}")
            region._array(array.shape, np.dtype(dt.FIXED[dt.from_numpy_dtype(array.dtype)][2]), offset)[...] = array
        ref = SharedMemoryRef(region.name, array.nbytes, offset)
        tensors.append(Tensor(name, dt.from_numpy_dtype(array.dtype), tuple(int(d) for d in array.shape),
                              region.view(offset, array.nbytes), ref.parameters()))
    requested = None
    if outputs is not None:
        requested = []
        for name, ref in where.items():
            if ref is not None and ref.offset < 0:  # a size: placed after the inputs
                ref = SharedMemoryRef(region.name, ref.byte_size, layout.place(ref.byte_size, f"output {name!r}"))
            requested.append(RequestedOutput(name, False, ref.parameters()) if ref is not None
                             else RequestedOutput(name))
    return tensors, requested


def registration(region: SharedMemory) -> dict[str, Any]:
    """``{"name", "key", "offset", "byte_size"}``: what registers all of ``region`` (``REGISTER_HEADER``)."""
    return {"name": region.name, "key": region.key, "offset": 0, "byte_size": region.byte_size}


def resolver(region: SharedMemory) -> Any:
    """The codec's resolver for outputs the shim wrote into ``region`` (views, not copies)."""
    def resolve(name: str, ref: SharedMemoryRef) -> memoryview:
        if ref.region != region.name:
            raise InvalidInput(f"output {name!r} is in region {ref.region!r}, not in {region.name!r}")
        return region.view(ref.offset, ref.byte_size)

    return resolve


def _unlink(path: str, creator: int) -> None:
    """Unlink the object at ``path``, only in the process that made it (a forked child that exits
    must not take its parent's object away)."""
    if os.getpid() != creator:
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
