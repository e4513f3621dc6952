"""``gemm``: C = alpha * A @ B + beta * C, on the selected backend (straight into the caller's
shared-memory region when C is asked for there)."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from accel.errors import InvalidInput

from ..backends.base import Backend, TensorSpec
from .base import Destinations, Op, destination_array, float_param

DATATYPES = ("FP16", "FP32", "FP64")
PRECISIONS = ("default", "tf32")


class GemmOp(Op):
    """General matrix multiply of FP16, FP32 or FP64 matrices (one datatype for all)."""

    name = "gemm"
    inputs = [TensorSpec("A", None, (-1, -1)), TensorSpec("B", None, (-1, -1)),
              TensorSpec("C", None, (-1, -1), optional=True)]
    outputs = [TensorSpec("C", None, (-1, -1))]
    parameters = {"alpha": "scale of A @ B (default 1.0)", "beta": "scale of the input C (default 0.0)",
                  "precision": '"default", or "tf32" to let FP32 products use TF32 tensor cores (GPU)'}
    direct_outputs = frozenset({"C"})

    def __init__(self, backend: Backend, max_elements: int) -> None:
        self._backend = backend
        self.backend = backend.name
        self._max_elements = max_elements

    def metadata(self) -> dict[str, Any]:
        meta = super().metadata()
        for spec in meta["inputs"] + meta["outputs"]:
            spec["datatype"] = "FP32"
            spec["datatypes"] = list(DATATYPES)
        return meta

    def run(self, inputs: dict[str, np.ndarray], parameters: Mapping[str, Any],
            destinations: Destinations | None = None) -> dict[str, np.ndarray]:
        """The product; into ``destinations["C"]`` when given (checked before any work)."""
        a, b, c = inputs["A"], inputs["B"], inputs.get("C")
        alpha = float_param(parameters, "alpha", 1.0)
        beta = float_param(parameters, "beta", 0.0)
        precision = parameters.get("precision", "default")
        if precision not in PRECISIONS:
            raise InvalidInput(f"parameter 'precision' must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if precision == "tf32" and a.dtype != np.float32:
            raise InvalidInput(f"precision 'tf32' applies to FP32 inputs; these are {a.dtype.name}")
        for name, m in (("A", a), ("B", b)) + ((("C", c),) if c is not None else ()):
            if m.dtype.name not in ("float16", "float32", "float64"):
                raise InvalidInput(f"gemm input {name} is {m.dtype.name}; use FP16, FP32 or FP64")
            if m.dtype != a.dtype:
                raise InvalidInput(f"gemm inputs must share one datatype: A is {a.dtype.name}, {name} is {m.dtype.name}")
            if 0 in m.shape:
                raise InvalidInput(f"gemm input {name} has an empty dimension {list(m.shape)}")
        (m_, k), (k2, n) = a.shape, b.shape
        if k != k2:
            raise InvalidInput(f"gemm: A is {m_}x{k} and B is {k2}x{n}; A's columns must equal B's rows")
        if c is not None and c.shape != (m_, n):
            raise InvalidInput(f"gemm: C is {c.shape[0]}x{c.shape[1]} but A @ B is {m_}x{n}")
        if m_ * n > self._max_elements:
            raise InvalidInput(f"gemm: the result would have {m_ * n} elements, over the limit of {self._max_elements}")
        out = destination_array(destinations, "C", (m_, n), a.dtype)
        return {"C": self._backend.gemm(a, b, c, alpha, beta, precision, out=out)}

    def warmup(self) -> None:
        for dtype in (np.float16, np.float32, np.float64):
            x = np.ones((64, 64), dtype=dtype)
            self._backend.gemm(x, x, x, 1.0, 1.0)
