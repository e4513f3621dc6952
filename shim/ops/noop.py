"""``noop``: returns its inputs unchanged, for measuring the request path itself."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from accel.tensor import Tensor

from .base import Op


class NoopOp(Op):
    """Any number of inputs of any datatype and shape (zero allowed), echoed as outputs."""

    name = "noop"
    inputs: list = []
    outputs: list = []

    def run(self, inputs: dict[str, np.ndarray], parameters: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return dict(inputs)

    def run_tensors(self, inputs: list[Tensor], parameters: Mapping[str, Any]) -> list[Tensor]:
        return [Tensor(t.name, t.datatype, t.shape, t.raw) for t in inputs]  # no copy, no numpy

    def metadata(self) -> dict[str, Any]:
        meta = super().metadata()
        meta["inputs"] = meta["outputs"] = []
        meta["description"] = "any inputs, any datatype and shape; each comes back as the output of the same name"
        return meta
