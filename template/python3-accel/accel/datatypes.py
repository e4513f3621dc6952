"""Open Inference Protocol datatypes and their fixed-size encodings (little-endian)."""
from __future__ import annotations

from .errors import InvalidInput

#: datatype -> (struct code, item size in bytes, numpy dtype string)
FIXED: dict[str, tuple[str, int, str]] = {
    "BOOL": ("?", 1, "|b1"),
    "UINT8": ("B", 1, "|u1"),
    "UINT16": ("H", 2, "<u2"),
    "UINT32": ("I", 4, "<u4"),
    "UINT64": ("Q", 8, "<u8"),
    "INT8": ("b", 1, "|i1"),
    "INT16": ("h", 2, "<i2"),
    "INT32": ("i", 4, "<i4"),
    "INT64": ("q", 8, "<i8"),
    "FP16": ("e", 2, "<f2"),
    "FP32": ("f", 4, "<f4"),
    "FP64": ("d", 8, "<f8"),
}
BYTES = "BYTES"
ALL = frozenset(FIXED) | {BYTES}

_FROM_NUMPY = {
    "bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
    "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
    "float16": "FP16", "float32": "FP32", "float64": "FP64",
}


def check(datatype: object, what: str) -> str:
    """Return ``datatype`` if it is a protocol datatype, else raise InvalidInput naming ``what``."""
    if datatype not in ALL:
        raise InvalidInput(f"{what}: unsupported datatype {datatype!r} (expected one of {', '.join(sorted(ALL))})")
    return datatype  # type: ignore[return-value]


def from_numpy_dtype(dtype: object) -> str:
    """The protocol datatype for a numpy dtype (object, bytes and str arrays are BYTES)."""
    kind = getattr(dtype, "kind", "")
    if kind in ("O", "S", "U"):
        return BYTES
    name = getattr(dtype, "name", str(dtype))
    try:
        return _FROM_NUMPY[name]
    except KeyError:
        raise InvalidInput(f"numpy dtype {name} has no Open Inference Protocol datatype") from None


#: the most dimensions a tensor may have, and the most elements its non-zero dimensions may span:
#: far past any request body, yet small enough that no size computed from a shape overflows 64 bits
MAX_RANK = 32
MAX_ELEMENTS = 1 << 40


def check_shape(shape: tuple[int, ...], what: str) -> None:
    """Raise InvalidInput unless ``shape`` has at most MAX_RANK dimensions that span at most
    MAX_ELEMENTS elements (zero dimensions counted as one, as numpy does when it sizes an array)."""
    if len(shape) > MAX_RANK:
        raise InvalidInput(f"{what}: {len(shape)} dimensions, over the limit of {MAX_RANK}")
    span = 1
    for d in shape:
        span *= max(d, 1)
        if span > MAX_ELEMENTS:
            raise InvalidInput(f"{what}: shape {list(shape)} spans over {MAX_ELEMENTS} elements")


def element_count(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
