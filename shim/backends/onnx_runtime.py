"""onnxruntime itself, imported once for the ONNX modules: its version, its CUDA provider, and its
element types as protocol datatypes and numpy types."""
from __future__ import annotations

from typing import Any

import numpy as np
try:
    import onnxruntime as ort
except ModuleNotFoundError as exc:  # an install with neither extra (a dependency of it missing: as it is)
    if exc.name != "onnxruntime":
        raise
    raise ModuleNotFoundError("onnxruntime is not installed: install accelshim[cpu], or accelshim[cuda] "
                              "on a GPU host (onnxruntime-gpu)", name="onnxruntime") from exc

from accel.datatypes import FIXED

from .base import TensorSpec

__all__ = ["NUMPY_TYPES", "dtype_of", "first_line", "has_cuda_provider", "ort", "tensor_spec", "version"]

_ORT_TYPES = {
    "tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(float16)": "FP16",
    "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32", "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64", "tensor(bool)": "BOOL", "tensor(string)": "BYTES",
}
#: onnxruntime element type -> numpy scalar type, for the fixed-size ones (what a fixed buffer can hold)
NUMPY_TYPES = {ort_type: np.dtype(FIXED[datatype][2]).type for ort_type, datatype in _ORT_TYPES.items()
               if datatype in FIXED}


def tensor_spec(arg: Any) -> TensorSpec:
    """A session input's or output's protocol spec (a free dimension: -1)."""
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
    return TensorSpec(arg.name, _ORT_TYPES.get(arg.type), shape)


def dtype_of(value: Any) -> np.dtype:
    """An ``OrtValue``'s numpy type (of a fixed-size element type)."""
    return np.dtype(NUMPY_TYPES[value.data_type()])


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, at most 200 characters (onnxruntime's run on)."""
    return (str(exc).splitlines() or [""])[0][:200]


def version() -> str:
    return ort.__version__


def has_cuda_provider() -> bool:
    """Whether this onnxruntime build has the CUDA execution provider (onnxruntime-gpu); if so, its
    CUDA and cuDNN libraries are loaded from the nvidia-* wheels where those are installed."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception:  # noqa: BLE001 - the system's libraries may serve; the session will tell
            pass
    return True
