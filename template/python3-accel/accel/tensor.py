"""A named tensor in its wire form.

``raw`` holds the tensor exactly as the binary extension carries it: little-endian row-major
elements for fixed-size datatypes, and for BYTES each element as a 4-byte little-endian length
followed by its bytes. One form for JSON and binary requests means one place that validates sizes,
and binary tensors reach numpy without a copy. numpy is imported only by the methods that need it.
"""
from __future__ import annotations

import struct
from . import datatypes as dt
from ._record import Record
from .errors import InvalidInput

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Iterable, Sequence

    import numpy as np

_LEN = struct.Struct("<I")


class Tensor(Record):
    """A tensor of the Open Inference Protocol.

    Attributes:
        name: the input or output name.
        datatype: a protocol datatype (``FP32``, ``BYTES``, ...).
        shape: the dimensions.
        raw: the binary wire form (see the module docstring).
        parameters: the tensor's protocol ``parameters``.
    """

    __slots__ = ("name", "datatype", "shape", "raw", "parameters")

    def __init__(self, name: str, datatype: str, shape: tuple[int, ...], raw: bytes | memoryview,
                 parameters: dict[str, Any] | None = None) -> None:
        self.name, self.datatype, self.shape, self.raw = name, datatype, tuple(shape), raw
        self.parameters = parameters if parameters is not None else {}
        dt.check(self.datatype, f"tensor {self.name!r}")
        count = dt.element_count(self.shape)
        if self.datatype == dt.BYTES:
            found = len(_split_bytes(self.raw, self.name))
            if found != count:
                raise InvalidInput(f"tensor {self.name!r}: shape {list(self.shape)} needs {count} "
                                   f"BYTES elements but {found} were given")
        else:
            want = count * dt.FIXED[self.datatype][1]
            if len(self.raw) != want:
                raise InvalidInput(f"tensor {self.name!r}: shape {list(self.shape)} of {self.datatype} "
                                   f"needs {want} bytes but {len(self.raw)} were given")

    @property
    def nbytes(self) -> int:
        return len(self.raw)

    # --- building -------------------------------------------------------------------------
    @classmethod
    def from_numpy(cls, name: str, array: Any, datatype: str | None = None) -> "Tensor":
        """Wrap a numpy array (bytes/str/object arrays become BYTES)."""
        import numpy as np

        array = np.asarray(array)
        datatype = datatype or dt.from_numpy_dtype(array.dtype)
        shape = tuple(int(d) for d in array.shape)
        if datatype == dt.BYTES:
            return cls.from_bytes_list(name, [_as_bytes(v) for v in array.reshape(-1).tolist()], shape)
        flat = np.ascontiguousarray(array, dtype=np.dtype(dt.FIXED[datatype][2])).reshape(-1)
        # a byte view of the array itself: no copy of what can be hundreds of megabytes
        return cls(name, datatype, shape, memoryview(flat).cast("B") if flat.size else b"")

    @classmethod
    def from_bytes_list(cls, name: str, items: Sequence[bytes], shape: Sequence[int] | None = None) -> "Tensor":
        """A BYTES tensor of ``items`` (shape defaults to ``[len(items)]``)."""
        raw = b"".join(_LEN.pack(len(b)) + b for b in items)
        return cls(name, dt.BYTES, tuple(shape) if shape is not None else (len(items),), raw)

    @classmethod
    def from_list(cls, name: str, datatype: str, shape: Sequence[int], data: Any) -> "Tensor":
        """A tensor from JSON ``data`` (flat or nested row-major lists)."""
        dt.check(datatype, f"tensor {name!r}")
        flat = list(_flatten(data))
        shape = tuple(shape)
        if datatype == dt.BYTES:
            try:
                items = [_as_bytes(v) for v in flat]
            except TypeError as exc:
                raise InvalidInput(f"tensor {name!r}: {exc}") from None
            return cls.from_bytes_list(name, items, shape)
        count = dt.element_count(shape)
        if len(flat) != count:
            raise InvalidInput(f"tensor {name!r}: shape {list(shape)} needs {count} elements "
                               f"but data has {len(flat)}")
        code = dt.FIXED[datatype][0]
        if code != "?" and any(isinstance(v, bool) for v in flat):
            raise InvalidInput(f"tensor {name!r}: booleans in {datatype} data")
        if code == "?" and any(not isinstance(v, bool) for v in flat):
            raise InvalidInput(f"tensor {name!r}: BOOL data must be true/false")
        try:
            raw = struct.pack(f"<{count}{code}", *flat)
        except (struct.error, TypeError, OverflowError) as exc:
            raise InvalidInput(f"tensor {name!r}: data does not fit {datatype}: {exc}") from None
        return cls(name, datatype, shape, raw)

    def renamed(self, name: str) -> "Tensor":
        """This tensor under ``name`` (the same bytes and parameters, nothing copied)."""
        return self if name == self.name else Tensor(name, self.datatype, self.shape, self.raw, self.parameters)

    # --- reading --------------------------------------------------------------------------
    def numpy(self) -> "np.ndarray":
        """The tensor as a numpy array (zero-copy and read-only for fixed-size datatypes)."""
        import numpy as np

        if self.datatype == dt.BYTES:
            items = self.bytes_list()
            out = np.empty(len(items), dtype=object)
            out[:] = items
            return out.reshape(self.shape)
        array = np.frombuffer(self.raw, dtype=dt.FIXED[self.datatype][2]).reshape(self.shape)
        # a tensor at an odd offset of the body is misaligned, which slows BLAS and kernels down
        return array if array.flags.aligned else array.copy()

    def bytes_list(self) -> list[bytes]:
        """The elements of a BYTES tensor, flat."""
        if self.datatype != dt.BYTES:
            raise InvalidInput(f"tensor {self.name!r} is {self.datatype}, not BYTES")
        return _split_bytes(self.raw, self.name)

    def tolist(self) -> list[Any]:
        """The elements, flat, as Python values (str for UTF-8 BYTES); needs no numpy."""
        if self.datatype == dt.BYTES:
            try:
                return [b.decode("utf-8") for b in self.bytes_list()]
            except UnicodeDecodeError:
                raise InvalidInput(f"tensor {self.name!r} holds bytes that are not UTF-8; "
                                   "ask for it as binary data") from None
        code = dt.FIXED[self.datatype][0]
        return list(struct.unpack(f"<{dt.element_count(self.shape)}{code}", self.raw))


def _as_bytes(value: object) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    raise TypeError(f"BYTES elements must be strings or bytes, not {type(value).__name__}")


def _flatten(data: Any) -> Iterable[Any]:
    if isinstance(data, list):
        for item in data:
            yield from _flatten(item)
    else:
        yield data


def _split_bytes(raw: bytes | memoryview, name: str) -> list[bytes]:
    view = memoryview(raw)
    items: list[bytes] = []
    pos, end = 0, len(view)
    while pos < end:
        if pos + 4 > end:
            raise InvalidInput(f"tensor {name!r}: BYTES element header cut short at byte {pos}")
        (n,) = _LEN.unpack_from(view, pos)
        pos += 4
        if pos + n > end:
            raise InvalidInput(f"tensor {name!r}: BYTES element of {n} bytes runs past the end of the data")
        items.append(bytes(view[pos:pos + n]))
        pos += n
    return items
